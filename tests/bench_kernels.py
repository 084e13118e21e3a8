"""Benchmark and CUDA parity check of kernels.py (a script, not a test). `python kernels.py` runs it.

    .venv/bin/python tests/bench_kernels.py

CUDA: first the Triton kernels against the fp64 reference on odd shapes (exits non-zero on a miss, so no number is
ever taken from wrong kernels), then attention TFLOP/s fwd/bwd vs SDPA (and flash_attn if importable) for head dims
64/128 and T = 1k..16k, causal and 90%-prefix pair layouts, the pair row vs causal attention over the duplicated
sequence, and fused_logprobs vs naive (time and peak memory, each peak in a fresh process).
CPU: the reference attention paths and fused_logprobs vs naive.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import IGNORE_INDEX, attention, attention_ref, fused_logprobs, fused_logprobs_ref  # noqa: E402


def _pairs(P, C, R):
    # (query, key) pairs the layout rule lets through in one row: the honest FLOP count (causal ~ half of T*T)
    tri = lambda n: n * (n + 1) // 2  # causal pairs inside n tokens
    return tri(P + C) + R * P + tri(R)


PARITY_CASES = [(torch.float32, 130, 6, 2, 72), (torch.bfloat16, 1000, 8, 2, 128), (torch.bfloat16, 777, 12, 4, 64),
                (torch.float32, 17, 3, 1, 64)]  # (dtype, T, Hq, Hkv, D)


def _check_parity(device="cuda", cases=PARITY_CASES, V=5003):
    # run first on a GPU: Triton vs the fp64 reference on odd shapes, outputs and gradients (normwise relative error;
    # tolerance as in tests/test_kernels.py: 2**7 ulps fp32, 1 ulp bf16). Returns False on any miss.
    ok = True
    for dtype, T, Hq, Hkv, D in cases:
        P = T // 2
        layout = torch.tensor([[T, 0, 0], [P, T // 5, T - P - T // 5 - 3], [0, T // 3, T // 4]], device=device)
        for causal, lay in ((True, None), (True, layout), (False, None)):
            q, k, v = (torch.randn(3, h, T, D, device=device, dtype=dtype, requires_grad=True) for h in (Hq, Hkv, Hkv))
            do = torch.randn_like(q)
            got = [attention(q, k, v, causal, lay)]
            got += torch.autograd.grad(got[0], (q, k, v), do)
            ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
            want = [attention_ref(*ref_in, causal, lay)]
            want += torch.autograd.grad(want[0], ref_in, do.double())
            tol = torch.finfo(dtype).eps * (2 ** 7 if dtype == torch.float32 else 1)
            errs = [((g.double() - w).norm() / w.norm().clamp(min=1.0)).item() for g, w in zip(got, want)]
            good = all(e <= tol for e in errs) and all(torch.isfinite(g).all() for g in got)
            ok &= good
            print(f"parity {str(dtype):>14} T={T:>4} Hq={Hq} Hkv={Hkv} D={D:>3} causal={causal!s:>5} "
                  f"layout={lay is not None!s:>5}: o/dq/dk/dv rel err {' '.join(f'{e:.1e}' for e in errs)} "
                  f"(tol {tol:.1e}) {'ok' if good else 'FAIL'}")
    hidden = torch.randn(301, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (301,), device=device)
    targets[::7] = IGNORE_INDEX
    got = [fused_logprobs(hidden, weight, targets, chunk_size=64)]
    got += torch.autograd.grad(got[0].sum(), (hidden, weight))
    ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight)]  # grads stay unrounded
    want = [fused_logprobs_ref(*ref_in, targets)]
    want += torch.autograd.grad(want[0].sum(), ref_in)
    errs = [((g.double() - w.double()).norm() / w.double().norm()).item() for g, w in zip(got, want)]
    good = all(e <= 2 * torch.finfo(torch.bfloat16).eps for e in errs)  # dlogits and the result: 2 bf16 roundings
    ok &= good
    print(f"parity fused_logprobs bf16: logp/dh/dW rel err {' '.join(f'{e:.1e}' for e in errs)} "
          f"{'ok' if good else 'FAIL'}")
    return ok


def _bench_attention(dtype=torch.bfloat16):
    from triton.testing import do_bench
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    Hq, Hkv = 32, 8
    print(f"attention, {torch.cuda.get_device_name()}, {dtype}, Hq={Hq} Hkv={Hkv}, B*T=16384 tokens; "
          f"FLOPs = 4*D*Hq*(visible query-key pairs) forward, 2.5x that backward (5 matmuls vs 2); "
          f"sdpa gets K/V pre-expanded to Hq heads")
    print(f"{'D':>4} {'T':>6} {'mask':>7} {'impl':>11} {'fwd ms':>8} {'fwd TF/s':>9} {'bwd ms':>8} {'bwd TF/s':>9}")
    for D in (64, 128):
        for T in (1024, 2048, 4096, 8192, 16384):
            B = max(1, 16384 // T)
            q, k, v = (torch.randn(B, h, T, D, device="cuda", dtype=dtype, requires_grad=True)
                       for h in (Hq, Hkv, Hkv))
            kr, vr = (x.detach().repeat_interleave(Hq // Hkv, 1).requires_grad_() for x in (k, v))
            P = int(0.9 * T) // 16 * 16  # a 90% shared prefix, two equal branches
            C = (T - P) // 2
            pair = torch.tensor([[P, C, T - P - C]] * B, device="cuda")
            impls = [("causal", "triton", lambda: attention(q, k, v), (q, k, v)),
                     ("causal", "sdpa", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                      (q, kr, vr)),
                     ("pair90", "triton", lambda: attention(q, k, v, layout=pair), (q, k, v))]
            if flash_attn_func is not None:
                qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                impls.append(("causal", "flash_attn", lambda: flash_attn_func(qt, kt, vt, causal=True), (qt, kt, vt)))
            for mask, name, fn, inputs in impls:
                flops = 4 * D * Hq * B * (_pairs(T, 0, 0) if mask == "causal" else _pairs(P, C, T - P - C))
                try:
                    o = fn()
                    do = torch.randn_like(o)
                    t_f = do_bench(fn)
                    t_b = do_bench(lambda: torch.autograd.grad(o, inputs, do, retain_graph=True))
                except Exception as e:  # keep the table going (e.g. a backend without this shape); say why
                    print(f"{D:>4} {T:>6} {mask:>7} {name:>11} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                print(f"{D:>4} {T:>6} {mask:>7} {name:>11} {t_f:8.3f} {flops / t_f * 1e-9:9.1f} {t_b:8.3f} "
                      f"{2.5 * flops / t_b * 1e-9:9.1f}")
                del o, do
            # prefix sharing, fwd+bwd: a pair row [P, C, C] vs causal over [prompt|chosen] and [prompt|rejected]
            q1, k1, v1 = (x.detach()[:, :, :P + 2 * C].requires_grad_() for x in (q, k, v))
            q2, k2, v2 = (torch.randn(2 * B, h, P + C, D, device="cuda", dtype=dtype, requires_grad=True)
                          for h in (Hq, Hkv, Hkv))
            lay = torch.tensor([[P, C, C]] * B, device="cuda")
            t_pair = do_bench(lambda: torch.autograd.grad(attention(q1, k1, v1, layout=lay).sum(), (q1, k1, v1)))
            t_dup = do_bench(lambda: torch.autograd.grad(attention(q2, k2, v2).sum(), (q2, k2, v2)))
            print(f"{D:>4} {T:>6} fwd+bwd, pair row vs causal over the duplicated sequence (prefix {P}, branches {C}):"
                  f" {t_pair:.3f} ms vs {t_dup:.3f} ms, {t_dup / t_pair:.2f}x faster")
            del q, k, v, kr, vr, q1, k1, v1, q2, k2, v2


def _bench_attention_cpu(B=2, Hq=14, Hkv=2, T=1024, D=64, rounds=3):
    # the CPU path is the SDPA reference: what a layout costs there, and a pair row vs its two causal rows, fwd+bwd
    import time
    P, C = int(0.9 * T), (T - int(0.9 * T)) // 2
    R = T - P - C
    q, k, v = (torch.randn(B, h, T, D, requires_grad=True) for h in (Hq, Hkv, Hkv))
    dup = [torch.randn(2 * B, h, P + max(C, R), D, requires_grad=True) for h in (Hq, Hkv, Hkv)]
    runs = {"is_causal (layout=None)": ((q, k, v), None), "layout [T, 0, 0]": ((q, k, v), [T, 0, 0]),
            f"pair layout [{P}, {C}, {R}]": ((q, k, v), [P, C, R]),
            f"2 causal rows of {P + max(C, R)}": (dup, None)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):  # interleaved in one process
        for name, (x, lay) in runs.items():
            lay = torch.tensor([lay] * B) if lay is not None else None
            t0 = time.perf_counter()
            torch.autograd.grad(attention(*x, layout=lay).sum(), x)
            best[name] = min(best[name], time.perf_counter() - t0)
    base = best["is_causal (layout=None)"]
    print(f"attention reference (CPU path) fwd+bwd, B={B} rows, Hq={Hq} Hkv={Hkv} T={T} D={D} fp32, best of {rounds}:")
    for name, t in best.items():
        print(f"  {name:>24}: {t * 1e3:7.1f} ms ({t / base:.2f}x)")


def _logprobs_inputs(N, V, d, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(V, d, device=device, dtype=dtype, generator=g).mul_(d ** -0.5).requires_grad_()  # no temp
    return hidden, weight, torch.randint(0, V, (N,), device=device, generator=g)


def _logprobs_step(impl, hidden, weight, targets):
    logp = (fused_logprobs if impl == "fused" else fused_logprobs_ref)(hidden, weight, targets)
    torch.autograd.grad(logp.sum(), (hidden, weight))  # grads dropped at once; their size is reported apart
    if hidden.is_cuda:
        torch.cuda.synchronize()


def _logprobs_peak_child(impl, N, V, d, device, dtype):
    # run in a fresh process: peak memory of one fwd+bwd beyond the inputs (CPU: peak RSS, which only grows)
    import resource
    hidden, weight, targets = _logprobs_inputs(N, V, d, device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    _logprobs_step(impl, hidden, weight, targets)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - base


def _bench_logprobs(device, Ns, N_time, V=151936, d=3584, dtype=torch.float32, rounds=3):
    import json
    import subprocess
    import sys
    import time
    grads = lambda N: (N + V) * d * (torch.finfo(dtype).bits // 8)  # grad_hidden + grad_weight, bytes
    print(f"fused_logprobs fwd+bwd, {device}, {dtype}, V={V} d={d}")
    print("  peak memory beyond the inputs, one fresh process per entry (the gradients themselves are included)")
    for N in Ns:
        peak = {}
        for impl in ("naive", "fused"):
            cmd = [sys.executable, os.path.abspath(__file__), "--peak", impl, str(N), str(V), str(d), device,
                   str(dtype).split(".")[1]]
            peak[impl] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        mib = lambda x: f"{x / 2**20:.0f} MiB"
        print(f"  N={N:>5}: naive {mib(peak['naive'])}, fused {mib(peak['fused'])} "
              f"({peak['fused'] / peak['naive']:.3f}x);"
              f" beyond the {mib(grads(N))} of grads: naive {mib(peak['naive'] - grads(N))}, fused "
              f"{mib(peak['fused'] - grads(N))} ({(peak['fused'] - grads(N)) / (peak['naive'] - grads(N)):.3f}x)")
    inputs = _logprobs_inputs(N_time, V, d, device, dtype)
    best = {"naive": float("inf"), "fused": float("inf")}
    for _ in range(rounds):  # interleaved in one process so that load from other jobs hits both alike
        for impl in best:
            t0 = time.perf_counter()
            _logprobs_step(impl, *inputs)
            best[impl] = min(best[impl], time.perf_counter() - t0)
    print(f"  time N={N_time}, best of {rounds} interleaved: naive {best['naive']:.3f} s, fused {best['fused']:.3f} s "
          f"({best['fused'] / best['naive']:.2f}x)")


def main():
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "--peak":  # the fresh-process half of _bench_logprobs
        impl, N, V, d, device, dtype = sys.argv[2:8]
        print(_logprobs_peak_child(impl, int(N), int(V), int(d), device, getattr(torch, dtype)))
        return
    if torch.cuda.is_available():
        if not _check_parity():
            sys.exit("parity check failed on CUDA: the numbers below would be for wrong kernels, so none are taken")
        _bench_attention()
        _bench_logprobs("cuda", Ns=(4096,), N_time=4096, dtype=torch.bfloat16, rounds=5)
    else:
        print("no CUDA device: the Triton kernels are benchmarked on GPUs only; CPU paths below")
        _bench_attention_cpu()
        _bench_logprobs("cpu", Ns=(256, 1024), N_time=256)


if __name__ == "__main__":
    main()
