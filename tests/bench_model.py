"""Benchmark model.py against transformers on CPU (a script, not a test; transformers is the baseline here only).

    .venv/bin/python tests/bench_model.py                 # llava_onevision
    .venv/bin/python tests/bench_model.py qwen2_5_vl      # the same on a small random Qwen2.5-VL

1. forward (fp32 logits, video prompt) and greedy generate (KV cache) on one small random llava_onevision
   checkpoint, ours vs transformers, interleaved in one process: ratio of median times (>1 = we are faster).
2. peak resident memory of VLM.from_pretrained vs the checkpoint's size, in a fresh process per measurement.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VLM  # noqa: E402
from tests.tiny import hf_model  # noqa: E402


def small_config():
    """A ~60M-parameter llava_onevision: big enough that matmuls, not Python, dominate on CPU."""
    from transformers import LlavaOnevisionConfig
    vision = dict(model_type="siglip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, image_size=112, patch_size=14, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, video_token_index=31999,
                                image_token_index=31998, vision_feature_select_strategy="full", vision_feature_layer=-1)


def small_qwen_config():
    """A ~60M-parameter Qwen2.5-VL (window-attention ViT with two full-attention blocks, mRoPE decoder)."""
    from transformers import Qwen2_5_VLConfig
    vision = dict(depth=4, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=512,
                  fullatt_block_indexes=[1, 3], window_size=112, tokens_per_second=2)
    text = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, rope_theta=1e6, rope_scaling=dict(type="mrope", mrope_section=[8, 12, 12]),
                tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, video_token_id=31999, image_token_id=31998,
                            vision_start_token_id=31997, vision_end_token_id=31996, tie_word_embeddings=False)


def qwen_inputs(ours, frames=8, size=224):
    """input_ids with the expanded video (20 text ids, the video, 20 text ids), the processor's patches and grid,
    second_per_grid_ts and mm_token_type_ids: the same keyword inputs for both models."""
    from model import patchify
    patches, grid = patchify(torch.randn(1, frames, 3, size, size), ours.config.vision)
    n = int(grid.prod()) // 4
    ids = torch.cat([torch.randint(0, 30000, (1, 20)), torch.full((1, n), 31999), torch.randint(0, 30000, (1, 20))], 1)
    return ids, dict(pixel_values_videos=patches[0], video_grid_thw=grid, second_per_grid_ts=torch.tensor([1.0]))


def speed_qwen(path, hf):
    ours = VLM.from_pretrained(path)
    ids, kw = qwen_inputs(ours)
    types = (ids == 31999).int() * 2  # transformers builds its 3-D positions from these
    new_tokens = 32
    with torch.no_grad():
        fwd_ours = lambda: ours(ids, **kw)  # noqa: E731
        fwd_hf = lambda: hf(input_ids=ids, mm_token_type_ids=types, **kw)  # noqa: E731
        fwd_ours(), fwd_hf()  # warm up
        t_ours, t_hf = median_time(fwd_ours, 5), median_time(fwd_hf, 5)
        print(f"qwen2_5_vl forward T={ids.shape[1]}: ours {t_ours * 1e3:.0f} ms, transformers {t_hf * 1e3:.0f} ms, "
              f"ratio {t_hf / t_ours:.2f}x")
        gen_ours = lambda: ours.generate([ids[0].tolist()], max_new_tokens=new_tokens, **kw)  # noqa: E731
        gen_hf = lambda: hf.generate(input_ids=ids, mm_token_type_ids=types, max_new_tokens=new_tokens,  # noqa
                                     min_new_tokens=new_tokens, do_sample=False, **kw)
        gen_ours(), gen_hf()
        t_ours, t_hf = median_time(gen_ours, 3), median_time(gen_hf, 3)
        print(f"qwen2_5_vl generate {new_tokens} tokens: ours {new_tokens / t_ours:.1f} tok/s, transformers "
              f"{new_tokens / t_hf:.1f} tok/s, ratio {t_hf / t_ours:.2f}x")


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(path, hf):
    ours = VLM.from_pretrained(path)
    frames, new_tokens = 8, 32
    n_video = ours.num_video_tokens(frames)
    ids = torch.cat([torch.randint(0, 30000, (1, 20)), torch.full((1, n_video), 31999),
                     torch.randint(0, 30000, (1, 20))], dim=1)
    pixels = torch.randn(1, frames, 3, 112, 112)
    with torch.no_grad():
        for fn in (lambda: ours(ids, pixels), lambda: hf(input_ids=ids, pixel_values_videos=pixels)):
            fn()  # warm up
        t_ours = median_time(lambda: ours(ids, pixels), 5)
        t_hf = median_time(lambda: hf(input_ids=ids, pixel_values_videos=pixels), 5)
        print(f"forward  T={ids.shape[1]}: ours {t_ours * 1e3:.0f} ms, transformers {t_hf * 1e3:.0f} ms, "
              f"ratio {t_hf / t_ours:.2f}x")
        gen_ours = lambda: ours.generate([ids[0].tolist()], pixels, max_new_tokens=new_tokens)  # noqa: E731
        gen_hf = lambda: hf.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=new_tokens,  # noqa
                                     min_new_tokens=new_tokens, do_sample=False)
        gen_ours(), gen_hf()
        t_ours, t_hf = median_time(gen_ours, 3), median_time(gen_hf, 3)
        print(f"generate {new_tokens} tokens: ours {new_tokens / t_ours:.1f} tok/s, transformers "
              f"{new_tokens / t_hf:.1f} tok/s, ratio {t_hf / t_ours:.2f}x")


def peak_rss_of_load(path, dtype):
    # VmHWM (peak RSS) is reset after the imports by writing 5 to clear_refs, so import spikes are not counted;
    # the first module built on `meta` lazily imports ~145 MiB of torch machinery, a fixed cost paid before the baseline
    code = (f"import re, torch, model\n"
            f"with torch.device('meta'): torch.nn.Embedding(2, 2)\n"
            f"hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            f"rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            f"open('/proc/self/clear_refs', 'w').write('5'); base = rss()\n"
            f"m = model.VLM.from_pretrained({path!r}, dtype=torch.{dtype})\n"
            f"print(hwm() - base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return int(out.stdout.split()[-1]) * 1024  # /proc/self/status reports KiB


def memory(path):
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    params = sum(p.numel() for p in VLM.from_pretrained(path).parameters())
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        peak = peak_rss_of_load(path, dtype)
        print(f"from_pretrained fp32 file -> {dtype}: peak RSS growth {peak / 2**20:.0f} MiB, file {size / 2**20:.0f} "
              f"MiB, loaded weights {params * nbytes / 2**20:.0f} MiB, peak/loaded {peak / (params * nbytes):.2f}x")


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1:] == ["qwen2_5_vl"]:
        from transformers import Qwen2_5_VLForConditionalGeneration
        with tempfile.TemporaryDirectory() as d:
            hf = Qwen2_5_VLForConditionalGeneration(small_qwen_config()).float().eval()
            hf.save_pretrained(d)
            print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"{sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params")
            speed_qwen(d, hf)
        sys.exit(0)
    with tempfile.TemporaryDirectory() as d:
        hf = hf_model(small_config())
        hf.save_pretrained(d)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params")
        speed(d, hf)
        del hf
        memory(d)
