"""
kernels.py against fp64 oracles written out naively here: attention (the Triton kernels under the Triton CPU
interpreter, and the SDPA reference that is the CPU path) and fused_logprobs (Triton per-chunk kernels under the
interpreter, and the chunked PyTorch CPU path). Outputs and every gradient, tiny odd shapes, GQA, mixed [P, C, R]
layouts with padding and empty branches, bf16 and fp32; plus the prefix-sharing invariant.

Run: .venv/bin/python -m pytest -q tests/test_kernels.py   (~1 min on 2 cores; shapes stay tiny for the interpreter)
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
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(KERNELS_PY))
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

def allowed(i, j, P, C, R):
    if i >= P + C + R or j > i:  # padding queries see nothing; causal
        return False
    if i >= P + C and P <= j < P + C:  # the second branch never sees the first
        return False
    return True


def naive_attention(q, k, v, causal, layout):
    B, H, T, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    if layout is None:
        layout = torch.tensor([[T, 0, 0]] * B) if causal else None
    if layout is None:
        mask = torch.ones(B, 1, T, T, dtype=torch.bool)
    else:
        mask = torch.tensor([[[allowed(i, j, *row) for j in range(T)] for i in range(T)] for row in layout.tolist()])
        mask = mask[:, None]
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    any_key = mask.any(-1, keepdim=True)  # rows with no visible key (padding) -> output 0
    s = torch.where(mask, s, float("-inf"))
    s = torch.where(any_key, s, 0.0)
    p = torch.softmax(s, dim=-1) * any_key
    return p @ v


def make_layouts(T):
    """Six rows mixing every case: full causal, a padded pair, no prefix, each branch empty, padding only."""
    if T == 1:
        return torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    P, C = T // 3, T // 4
    return torch.tensor([[T, 0, 0],
                         [P, C, T - P - C - 1],  # pair + 1 padding token
                         [0, C, T - C - 3],  # no shared prefix
                         [P, C, 0],  # empty second branch + padding
                         [C, 0, T // 2],  # empty first branch + padding
                         [0, 0, 0]])  # padding only


def make_qkv(B, Hq, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    do = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    return q, k, v, do


def check_attention(fn, T, Hq, Hkv, D, dtype, mode):
    causal = mode != "full"
    layout = make_layouts(T) if mode == "layout" else None
    q, k, v, do = make_qkv(6 if layout is not None else 2, Hq, Hkv, T, D, dtype)
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


CASES = [  # (T, Hq, Hkv, D, dtype, mode): every T, GQA 4:1 and 3:1, head dims 64/72 (+128), all three masks
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
    assert calls == [None, None]


def pair_vs_two_rows(fn, P, C, R, pad, dtype):
    """A pair row [P, C, R] (+pad) vs [prompt|chosen] and [prompt|rejected] as two causal rows, position-free
    inputs. Outputs must agree, and gradients too: the shared prefix gets the sum of both rows' gradients."""
    Hq, Hkv, D = 4, 1, 64
    T = P + C + R + pad
    q, k, v, do = make_qkv(1, Hq, Hkv, T, D, dtype, seed=P + C + R)
    do[:, :, P + C + R:] = 0
    pair = [x.clone().requires_grad_() for x in (q, k, v)]
    o = fn(*pair, layout=torch.tensor([[P, C, R]]))
    g_pair = torch.autograd.grad(o, pair, do)
    chosen = torch.cat([torch.arange(P + C), torch.full((R,), -1)])  # row 1: prompt|chosen, right-padded to P+C+R
    rejected = torch.cat([torch.arange(P), torch.arange(P + C, P + C + R), torch.full((C,), -1)])
    idx = torch.stack([chosen, rejected])  # (2, P+C+R), -1 = padding
    rows = [torch.cat([x[0][:, i.clamp(min=0)].unsqueeze(0) for i in idx]) for x in (q, k, v)]
    rows = [x.clone().requires_grad_() for x in rows]
    do_rows = torch.cat([do[0][:, i.clamp(min=0)].unsqueeze(0) for i in idx])
    do_rows[1, :, :P] = 0  # prefix outputs are counted once (from the first row)
    lens = torch.tensor([[P + C, 0, 0], [P + R, 0, 0]])
    o_rows = fn(*rows, layout=lens)
    g_rows = torch.autograd.grad(o_rows, rows, do_rows)
    sl = slice(P + C, P + C + R)
    torch.testing.assert_close(o[0, :, :P + C], o_rows[0, :, :P + C])
    torch.testing.assert_close(o[0, :, sl], o_rows[1, :, P:P + R])
    for name, gp, gr in zip("qkv", g_pair, g_rows):
        torch.testing.assert_close(gp[0, :, :P], gr[0, :, :P] + gr[1, :, :P], msg=lambda m: f"d{name} prefix: {m}")
        torch.testing.assert_close(gp[0, :, P:P + C], gr[0, :, P:P + C], msg=lambda m: f"d{name} chosen: {m}")
        torch.testing.assert_close(gp[0, :, sl], gr[1, :, P:P + R], msg=lambda m: f"d{name} rejected: {m}")
        assert (gp[0, :, P + C + R:] == 0).all()


@needs_interpreter
@pytest.mark.parametrize("P,C,R,pad", [(37, 21, 30, 5), (16, 16, 16, 0), (0, 9, 7, 2), (20, 0, 11, 0)])
def test_prefix_sharing_invariant_triton(P, C, R, pad):
    pair_vs_two_rows(kernels.attention, P, C, R, pad, torch.float32)


@pytest.mark.parametrize("P,C,R,pad", [(37, 21, 30, 5), (0, 9, 7, 2), (20, 0, 11, 0)])
def test_prefix_sharing_invariant_reference(P, C, R, pad):
    pair_vs_two_rows(kernels.attention_ref, P, C, R, pad, torch.float32)


def test_attention_rejects_bad_input():
    q, k, v, _ = make_qkv(2, 4, 2, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="P\\+C\\+R <= T"):
        kernels.attention(q, k, v, layout=torch.tensor([[5, 2, 2], [8, 0, 0]]))
    with pytest.raises(ValueError, match="shape \\(2, 3\\)"):
        kernels.attention(q, k, v, layout=torch.tensor([8, 0, 0]))
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
