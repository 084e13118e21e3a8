"""
kernels.py against fp64 oracles written out naively here: attention (the Triton kernels under the Triton CPU
interpreter, and the SDPA reference that is the CPU path) and fused_logprobs (Triton per-chunk kernels under the
interpreter, and the chunked PyTorch CPU path). Outputs and every gradient, tiny odd shapes, GQA, mixed [P, C, R]
and grouped [S, q1, c1, r1, ...] layouts with padding and empty parts, bf16 and fp32, at the interpreter's 16x16 tiles
and at the CUDA tile sizes; plus the prefix-sharing invariant (a grouped row equals its branches as causal rows).

Run: .venv/bin/python -m pytest -q tests/test_kernels.py   (~3.5 min on 2 cores; shapes stay tiny for the interpreter)
"""
import os
import subprocess
import sys

import pytest
import torch

import kernels

KERNELS_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels.py")


# Triton decides interpreted-or-compiled when @triton.jit decorates, including for its own standard library, so
# the interpreter needs TRITON_INTERPRET=1 before triton is first imported. The Triton tests (names containing
# "triton") therefore run in a child pytest that test_kernels_under_interpreter_in_child_process starts with it set;
# run them directly with: TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_kernels.py -k triton
INTERPRETED = kernels._INTERPRET
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter run")
def test_kernels_under_interpreter_in_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(KERNELS_PY), timeout=1500)
    tail = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"Triton tests under the interpreter failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def tol(dtype):
    """Normwise relative tolerance: ||got - want||_F <= tol * max(||want||_F, sqrt(numel)).
    fp32 results are limited by fp32 accumulation over reductions of length ~T*D (<= 130*128 here): a random-walk
    bound of sqrt(T*D) ~ 2**7 ulps. bf16 results are limited by one rounding of P, dS and the output to bf16: 1 ulp.
    The sqrt(numel) floor is the size of O(1) entries (inputs here are O(1)) and only matters where the true value
    vanishes, e.g. dq == 0 when T == 1."""
    eps = torch.finfo(dtype).eps
    return eps * (2 ** 7 if dtype == torch.float32 else 1)


def assert_close(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    diff = got.double() - want.double()
    scale = max(want.double().norm().item(), want.numel() ** 0.5)
    assert diff.norm().item() <= tol(dtype) * scale, (
        f"{what}: relative error {diff.norm().item() / scale:.3e} > {tol(dtype):.3e} (max |diff| "
        f"{diff.abs().max().item():.3e})")


# -----------------------------------------------------------------------------
# attention oracle: fp64, repeated K/V, masks from the rule spelled out per (i, j)

def parts(row, T):
    """Each index's part of a layout row: ("S",) prefix, ("q" / "c" / "r", branch), or None (padding)."""
    if len(row) == 3:  # a pair [P, C, R] is [P, 0, C, R]
        row = [row[0], 0, row[1], row[2]]
    labels = [("S",)] * row[0]
    for b in range((len(row) - 1) // 3):
        for name, n in zip("qcr", row[1 + 3 * b:4 + 3 * b]):
            labels += [(name, b)] * n
    return labels + [None] * (T - len(labels))


def allowed(i, j, part_i, part_j):
    if part_i is None or j > i:  # padding queries see nothing; causal
        return False
    if part_j == ("S",):  # every real query sees the prefix before it
        return True
    # otherwise same branch, and a key in the branch's query or in the query's own part (never chosen from rejected)
    return part_i[1] == part_j[1] and (part_j[0] == "q" or part_j[0] == part_i[0])


def oracle_mask(layout, T):
    masks = []
    for row in layout.tolist():
        p = parts(row, T)
        masks.append([[allowed(i, j, p[i], p[j]) for j in range(T)] for i in range(T)])
    return torch.tensor(masks)[:, None]  # (B, 1, T, T)


def naive_attention(q, k, v, causal, layout):
    B, H, T, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    if layout is None:
        layout = torch.tensor([[T]] * B) if causal else None
    if layout is None:
        mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    else:
        mask = oracle_mask(layout, T)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    any_key = mask.any(-1, keepdim=True)  # rows with no visible key (padding) -> output 0
    s = torch.where(mask, s, float("-inf"))
    s = torch.where(any_key, s, 0.0)
    p = torch.softmax(s, dim=-1) * any_key
    return p @ v


def make_layouts(T):
    """Six pair rows [P, C, R] mixing every case: full causal, a padded pair, no prefix, each branch empty, padding."""
    if T == 1:
        return torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    P, C = T // 3, T // 4
    return torch.tensor([[T, 0, 0],
                         [P, C, T - P - C - 1],  # pair + 1 padding token
                         [0, C, T - C - 3],  # no shared prefix
                         [P, C, 0],  # empty second branch + padding
                         [C, 0, T // 2],  # empty first branch + padding
                         [0, 0, 0]])  # padding only


def make_grouped_layouts(T):
    """Seven grouped rows [S, q1, c1, r1, ..., q4, c4, r4] (K = 4; unused branches have length 0): 4 ragged branches
    filling the row, empty queries / chosen / rejected, a pair, a prefix with only padding after it, no prefix, one
    row of padding, and 12 one-token parts (several branches per tile). Lengths are not multiples of any block."""
    if T == 1:
        return torch.tensor([[1] + [0] * 12, [0, 1] + [0] * 11, [0, 0, 1] + [0] * 10, [0, 0, 0, 1] + [0] * 9,
                             [0] * 13, [0] * 12 + [1], [0] * 5 + [1] + [0] * 7])
    u = T // 20  # every row sums to <= 20u <= T
    return torch.tensor([[4 * u + 1, u, 2 * u - 1, 2 * u, u, 2 * u, u, 0, u, 3 * u, u, u, u],  # 4 branches, full
                         [5 * u - 1, u + 1, 3 * u, 0, 2 * u, 0, 3 * u, 0, 0, 0, 0, 0, 0],  # r1 / c2 empty, padding
                         [6 * u + 2, 0, 4 * u, 5 * u - 2] + [0] * 9,  # a pair [P, C, R]: one branch, no query
                         [7 * u + 3] + [0] * 12,  # prefix, then padding only
                         [0, 2 * u, 3 * u, 3 * u, u, u, 2 * u, 0, u, 0, 0, 0, 0],  # no prefix, 3 branches
                         [0] * 13,  # padding only
                         [u] + [1] * 12])  # tiny parts
def make_qkv(B, Hq, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    return q, k, v, do


def check_attention(fn, T, Hq, Hkv, D, dtype, mode):
    causal = mode != "full"
    layout = {"layout": make_layouts, "grouped": make_grouped_layouts}.get(mode, lambda T: None)(T)
    q, k, v, do = make_qkv(len(layout) if layout is not None else 2, Hq, Hkv, T, D, dtype)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    o = fn(*qkv, causal=causal, layout=layout)
    assert o.dtype == dtype and o.shape == q.shape
    grads = torch.autograd.grad(o, qkv, do)
    ref_qkv = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref = naive_attention(*ref_qkv, causal, layout)
    ref_grads = torch.autograd.grad(o_ref, ref_qkv, do.double())
    assert_close(o, o_ref, dtype, "output")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_close(g, r, dtype, f"d{name}")
    if layout is not None:  # padding: output exactly 0, padding keys/queries get exactly zero gradient
        pad = torch.arange(T)[None] >= layout.sum(1, keepdim=True)  # (B, T)
        assert (o.detach()[pad.unsqueeze(1).expand(-1, Hq, -1)] == 0).all()
        for g, H in zip(grads, (Hq, Hkv, Hkv)):
            assert (g[pad.unsqueeze(1).expand(-1, H, -1)] == 0).all()


CASES = [  # (T, Hq, Hkv, D, dtype, mode): every T, GQA 4:1 and 3:1, head dims 64/72/80/128, every mask
    (1, 4, 1, 64, torch.float32, "layout"),
    (17, 3, 1, 72, torch.float32, "layout"),
    (63, 4, 1, 64, torch.float32, "layout"),
    (130, 6, 2, 72, torch.float32, "layout"),
    (17, 4, 1, 64, torch.float32, "causal"),
    (130, 3, 1, 128, torch.float32, "causal"),
    (63, 3, 1, 72, torch.float32, "full"),
    (63, 4, 1, 64, torch.bfloat16, "layout"),
    (130, 3, 1, 72, torch.bfloat16, "layout"),
    (17, 4, 2, 64, torch.bfloat16, "full"),
    (1, 4, 1, 64, torch.float32, "grouped"),
    (37, 3, 1, 72, torch.float32, "grouped"),
    (77, 4, 1, 80, torch.float32, "grouped"),
    (150, 6, 2, 64, torch.float32, "grouped"),
    (77, 4, 2, 128, torch.bfloat16, "grouped"),
    (150, 3, 1, 72, torch.bfloat16, "grouped"),
]


@needs_interpreter
@pytest.mark.parametrize("T,Hq,Hkv,D,dtype,mode", CASES)
def test_triton_attention_matches_fp64(T, Hq, Hkv, D, dtype, mode):
    check_attention(kernels.attention, T, Hq, Hkv, D, dtype, mode)


@pytest.mark.parametrize("T,Hq,Hkv,D,dtype,mode", CASES)
def test_reference_attention_matches_fp64(T, Hq, Hkv, D, dtype, mode):
    check_attention(kernels.attention_ref, T, Hq, Hkv, D, dtype, mode)
    if not kernels._INTERPRET:  # the CPU dispatch of the public op is the reference
        check_attention(kernels.attention, T, Hq, Hkv, D, dtype, mode)


def test_reference_plain_causal_takes_the_fast_path(monkeypatch):
    """layout=None, and a layout whose rows are all [T, 0, 0], are one batched mask-free SDPA call."""
    q, k, v, _ = make_qkv(3, 4, 2, 9, 64, torch.float32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(kernels.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw.get("attn_mask")) or sdpa(*a, **kw))
    assert torch.equal(kernels.attention_ref(q, k, v), want)
    assert torch.equal(kernels.attention_ref(q, k, v, layout=torch.tensor([[9, 0, 0]] * 3)), want)  # all rows full
    assert torch.equal(kernels.attention_ref(q, k, v, layout=torch.tensor([[9, 0, 0, 0]] * 3)), want)
    assert calls == [None, None, None]


@needs_interpreter
@pytest.mark.parametrize("T,Hq,Hkv,D,dtype,mode", [
    (300, 4, 1, 128, torch.bfloat16, "grouped"), (300, 3, 1, 80, torch.float32, "grouped"),
    (200, 4, 2, 64, torch.bfloat16, "layout"), (200, 2, 1, 72, torch.float32, "causal"),
])
def test_triton_attention_at_cuda_tiles(T, Hq, Hkv, D, dtype, mode, monkeypatch):
    """The tile sizes _attn_config picks on CUDA (128/64-wide; num_warps and num_stages are no-ops here), so the
    skipping logic is also checked where a tile spans several parts and branches."""
    config = kernels._attn_config
    monkeypatch.setattr(kernels, "_attn_config", lambda D, device, dtype: config(D, torch.device("cuda"), dtype))
    check_attention(kernels.attention, T, Hq, Hkv, D, dtype, mode)


def test_layout_mask_is_the_rule():
    """kernels.layout_mask (reach form) equals the rule spelled per (i, j), for pair and grouped layouts."""
    for T in (1, 37):
        for layout in (make_layouts(T), make_grouped_layouts(T), torch.tensor([[T]])):
            assert torch.equal(kernels.layout_mask(layout, T), oracle_mask(layout, T)), layout.tolist()


def grouped_vs_causal_rows(fn, row, pad, dtype):
    """A grouped row [S | q1 c1 r1 | ...] (+pad) vs 2K plain causal rows [S q_b c_b] and [S q_b r_b] (layout [n]),
    position-free inputs. Every output of a token equals its output in each causal row that holds it, and its
    gradient is the sum over those rows (its output counted once, in the first row that holds it)."""
    Hq, Hkv, D = 4, 1, 64
    T = sum(row) + pad
    q, k, v, do = make_qkv(1, Hq, Hkv, T, D, dtype, seed=sum(row))
    grouped = [x.clone().requires_grad_() for x in (q, k, v)]
    o = fn(*grouped, layout=torch.tensor([row]))
    g_grouped = torch.autograd.grad(o, grouped, do)
    S, start, rows = row[0], row[0], []
    for b in range((len(row) - 1) // 3):
        nq, nc, nr = row[1 + 3 * b:4 + 3 * b]
        query, c0 = list(range(start, start + nq)), start + nq
        rows.append(list(range(S)) + query + list(range(c0, c0 + nc)))
        rows.append(list(range(S)) + query + list(range(c0 + nc, c0 + nc + nr)))
        start = c0 + nc + nr
    n = max(map(len, rows))
    idx = torch.tensor([r + [-1] * (n - len(r)) for r in rows])  # (2K, n) token index, -1 = padding
    first = torch.zeros_like(idx, dtype=torch.bool)  # where each token's output is counted
    seen = set()
    for r, t in zip(*torch.nonzero(idx >= 0, as_tuple=True)):
        first[r, t] = int(idx[r, t]) not in seen
        seen.add(int(idx[r, t]))
    split = [torch.cat([x[0][:, i.clamp(min=0)].unsqueeze(0) for i in idx]).requires_grad_() for x in (q, k, v)]
    do_split = torch.cat([do[0][:, i.clamp(min=0)].unsqueeze(0) for i in idx]) * first[:, None, :, None]
    o_split = fn(*split, layout=torch.tensor([[len(r)] for r in rows]))
    g_split = torch.autograd.grad(o_split, split, do_split)
    real = idx >= 0
    for r in range(len(rows)):  # outputs: every occurrence
        torch.testing.assert_close(o_split[r][:, real[r]], o[0][:, idx[r][real[r]]], msg=lambda m: f"row {r}: {m}")
    for name, gg, gs in zip("qkv", g_grouped, g_split):
        want = torch.zeros_like(gg[0]).index_add_(1, idx[real], gs.transpose(0, 1)[:, real])  # (H, T, D)
        torch.testing.assert_close(gg[0], want, msg=lambda m: f"d{name}: {m}")
        assert (gg[0, :, sum(row):] == 0).all()


GROUPED_ROWS = [  # (row, pad): a pair (K = 1, empty query) with padding, 3 ragged branches, empty parts, no prefix
    ([37, 0, 21, 30], 5), ([16, 0, 16, 16], 0), ([20, 0, 0, 11], 0),
    ([23, 5, 21, 30, 7, 9, 7, 3, 0, 11], 2), ([0, 2, 9, 7, 1, 1, 1], 3), ([40, 4, 0, 3, 0, 5, 0, 0, 0, 0], 0),
]


@needs_interpreter
@pytest.mark.parametrize("row,pad", GROUPED_ROWS)
def test_grouped_row_invariant_triton(row, pad):
    grouped_vs_causal_rows(kernels.attention, row, pad, torch.float32)


@pytest.mark.parametrize("row,pad", GROUPED_ROWS)
def test_grouped_row_invariant_reference(row, pad):
    grouped_vs_causal_rows(kernels.attention_ref, row, pad, torch.float32)


def test_attention_rejects_bad_input():
    q, k, v, _ = make_qkv(2, 4, 2, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="sum to <= T=8"):
        kernels.attention(q, k, v, layout=torch.tensor([[5, 2, 2], [8, 0, 0]]))
    with pytest.raises(ValueError, match=">= 0"):
        kernels.attention(q, k, v, layout=torch.tensor([[5, 1, -1, 2], [8, 0, 0, 0]]))
    for bad in (torch.tensor([8, 0, 0]), torch.tensor([[8, 0], [8, 0]]), torch.zeros(2, 6, dtype=torch.long)):
        with pytest.raises(ValueError, match="shape \\(2, 1 \\+ 3K\\)"):
            kernels.attention(q, k, v, layout=bad)
    with pytest.raises(ValueError, match="causal=True"):
        kernels.attention(q, k, v, causal=False, layout=torch.tensor([[8, 0, 0]] * 2))
    with pytest.raises(ValueError, match="multiple"):
        kernels.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="KV cache"):
        kernels.attention(q[:, :, :1], k, v)


# -----------------------------------------------------------------------------
# fused_logprobs

def naive_logprobs(hidden, weight, targets):  # fp64 oracle
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    logp = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets == -100, 0.0, logp)


def check_logprobs(fn, N, V, d, chunk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, d, generator=g) * 2).to(dtype)  # logits of a few units, like a trained LM head
    weight = torch.randn(V, d, generator=g).to(dtype) / d ** 0.5 * 2
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100  # ignored rows, including the first
    targets[1] = V - 1  # the last vocabulary entry
    dlogp = torch.randn(N, generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = fn(h, w, targets, chunk_size=chunk) if chunk else fn(h, w, targets)
    assert logp.dtype == torch.float32 and logp.shape == (N,)
    gh, gw = torch.autograd.grad(logp, (h, w), dlogp)
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = naive_logprobs(hd, wd, targets)
    rh, rw = torch.autograd.grad(want, (hd, wd), dlogp.double())
    # the input dtype's tolerance for logp too: a CPU bf16 matmul rounds the logits to bf16 (CUDA keeps fp32)
    assert_close(logp, want, dtype, "logp")
    assert (logp[targets == -100] == 0).all()
    assert_close(gh, rh, dtype, "grad hidden")
    assert_close(gw, rw, dtype, "grad weight")
    assert (gh[targets == -100] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("N,V,d,chunk,dtype", [
    (13, 101, 24, 5, torch.float32),  # chunks 5+5+3
    (13, 101, 24, 1, torch.float32),
    (13, 101, 24, 64, torch.float32),  # one chunk larger than N
    (7, 5003, 17, 3, torch.float32),  # vocabulary spans two BLOCK_V=4096 slices of the online LSE
    (13, 101, 24, 4, torch.bfloat16),
])
def test_fused_logprobs_triton(N, V, d, chunk, dtype):
    check_logprobs(kernels.fused_logprobs, N, V, d, chunk, dtype)


@pytest.mark.parametrize("N,V,d,chunk,dtype", [
    (13, 101, 24, 5, torch.float32), (13, 101, 24, None, torch.float32), (9, 5003, 17, 2, torch.float32),
    (13, 101, 24, 4, torch.bfloat16),
])
def test_fused_logprobs_cpu(N, V, d, chunk, dtype):
    check_logprobs(kernels.fused_logprobs, N, V, d, chunk, dtype)
    if chunk is None:
        check_logprobs(kernels.fused_logprobs_ref, N, V, d, None, dtype)


def test_fused_logprobs_only_needed_grads_and_bad_targets():
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8)  # frozen head
    logp = kernels.fused_logprobs(hidden, weight, torch.tensor([0, 1, 2, -100, 10]), chunk_size=2)
    (gh,) = torch.autograd.grad(logp.sum(), hidden)
    assert gh.shape == hidden.shape and gh[3].abs().sum() == 0
    for bad in ([0, 1, 2, 3, 11], [0, 1, -1, 3, 4]):
        with pytest.raises(ValueError, match="targets must lie in"):
            kernels.fused_logprobs(hidden, weight, torch.tensor(bad))
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.fused_logprobs(hidden, weight.double(), torch.zeros(5, dtype=torch.long))


def test_attention_impl_switch():
    """impl="sdpa" is attention_ref anywhere; "triton" needs CUDA or the interpreter; anything else is an error."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    layout = torch.tensor([[4, 1, 2, 2]])
    assert torch.equal(kernels.attention(q, k, v, True, layout, impl="sdpa"), kernels.attention_ref(q, k, v, True, layout))
    with pytest.raises(ValueError, match="not one of auto, triton, sdpa"):
        kernels.attention(q, k, v, impl="flash")
    if not INTERPRETED:
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            kernels.attention(q, k, v, impl="triton")


@needs_interpreter
def test_triton_self_check_stops_a_wrong_kernel(monkeypatch):
    """The first Triton call per device compares the kernels with attention_ref; a kernel that is off stops the run
    with the switch to use instead (here: outputs nudged by 0.01, as a miscompiled kernel might be)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    real = kernels._Attention.apply
    monkeypatch.setattr(kernels, "_CHECKED", set())
    monkeypatch.setattr(kernels._Attention, "apply", lambda *a: real(*a) + 0.01)
    with pytest.raises(RuntimeError, match="rerun with --attn_impl=sdpa"):
        kernels.attention(q, k, v, impl="triton")
    monkeypatch.setattr(kernels._Attention, "apply", real)
    o = kernels.attention(q, k, v, impl="triton")  # a correct kernel passes the check and runs
    assert "cpu" in kernels._CHECKED and torch.allclose(o, kernels.attention_ref(q, k, v), atol=1e-5)
