"""Benchmark dpo.py (a script, not a test), configured like dpo.py itself (its defaults, config file, --key=value):

    .venv/bin/python tests/bench_dpo.py config/tiny.py --num_frames=128 --batch_size=4 --out_dir=/tmp/dpo_bench
    .venv/bin/python tests/bench_dpo.py config/tiny.py --device=cuda   # + DPO steps on two Qwen2-7B-shaped layers, MFU

Writes out_dir/bench.json.
1. fwd+bwd of a DPO micro step with prefix sharing vs the prompt duplicated, and ref=precompute vs a live reference;
2. activation memory of the response head: fused_logprobs on gathered rows vs naive full logits;
3. on CUDA: DPO steps through 7B-shaped decoder layers, tokens/s and MFU.
"""
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpo import build_scorer, dpo_loss, pair_logps  # noqa: E402
from model import setup_runtime  # noqa: E402
from packing import collate, pack_pairs  # noqa: E402
from kernels import fused_logprobs  # noqa: E402



def saved_bytes(fn, exclude=()):
    """Run fn() and return (its result, bytes of the tensors autograd saved for backward, each storage once, those of
    `exclude` (inputs that exist anyway) left out): the activation memory fn adds."""
    total, seen = [0], {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def run_bench(cfg, rounds=10):
    """Same pairs, same process, interleaved best-of-rounds: (1) fwd+bwd of a DPO micro step in three layouts: video-
    grouped rows (4 pairs per video share one [video | q1 c1 r1 | ...] row), per-pair rows [prompt | chosen | rejected]
    and the prompt duplicated (two rows per pair); the video prefix is 90% of each [prompt | response] sequence;
    with the activation memory each layout saves for backward, per pair; (2) activation memory of the response head,
    fused_logprobs on gathered rows vs naive full logits; (3) ref=precompute vs a live reference."""
    from tokenizer import Tokenizer
    torch.manual_seed(cfg["seed"])
    _, _, device, _ = setup_runtime(cfg["device"], cfg["dtype"])
    cfg = {**cfg, "fsdp": False}
    scorer = build_scorer(cfg["init_from"], cfg, device, trainable=True)
    ref_scorer = build_scorer(cfg["init_from"], cfg, device, trainable=False)
    vlm, tok = scorer.vlm, Tokenizer.from_pretrained(cfg["init_from"])
    c = vlm.config
    n_video = vlm.num_video_tokens(cfg["num_frames"])
    prompt_ids = tok.video_prompt("What happens here?", n_video)
    L = max(1, round(len(prompt_ids) / 9))  # prefix = 90% of prompt + response
    low = min(tok.special.values())  # ordinary (non-special) ids are below the added tokens
    B, per_video = cfg["batch_size"], 4
    frames = [torch.randn(cfg["num_frames"], 3, c.vision.image_size, c.vision.image_size)
              for _ in range(-(-B // per_video))]
    items = [dict(id=str(b), category="", video=f"v{b // per_video}", pixels=frames[b // per_video],
                  prompt_ids=tok.video_prompt(f"Question {b}: what happens here?", n_video),
                  chosen_ids=torch.randint(0, low, (L,)).tolist(), rejected_ids=torch.randint(0, low, (L,)).tolist())
             for b in range(B)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg["dtype"] == "bfloat16" \
        else contextlib.nullcontext()
    batches = {"grouped": collate(items, True, max_pairs=per_video), True: collate(items, True),
               False: collate(items, False)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(share, live):
        batch = batches[share]
        with autocast:
            pc, pr, _, _ = pair_logps(scorer, batch, device)
            if live:
                with torch.no_grad():
                    rc, rr = pair_logps(ref_scorer, batch, device)[:2]
            else:
                rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        dpo_loss(pc, pr, rc, rr, cfg["beta"])["losses"].mean().backward()
        scorer.zero_grad(set_to_none=True)
        sync()

    def vision(*_):  # the frozen tower alone (no_grad, once per pair in every variant), to report the LM part apart
        with torch.no_grad(), autocast:
            vlm.video_features(batches[True]["pixels"].to(device))
        sync()

    runs = {"prefix shared, ref precomputed": (True, False), "prompt duplicated, ref precomputed": (False, False),
            "video-grouped rows, ref precomputed": ("grouped", False),
            "prefix shared, ref live": (True, True), "vision tower alone (no_grad)": None}
    best = dict.fromkeys(runs, float("inf"))
    for args in runs.values():
        step(*args) if args else vision()  # warm-up
    for _ in range(rounds):
        for name, args in runs.items():
            t0 = time.perf_counter()
            step(*args) if args else vision()
            best[name] = min(best[name], time.perf_counter() - t0)

    # response head activation memory: from the same hidden states, fused on gathered rows vs full logits
    t = {k: v.to(device) for k, v in batches[True].items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        hidden = vlm(t["input_ids"], t["pixels"], t["position_ids"], t["layout"], return_hidden=True)
    hidden.requires_grad_()
    w = vlm.lm_head_weight
    _, fused_bytes = saved_bytes(lambda: fused_logprobs(hidden.flatten(0, 1)[t["gather"]], w, t["targets"]),
                                 exclude=(hidden, w))
    _, naive_bytes = saved_bytes(lambda: torch.log_softmax(F.linear(hidden, w).float(), -1).flatten(0, 1)[
        t["gather"], t["targets"]], exclude=(hidden, w))
    base = best["prefix shared, ref precomputed"]
    lm = base - best["vision tower alone (no_grad)"]
    grouped = best["video-grouped rows, ref precomputed"]
    saved = {}  # activation bytes each layout keeps for backward, per pair
    for name in ("grouped", True, False):
        with autocast:
            _, saved[name] = saved_bytes(lambda: pair_logps(scorer, batches[name], device))
        scorer.zero_grad(set_to_none=True)
    tokens = {name: batches[name]["input_ids"].numel() / B for name in ("grouped", True, False)}
    result = dict(video_grouping_speedup=base / grouped,
                  grouped_vs_duplicated_speedup=best["prompt duplicated, ref precomputed"] / grouped,
                  tokens_per_pair=dict(grouped=tokens["grouped"], per_pair=tokens[True], duplicated=tokens[False]),
                  saved_bytes_per_pair=dict(grouped=saved["grouped"] / B, per_pair=saved[True] / B,
                                            duplicated=saved[False] / B),
                  prefix_sharing_speedup=best["prompt duplicated, ref precomputed"] / base,
                  prefix_sharing_speedup_lm=(best["prompt duplicated, ref precomputed"] - base + lm) / lm,
                  ref_precompute_speedup=best["prefix shared, ref live"] / base,
                  fused_logprobs_memory_ratio=fused_bytes / naive_bytes,
                  head_saved_bytes=dict(fused=fused_bytes, naive=naive_bytes),
                  step_seconds=best, pairs=B, prompt_tokens=len(prompt_ids), response_tokens=L,
                  vocab=c.text.vocab_size, hidden=c.text.hidden_size, device=str(device), rounds=rounds)
    print(f"DPO micro step fwd+bwd, {B} pairs, prompt {len(prompt_ids)} tokens (video {cfg['num_frames']} frames), "
          f"responses {L}, {device}, best of {rounds}:")
    for name, s in best.items():
        print(f"  {name:36s} {s * 1e3:8.1f} ms  {B / s:7.2f} pairs/s  ({s / base:.2f}x)")
    print(f"  video grouping ({per_video} pairs per video): {result['video_grouping_speedup']:.2f}x per-pair rows, "
          f"{result['grouped_vs_duplicated_speedup']:.2f}x the duplicated prompt; tokens per pair "
          f"{tokens['grouped']:.0f} / {tokens[True]:.0f} / {tokens[False]:.0f}, saved activations per pair "
          f"{saved['grouped'] / 2**20:.1f} / {saved[True] / 2**20:.1f} / {saved[False] / 2**20:.1f} MiB "
          f"(grouped / per pair / duplicated)")
    print(f"  prefix sharing: {result['prefix_sharing_speedup']:.2f}x the whole step, "
          f"{result['prefix_sharing_speedup_lm']:.2f}x its LM part (step minus the vision tower)")
    print(f"  response head activations: fused {fused_bytes / 2**10:.0f} KiB vs naive logits "
          f"{naive_bytes / 2**10:.0f} KiB ({result['fused_logprobs_memory_ratio']:.3f}x) at V={c.text.vocab_size}")
    if device.type == "cuda":  # the GPU figure: 7B-shaped layers, 32 frames
        result["qwen2_7b_layers"] = run_bench_layers(device)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    with open(os.path.join(cfg["out_dir"], "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


# Qwen2-7B's decoder (LLaVA-OneVision-7B's LM) and the bf16 dense peak of the GPUs this project is lent (TFLOP/s)
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def random_text_model(text, layers, device, dtype):
    """A llava_onevision VLM with `layers` random decoder layers of the `text` shape (video token V-1) and a token
    vision tower (callers pass video_features), built on meta and filled in place: no fp32 copy of a 7B shape."""
    from model import VLM, parse_config
    V = text["vocab_size"]
    raw = dict(model_type="llava_onevision", video_token_index=V - 1, image_token_index=V - 2,
               tie_word_embeddings=False, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             image_size=28, patch_size=14),
               text_config=dict(text, num_hidden_layers=layers))
    with torch.device("meta"):
        vlm = VLM(parse_config(raw))
    vlm = vlm.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in vlm.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    return vlm


def run_bench_layers(device, text=QWEN2_7B, layers=2, num_frames=32, tokens_per_frame=196, response=256, pairs=1,
                     rounds=5):
    """DPO steps (fwd + bwd, bf16 parameters and activations) through `layers` decoder layers of the given shape
    with its full vocabulary head, on one prefix-shared pair per row of [P = frames x tokens + 1 + 30 | C | R];
    the frozen vision tower is left out (random video features). Reports tokens/s and MFU, and the same pairs with
    the prompt duplicated. FLOPs counted (model FLOPs: no recomputation, fwd + bwd = 3 x fwd):
      matmuls  2 * N_layer_params * tokens * layers           (q, k, v, o, gate, up, down)
      attention 4 * heads * head_dim * visible (query, key) pairs * layers   (QK^T and PV)
      head     2 * hidden * vocab * response tokens           (fused_logprobs on the gathered rows only)"""
    H, I, nh, nkv = (text[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads"))
    hd, V = H // nh, text["vocab_size"]
    vlm = random_text_model(text, layers, device, torch.bfloat16)  # bf16 compute, as under FSDP2's mixed precision
    P = num_frames * tokens_per_frame + 1 + 30
    items = [dict(prompt_ids=[1] * 30 + [V - 1] * (P - 30), chosen_ids=torch.randint(0, V - 2, (response,)).tolist(),
                  rejected_ids=torch.randint(0, V - 2, (response,)).tolist()) for _ in range(pairs)]
    features = torch.randn(pairs, P - 30, H, device=device, dtype=torch.bfloat16) * 0.02
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(share):
        b = {k: v.to(device) for k, v in pack_pairs(items, share).items() if isinstance(v, torch.Tensor)}
        f = features if share else features.repeat_interleave(2, 0)
        hidden = vlm(b["input_ids"], video_features=f, position_ids=b["position_ids"], layout=b["layout"],
                     return_hidden=True)
        logp = fused_logprobs(hidden.flatten(0, 1)[b["gather"]], vlm.lm_head_weight, b["targets"])
        logp.sum().backward()
        vlm.zero_grad(set_to_none=True)
        sync()

    best = {}
    for share in (True, False):
        step(share)  # warm-up (Triton autotuning, allocator)
    for _ in range(rounds):
        for share in (True, False):
            t0 = time.perf_counter()
            step(share)
            best[share] = min(best.get(share, float("inf")), time.perf_counter() - t0)
    tri = lambda n: n * (n + 1) // 2  # causal (query, key) pairs in n tokens
    visible = pairs * (tri(P + response) + response * P + tri(response))
    tokens = pairs * (P + 2 * response)
    layer_params = H * (nh * hd) * 2 + H * (nkv * hd) * 2 + 3 * H * I
    fwd = 2 * layer_params * tokens * layers + 4 * nh * hd * visible * layers + 2 * H * V * pairs * 2 * response
    flops = 3 * fwd
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = dict(device=name, layers=layers, tokens=tokens, prompt=P, response=response, pairs=pairs,
               step_s=best[True], tokens_per_s=tokens / best[True], tflops=flops / best[True] / 1e12,
               mfu=flops / best[True] / peak if peak else None, prefix_sharing_speedup=best[False] / best[True])
    mfu = f", MFU {out['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""
    print(f"{layers} decoder layers of hidden {H} (V={V}) on {name}, {pairs} pair(s) of {tokens} tokens "
          f"(prompt {P}, responses {response}): {best[True] * 1e3:.1f} ms/step, {out['tokens_per_s']:.0f} tokens/s, "
          f"{out['tflops']:.1f} TFLOP/s{mfu}; prompt duplicated {best[False] * 1e3:.1f} ms "
          f"({out['prefix_sharing_speedup']:.2f}x)")
    return out



if __name__ == "__main__":
    from configurator import configure, print_config
    from dpo import DEFAULTS
    config = configure(DEFAULTS, sys.argv[1:])
    print_config(config)
    run_bench(config)
