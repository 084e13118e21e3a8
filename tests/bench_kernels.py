"""Benchmark and CUDA parity check of kernels.py (a script, not a test). Run: python tests/bench_kernels.py

    .venv/bin/python tests/bench_kernels.py

CUDA: first the Triton kernels against the fp64 reference on odd shapes (exits non-zero on a miss, so no number is
ever taken from wrong kernels), then attention TFLOP/s fwd/bwd vs SDPA (and flash_attn if importable) for head dims
64/128 and T = 1k..16k, causal and 90%-prefix pair layouts, the pair row vs causal attention over the duplicated
sequence, and fused_logprobs vs naive (time and peak memory, each peak in a fresh process).
CPU: the reference attention paths and fused_logprobs vs naive.
Both: the key/query tiles the attention kernels visit at issue 15's video-grouped shape, counted by the kernels' own
range logic (on CPU in a child process under TRITON_INTERPRET=1: `python tests/bench_kernels.py --tiles`).
"""
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import (IGNORE_INDEX, _attn_config, _key_ranges, _load_layout, _query_ranges, _reach,  # noqa: E402
                     attention, attention_ref, fused_logprobs, fused_logprobs_ref, grouped_layout, layout_mask)


def _pairs(P, C, R):
    # (query, key) pairs the layout rule lets through in one row: the honest FLOP count (causal ~ half of T*T)
    tri = lambda n: n * (n + 1) // 2  # causal pairs inside n tokens
    return tri(P + C) + R * P + tri(R)


PARITY_CASES = [(torch.float32, 130, 6, 2, 72), (torch.bfloat16, 1000, 8, 2, 128), (torch.bfloat16, 777, 12, 4, 64),
                (torch.float32, 17, 3, 1, 64)]  # (dtype, T, Hq, Hkv, D)


def _grouped_rows(T):
    # 3 grouped rows, K = 3: ragged branches (one with an empty query), a pair with padding, a prefix then padding
    S, q, c, r = T // 3, T // 40 + 1, T // 14, T // 16
    return [[S, q, c, r, q + 1, c - 1, r, 0, c, r + 1], [S, 0, T // 5, T // 5] + [0] * 6, [T - 3] + [0] * 9]


def _check_parity(device="cuda", cases=PARITY_CASES, V=5003, N=301):
    # run first on a GPU: Triton vs the fp64 reference on odd shapes, outputs and gradients (normwise relative error;
    # tolerance as in tests/test_kernels.py: 2**7 ulps fp32, 1 ulp bf16). Returns (all passed, one row per case).
    ok, rows = True, []
    for dtype, T, Hq, Hkv, D in cases:
        P = T // 2
        layout = torch.tensor([[T, 0, 0], [P, T // 5, T - P - T // 5 - 3], [0, T // 3, T // 4]], device=device)
        grouped = torch.tensor(_grouped_rows(T), device=device)
        for causal, lay in ((True, None), (True, layout), (True, grouped), (False, None)):
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
            width = "none" if lay is None else lay.shape[1]  # 3: pairs, 10: grouped rows
            rows.append(dict(kernel="attention", dtype=str(dtype), T=T, Hq=Hq, Hkv=Hkv, D=D, causal=causal,
                             layout=width, rel_err=errs, tol=tol, ok=bool(good)))
            print(f"parity {str(dtype):>14} T={T:>4} Hq={Hq} Hkv={Hkv} D={D:>3} causal={causal!s:>5} "
                  f"layout={width:>4}: o/dq/dk/dv rel err {' '.join(f'{e:.1e}' for e in errs)} "
                  f"(tol {tol:.1e}) {'ok' if good else 'FAIL'}")
    hidden = torch.randn(N, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, 96, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device=device)
    targets[::7] = IGNORE_INDEX
    got = [fused_logprobs(hidden, weight, targets, chunk_size=64)]
    got += torch.autograd.grad(got[0].sum(), (hidden, weight))
    ref_in = [x.detach().double().requires_grad_() for x in (hidden, weight)]  # grads stay unrounded
    want = [fused_logprobs_ref(*ref_in, targets)]
    want += torch.autograd.grad(want[0].sum(), ref_in)
    errs = [((g.double() - w.double()).norm() / w.double().norm()).item() for g, w in zip(got, want)]
    good = all(e <= 2 * torch.finfo(torch.bfloat16).eps for e in errs)  # dlogits and the result: 2 bf16 roundings
    ok &= good
    rows.append(dict(kernel="fused_logprobs", dtype="torch.bfloat16", N=N, V=V, rel_err=errs,
                     tol=2 * torch.finfo(torch.bfloat16).eps, ok=bool(good)))
    print(f"parity fused_logprobs bf16: logp/dh/dW rel err {' '.join(f'{e:.1e}' for e in errs)} "
          f"{'ok' if good else 'FAIL'}")
    return ok, rows


def _timer(device):
    # ms per call: triton's do_bench on CUDA (cache flushed, warm-up, median); best of 3 elsewhere (the --tiny dry run)
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench
    import time

    def best_of_3(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)
    return best_of_3


def _bench_attention(dtype=torch.bfloat16, device="cuda", Ds=(64, 128), Ts=(1024, 2048, 4096, 8192, 16384),
                     tokens=16384, Hq=32, Hkv=8):
    # fwd / bwd TFLOP/s of Triton (causal and a 90%-prefix pair row) vs SDPA (and flash_attn when importable), and
    # fwd+bwd of a pair row vs causal attention over the duplicated sequence. Returns one dict per measurement.
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    device = torch.device(device)
    bench, rows = _timer(device), []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"attention, {name}, {dtype}, Hq={Hq} Hkv={Hkv}, B*T={tokens} tokens; "
          f"FLOPs = 4*D*Hq*(visible query-key pairs) forward, 2.5x that backward (5 matmuls vs 2); "
          f"sdpa gets K/V pre-expanded to Hq heads")
    print(f"{'D':>4} {'T':>6} {'mask':>7} {'impl':>11} {'fwd ms':>8} {'fwd TF/s':>9} {'bwd ms':>8} {'bwd TF/s':>9}")
    for D in Ds:
        for T in Ts:
            B = max(1, tokens // T)
            q, k, v = (torch.randn(B, h, T, D, device=device, dtype=dtype, requires_grad=True)
                       for h in (Hq, Hkv, Hkv))
            kr, vr = (x.detach().repeat_interleave(Hq // Hkv, 1).requires_grad_() for x in (k, v))
            P = int(0.9 * T) // 16 * 16  # a 90% shared prefix, two equal branches
            C = (T - P) // 2
            pair = torch.tensor([[P, C, T - P - C]] * B, device=device)
            impls = [("causal", "triton", lambda: attention(q, k, v, impl="triton"), (q, k, v)),
                     ("causal", "sdpa", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                      (q, kr, vr)),
                     ("pair90", "triton", lambda: attention(q, k, v, layout=pair, impl="triton"), (q, k, v))]
            if flash_attn_func is not None and device.type == "cuda":
                qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
                impls.append(("causal", "flash_attn", lambda: flash_attn_func(qt, kt, vt, causal=True), (qt, kt, vt)))
            for mask, impl, fn, inputs in impls:
                flops = 4 * D * Hq * B * (_pairs(T, 0, 0) if mask == "causal" else _pairs(P, C, T - P - C))
                try:
                    o = fn()
                    do = torch.randn_like(o)
                    t_f = bench(fn)
                    t_b = bench(lambda: torch.autograd.grad(o, inputs, do, retain_graph=True))
                except Exception as e:  # keep the table going (e.g. a backend without this shape); say why
                    print(f"{D:>4} {T:>6} {mask:>7} {impl:>11} failed: {type(e).__name__}: {str(e)[:80]}")
                    rows.append(dict(D=D, T=T, mask=mask, impl=impl, error=f"{type(e).__name__}: {str(e)[:200]}"))
                    continue
                rows.append(dict(D=D, T=T, mask=mask, impl=impl, fwd_ms=t_f, bwd_ms=t_b,
                                 fwd_tflops=flops / t_f * 1e-9, bwd_tflops=2.5 * flops / t_b * 1e-9))
                print(f"{D:>4} {T:>6} {mask:>7} {impl:>11} {t_f:8.3f} {flops / t_f * 1e-9:9.1f} {t_b:8.3f} "
                      f"{2.5 * flops / t_b * 1e-9:9.1f}")
                del o, do
            # prefix sharing, fwd+bwd: a pair row [P, C, C] vs causal over [prompt|chosen] and [prompt|rejected]
            q1, k1, v1 = (x.detach()[:, :, :P + 2 * C].requires_grad_() for x in (q, k, v))
            q2, k2, v2 = (torch.randn(2 * B, h, P + C, D, device=device, dtype=dtype, requires_grad=True)
                          for h in (Hq, Hkv, Hkv))
            lay = torch.tensor([[P, C, C]] * B, device=device)
            t_pair = bench(lambda: torch.autograd.grad(attention(q1, k1, v1, layout=lay, impl="triton").sum(),
                                                       (q1, k1, v1)))
            t_dup = bench(lambda: torch.autograd.grad(attention(q2, k2, v2, impl="triton").sum(), (q2, k2, v2)))
            rows.append(dict(D=D, T=T, mask="pair_vs_duplicated", impl="triton", pair_ms=t_pair, duplicated_ms=t_dup,
                             speedup=t_dup / t_pair))
            print(f"{D:>4} {T:>6} fwd+bwd, pair row vs causal over the duplicated sequence (prefix {P}, branches {C}):"
                  f" {t_pair:.3f} ms vs {t_dup:.3f} ms, {t_dup / t_pair:.2f}x faster")
            del q, k, v, kr, vr, q1, k1, v1, q2, k2, v2
    return rows


def _bench_attention_cpu(B=2, Hq=14, Hkv=2, T=1024, D=64, rounds=3):
    # the CPU path is the SDPA reference: what a layout costs there, a pair row vs its two causal rows, and a grouped
    # row of 4 pairs (prefix 80%) vs its 4 pair rows, fwd+bwd
    import time
    P, C = int(0.9 * T), (T - int(0.9 * T)) // 2
    R = T - P - C
    S, n = int(0.8 * T), (T - int(0.8 * T)) // 4  # grouped: 4 branches of n tokens, query n // 5, c = r
    q0, c0 = n // 5, (n - n // 5) // 2
    grouped = [S] + [q0, c0, n - q0 - c0] * 4
    qkv = lambda rows, T: [torch.randn(rows, h, T, D, requires_grad=True) for h in (Hq, Hkv, Hkv)]
    q, k, v = qkv(B, T)
    runs = {"is_causal (layout=None)": ((q, k, v), None), "layout [T, 0, 0]": ((q, k, v), [T, 0, 0]),
            f"pair layout [{P}, {C}, {R}]": ((q, k, v), [P, C, R]),
            f"2 causal rows of {P + max(C, R)}": (qkv(2 * B, P + max(C, R)), None),
            f"grouped [{S} | {q0} {c0} {n - q0 - c0}] x 4": ((q, k, v), grouped),
            f"4 pair rows [{S + q0}, {c0}, {n - q0 - c0}]": (qkv(4 * B, S + n), [S + q0, c0, n - q0 - c0])}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):  # interleaved in one process
        for name, (x, lay) in runs.items():
            lay = torch.tensor([lay] * x[0].shape[0]) if lay is not None else None
            t0 = time.perf_counter()
            torch.autograd.grad(attention(*x, layout=lay).sum(), x)
            best[name] = min(best[name], time.perf_counter() - t0)
    base = best["is_causal (layout=None)"]
    print(f"attention reference (CPU path) fwd+bwd, B={B} rows, Hq={Hq} Hkv={Hkv} T={T} D={D} fp32, best of {rounds}:")
    for name, t in best.items():
        print(f"  {name:>32}: {t * 1e3:7.1f} ms ({t / base:.2f}x)")


@triton.jit
def _count_key_tiles(LAYOUT, NB, COUNT, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # per query tile: the BLOCK_N key tiles _attn_fwd (and _attn_bwd_dq, same ranges) loads
    b = tl.program_id(1).to(tl.int64)
    S, L = _load_layout(LAYOUT, b, T, NB, True)
    a1, b0, b1, c0, c1, d0, d1 = _key_ranges(LAYOUT, b, T, NB, tl.program_id(0) * BLOCK_M, BLOCK_M, S, L, True, True)
    n = (tl.cdiv(a1, BLOCK_N) + tl.cdiv(tl.maximum(b1 - b0, 0), BLOCK_N) + tl.cdiv(tl.maximum(c1 - c0, 0), BLOCK_N)
         + tl.cdiv(tl.maximum(d1 - d0, 0), BLOCK_N))
    tl.store(COUNT + b * tl.num_programs(0) + tl.program_id(0), n)


@triton.jit
def _count_query_tiles(LAYOUT, NB, COUNT, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # per key tile: the BLOCK_M query tiles _attn_bwd_dkdv loads (per query head)
    b = tl.program_id(1).to(tl.int64)
    S, L = _load_layout(LAYOUT, b, T, NB, True)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    reach = _reach(LAYOUT, b, T, NB, offs_n, S, L, True)
    lo, mid, e0, hi = _query_ranges(n0, BLOCK_N, reach, offs_n, L, True)
    n = (tl.cdiv(tl.maximum(mid - lo, 0), BLOCK_M) + tl.cdiv(tl.maximum(e0 - mid, 0), BLOCK_M)
         + tl.cdiv(tl.maximum(hi - e0, 0), BLOCK_M))
    tl.store(COUNT + b * tl.num_programs(0) + tl.program_id(0), n)


def _tiles(layout, T, blocks, device, count_kernel):
    # -> (tiles the kernel visits, tiles holding at least one visible pair: the least any tiling can visit)
    BM, BN = blocks
    lay = grouped_layout(layout).to(device=device, dtype=torch.int32).contiguous()
    grid = (triton.cdiv(T, BM if count_kernel is _count_key_tiles else BN), lay.shape[0])
    count = torch.zeros(grid[1], grid[0], dtype=torch.int32, device=device)
    count_kernel[grid](lay, (lay.shape[1] - 1) // 3, count, T, BLOCK_M=BM, BLOCK_N=BN)
    Tp = triton.cdiv(T, BM * BN) * BM * BN  # padded so the mask splits into whole tiles
    mask = layout_mask(layout, Tp)[:, 0].view(-1, Tp // BM, BM, Tp // BN, BN)
    return int(count.sum()), int(mask.any(4).any(2).sum())


def _bench_tiles(device, S=6273, k=4, nq=50, nc=250, nr=250, D=128):
    # issue 15's shape (LLaVA-OneVision, 32 frames: 32*196+1 video tokens; 4 pairs per video) at the CUDA bf16 tiles
    cfg = _attn_config(D, torch.device("cuda"), torch.bfloat16)
    rows = {  # name -> (layout, T)
        f"grouped row [S | q c r] x {k}": ([[S] + [nq, nc, nr] * k], S + k * (nq + nc + nr)),
        "causal over the same row": ([[S + k * (nq + nc + nr)]], S + k * (nq + nc + nr)),
        f"{k} pair rows [S+q, c, r]": ([[S + nq, nc, nr]] * k, S + nq + nc + nr),
        f"{2 * k} duplicated causal rows": ([[S + nq + nc]] * (2 * k), S + nq + nc),
    }
    print(f"attention tiles visited per head, S={S} + {k} x (q {nq}, c {nc}, r {nr}), CUDA bf16 D={D} tiles: "
          f"fwd and dq {cfg['fwd'][0]}x{cfg['fwd'][1]}, dkdv {cfg['dkdv'][0]}x{cfg['dkdv'][1]} "
          f"(least = tiles holding a visible pair)")
    print(f"{'layout':>30} {'tokens':>7} {'fwd/dq tiles':>13} {'least':>7} {'dkdv tiles':>11} {'least':>7} "
          f"{'vs grouped':>10}")
    base = None
    for name, (lay, T) in rows.items():
        lay = torch.tensor(lay)
        fwd, fwd_least = _tiles(lay, T, cfg["fwd"], device, _count_key_tiles)
        bwd, bwd_least = _tiles(lay, T, cfg["dkdv"], device, _count_query_tiles)
        # tile areas differ between the kernels: compare layouts by visited (query, key) area, fwd + dq + dkdv
        area = 2 * fwd * cfg["fwd"][0] * cfg["fwd"][1] + bwd * cfg["dkdv"][0] * cfg["dkdv"][1]
        base = base or area
        print(f"{name:>30} {int(lay.sum()):>7} {fwd:>13} {fwd_least:>7} {bwd:>11} {bwd_least:>7} "
              f"{area / base:>9.2f}x")


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
    out = dict(device=device, dtype=str(dtype), V=V, d=d, peaks=[])
    print(f"fused_logprobs fwd+bwd, {device}, {dtype}, V={V} d={d}")
    print("  peak memory beyond the inputs, one fresh process per entry (the gradients themselves are included)")
    for N in Ns:
        peak = {}
        for impl in ("naive", "fused"):
            cmd = [sys.executable, os.path.abspath(__file__), "--peak", impl, str(N), str(V), str(d), device,
                   str(dtype).split(".")[1]]
            peak[impl] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        out["peaks"].append(dict(N=N, naive_bytes=peak["naive"], fused_bytes=peak["fused"], grads_bytes=grads(N),
                                 ratio_beyond_grads=(peak["fused"] - grads(N)) / max(1, peak["naive"] - grads(N))))
        mib = lambda x: f"{x / 2**20:.0f} MiB"
        print(f"  N={N:>5}: naive {mib(peak['naive'])}, fused {mib(peak['fused'])} "
              f"({peak['fused'] / max(1, peak['naive']):.3f}x);"
              f" beyond the {mib(grads(N))} of grads: naive {mib(peak['naive'] - grads(N))}, fused "
              f"{mib(peak['fused'] - grads(N))} ({out['peaks'][-1]['ratio_beyond_grads']:.3f}x)")
    inputs = _logprobs_inputs(N_time, V, d, device, dtype)
    best = {"naive": float("inf"), "fused": float("inf")}
    for _ in range(rounds):  # interleaved in one process so that load from other jobs hits both alike
        for impl in best:
            t0 = time.perf_counter()
            _logprobs_step(impl, *inputs)
            best[impl] = min(best[impl], time.perf_counter() - t0)
    print(f"  time N={N_time}, best of {rounds} interleaved: naive {best['naive']:.3f} s, fused {best['fused']:.3f} s "
          f"({best['fused'] / best['naive']:.2f}x)")
    out.update(N_time=N_time, naive_s=best["naive"], fused_s=best["fused"], time_ratio=best["fused"] / best["naive"])
    return out


def main():
    import sys
    if len(sys.argv) > 1 and sys.argv[1] == "--peak":  # the fresh-process half of _bench_logprobs
        impl, N, V, d, device, dtype = sys.argv[2:8]
        print(_logprobs_peak_child(impl, int(N), int(V), int(d), device, getattr(torch, dtype)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--tiles":  # on CPU: run with TRITON_INTERPRET=1
        _bench_tiles("cuda" if torch.cuda.is_available() else "cpu")
        return
    if torch.cuda.is_available():
        if not _check_parity()[0]:
            sys.exit("parity check failed on CUDA: the numbers below would be for wrong kernels, so none are taken")
        _bench_tiles("cuda")
        _bench_attention()
        _bench_logprobs("cuda", Ns=(4096,), N_time=4096, dtype=torch.bfloat16, rounds=5)
    else:
        print("no CUDA device: the Triton kernels are benchmarked on GPUs only; their tile counts and CPU paths below")
        import subprocess
        subprocess.run([sys.executable, os.path.abspath(__file__), "--tiles"], check=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
        _bench_attention_cpu()
        _bench_logprobs("cpu", Ns=(256, 1024), N_time=256)


if __name__ == "__main__":
    main()
