"""Benchmark model.py against transformers on CPU (a script, not a test; transformers is the baseline here only).

    .venv/bin/python tests/bench_model.py

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
    with tempfile.TemporaryDirectory() as d:
        hf = hf_model(small_config())
        hf.save_pretrained(d)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params")
        speed(d, hf)
        del hf
        memory(d)
