"""The one GPU check (a script, not a test): the kernels' parity at their real tile sizes first, then the numbers issue
16 asks for, as one table on stdout and one JSON file. About 5-8 minutes on one H100/H200:

    make gpu-check                                  # = python tests/gpu_check.py --out=gpu_check.json
    TRITON_INTERPRET=1 python tests/gpu_check.py --tiny=True --out=/tmp/gpu_check.json   # toy shapes on CPU

1. parity: Triton attention (fp32, bf16; causal, pair and grouped layouts, bidirectional; GQA; odd T) and
   fused_logprobs against the fp64 reference, outputs and every gradient. A miss stops the script (exit 1): no number
   is ever taken from wrong kernels;
2. attention forward / backward TFLOP/s vs SDPA (and flash-attn when importable): bf16, head dims 64 and 128,
   T = 1k..16k, causal and a 90%-prefix pair row; a pair row vs causal attention over the duplicated sequence;
3. fused_logprobs vs naive full logits at V = 151,936, d = 3584 (Qwen2-7B's head): peak memory, each in a fresh
   process, and time;
4. DPO steps (fwd + bwd, bf16) through Qwen2-7B-shaped decoder layers and the full-vocabulary head: tokens/s, MFU,
   and prefix sharing vs the prompt duplicated;
5. describe-style greedy generation on a random Qwen2-7B-shaped model (a few layers, random video features):
   prefill and decode tokens/s.
Each goal of the issue is printed beside its measurement (met / missed). --tiny=True runs the same steps at toy
shapes on CPU so that the script itself is tested (tests/test_gpu_check.py); its timings mean nothing.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpo import QWEN2_7B, random_text_model, run_bench_layers  # noqa: E402
from bench_kernels import PARITY_CASES, _bench_attention, _bench_logprobs, _check_parity  # noqa: E402

# -----------------------------------------------------------------------------
# config: the GPU run; --tiny=True replaces the shapes with toy ones (TINY below)
out = "gpu_check.json"
tiny = False
gen_layers = 4  # decoder layers of the random 7B-shaped model in step 5 (tokens/s scale ~1/layers beyond the head)
gen_batch = 8  # prompts per generate call (describe.py's batch_size)
gen_new_tokens = 128
dpo_layers = 2

GPU = dict(parity_cases=PARITY_CASES, parity_V=5003, parity_N=301, Ds=(64, 128), Ts=(1024, 2048, 4096, 8192, 16384),
           tokens=16384, Hq=32, Hkv=8, logprob_Ns=(4096,), logprob_V=151936, logprob_d=3584, text=QWEN2_7B,
           frames=32, tokens_per_frame=196, response=256)  # 32 frames of 196 tokens: LLaVA-OneVision-7B
TINY = dict(parity_cases=[(torch.float32, 37, 4, 2, 32), (torch.bfloat16, 29, 2, 1, 16)], parity_V=300, parity_N=21,
            Ds=(16,), Ts=(32,), tokens=64, Hq=4, Hkv=2, logprob_Ns=(64,), logprob_V=1000, logprob_d=32,
            text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=512, rope_theta=1e4, rms_norm_eps=1e-6), frames=2, tokens_per_frame=4, response=8)

# the goals (on H100/H200): attention at hd 128, T = 8k, bf16, causal
GOALS = dict(attn_fwd_tflops=500, attn_bwd_tflops=350, attn_vs_sdpa=1.0, pair_vs_duplicated=1.8, logprob_peak=1 / 8,
             logprob_time=1.3, dpo_mfu=0.40)


def bench_generate(device, text, layers, batch, frames, tokens_per_frame, new_tokens, dtype):
    """Greedy generation (model.generate: KV cache, batched) on a random llava_onevision model with `layers` decoder
    layers of the `text` shape; each prompt holds frames * tokens_per_frame + 1 video tokens (random features) and a
    short question. Returns prefill and decode tokens/s (decode: generated tokens of the whole batch per second)."""
    V = text["vocab_size"]
    vlm = random_text_model(text, layers, device, dtype).eval()
    n_video = frames * tokens_per_frame + 1
    prompt = [1] * 14 + [V - 1] * n_video + [2] * 16
    features = torch.randn(batch, n_video, text["hidden_size"], device=device, dtype=dtype) * 0.02
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(n):
        sync()
        t0 = time.perf_counter()
        outs = vlm.generate([prompt] * batch, video_features=features, max_new_tokens=n)
        sync()
        return time.perf_counter() - t0, outs
    run(2)  # warm-up: Triton compilation, allocator
    t_prefill = min(run(1)[0] for _ in range(2))  # one new token: the prefill and one head matmul
    t_all, outs = run(new_tokens)
    generated = sum(len(o) for o in outs)  # no stop ids: every row runs to new_tokens
    out = dict(layers=layers, batch=batch, prompt_tokens=len(prompt), new_tokens=new_tokens,
               prefill_tokens_per_s=batch * len(prompt) / t_prefill,
               decode_tokens_per_s=(generated - batch) / max(t_all - t_prefill, 1e-9))
    print(f"{layers} decoder layers of hidden {text['hidden_size']} (V={V}), batch {batch} x {len(prompt)} prompt "
          f"tokens, {new_tokens} new: prefill {out['prefill_tokens_per_s']:.0f} tokens/s, decode "
          f"{out['decode_tokens_per_s']:.0f} tokens/s")
    return out


def verdict(value, goal, higher=True):
    if value is None:
        return "n/a"
    return "met" if (value >= goal if higher else value <= goal) else "MISSED"


def main(cfg):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (cfg["tiny"] and os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("no CUDA device: run this on a GPU node, or as a dry run with TRITON_INTERPRET=1 ... --tiny=True")
    s = TINY if cfg["tiny"] else GPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    result = dict(device=name, torch=torch.__version__, tiny=cfg["tiny"])
    import triton
    result["triton"] = triton.__version__
    t0 = time.time()

    print("== 1. parity: Triton kernels vs the fp64 reference (outputs and gradients)")
    ok, result["parity"] = _check_parity(device.type, s["parity_cases"], V=s["parity_V"], N=s["parity_N"])
    if not ok:
        with open(cfg["out"], "w") as f:
            json.dump(result, f, indent=2)
        sys.exit(f"parity FAILED on {name}: no timings are taken from wrong kernels (details in {cfg['out']}); "
                 f"the scripts run with --attn_impl=sdpa meanwhile")

    print("\n== 2. attention TFLOP/s")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["attention"] = _bench_attention(dtype, device.type, s["Ds"], s["Ts"], s["tokens"], s["Hq"], s["Hkv"])

    print("\n== 3. fused_logprobs vs naive")
    result["logprobs"] = _bench_logprobs(device.type, Ns=s["logprob_Ns"], N_time=s["logprob_Ns"][0], V=s["logprob_V"],
                                         d=s["logprob_d"], dtype=dtype, rounds=5 if device.type == "cuda" else 1)

    print("\n== 4. DPO steps on 7B-shaped decoder layers")
    result["dpo_layers"] = run_bench_layers(device, text=s["text"], layers=cfg["dpo_layers"], num_frames=s["frames"],
                                            tokens_per_frame=s["tokens_per_frame"], response=s["response"],
                                            rounds=5 if device.type == "cuda" else 1)

    print("\n== 5. generation (describe.py's path) on a random 7B-shaped model")
    result["generate"] = bench_generate(device, s["text"], cfg["gen_layers"], cfg["gen_batch"], s["frames"],
                                        s["tokens_per_frame"], cfg["gen_new_tokens"] if device.type == "cuda" else 4,
                                        dtype)
    result["seconds"] = time.time() - t0

    # the one table: each goal beside its measurement
    D, T = max(s["Ds"]), 8192 if 8192 in s["Ts"] else max(s["Ts"])
    pick = lambda mask, impl, key: next((r.get(key) for r in result["attention"] if r["D"] == D and r["T"] == T
                                         and r["mask"] == mask and r["impl"] == impl), None)
    fwd, bwd, sdpa_fwd = pick("causal", "triton", "fwd_tflops"), pick("causal", "triton", "bwd_tflops"), \
        pick("causal", "sdpa", "fwd_tflops")
    lp = result["logprobs"]
    rows = [(f"attention fwd TFLOP/s (D={D}, T={T}, causal)", fwd, GOALS["attn_fwd_tflops"], True),
            (f"attention bwd TFLOP/s (D={D}, T={T}, causal)", bwd, GOALS["attn_bwd_tflops"], True),
            ("attention fwd vs SDPA", fwd / sdpa_fwd if fwd and sdpa_fwd else None, GOALS["attn_vs_sdpa"], True),
            ("pair row vs duplicated, fwd+bwd", pick("pair_vs_duplicated", "triton", "speedup"),
             GOALS["pair_vs_duplicated"], True),
            ("fused_logprobs peak / naive (beyond grads)", lp["peaks"][0]["ratio_beyond_grads"], GOALS["logprob_peak"],
             False),
            ("fused_logprobs time / naive", lp["time_ratio"], GOALS["logprob_time"], False),
            ("DPO MFU on 7B-shaped layers", result["dpo_layers"]["mfu"], GOALS["dpo_mfu"], True),
            ("DPO tokens/s", result["dpo_layers"]["tokens_per_s"], None, True),
            (f"generate prefill tokens/s ({cfg['gen_layers']} layers)", result["generate"]["prefill_tokens_per_s"],
             None, True),
            (f"generate decode tokens/s ({cfg['gen_layers']} layers, batch {cfg['gen_batch']})",
             result["generate"]["decode_tokens_per_s"], None, True)]
    result["table"] = [dict(metric=m, value=v, goal=g, verdict=verdict(v, g, h) if g is not None else "")
                       for m, v, g, h in rows]
    print(f"\n== gpu check on {name} (torch {torch.__version__}, triton {triton.__version__}), "
          f"{result['seconds']:.0f} s{'; TINY DRY RUN: the numbers mean nothing' if cfg['tiny'] else ''}")
    print(f"{'metric':<52}{'value':>14}{'goal':>10}  verdict")
    for r in result["table"]:
        value = "n/a" if r["value"] is None else f"{r['value']:.3g}"
        goal = "" if r["goal"] is None else f"{r['goal']:.3g}"
        print(f"{r['metric']:<52}{value:>14}{goal:>10}  {r['verdict']}")
    with open(cfg["out"], "w") as f:
        json.dump(result, f, indent=2)
    print(f"-> {cfg['out']}")
    return result


if __name__ == "__main__":
    from configurator import configure
    main(configure(dict(out=out, tiny=tiny, gen_layers=gen_layers, gen_batch=gen_batch,
                        gen_new_tokens=gen_new_tokens, dpo_layers=dpo_layers), sys.argv[1:]))
