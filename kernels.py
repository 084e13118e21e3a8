"""
Triton kernels, each beside a pure-PyTorch reference of the same signature:

    attention(q, k, v, causal=True, layout=None) -> o          # fused attention, fwd + bwd, GQA, prefix-shared pairs
    fused_logprobs(hidden, weight, targets) -> logp (N,) fp32   # log p(target) without materializing (N, V) logits

Dispatch: CUDA tensors -> Triton; CPU tensors -> the PyTorch reference; with TRITON_INTERPRET=1 set *before this
module is imported* (Triton decides at decoration time) CPU tensors run the Triton kernels in the interpreter (tests).

The layout rule (one int row [P, C, R] per batch row) covers causal LM, right padding and preference pairs that share a
prompt: key j is visible to query i iff
    j <= i  and  i < P+C+R  and  not (i >= P+C and P <= j < P+C)
i.e. the prefix and first branch are plain causal, the second branch sees the prefix and itself but never the first
branch, and index >= P+C+R is padding (output exactly 0, never attended). A plain causal row is [len, 0, 0].

`python kernels.py` runs the benchmark in tests/bench_kernels.py (CUDA: a parity check, then attention TFLOP/s and
fused_logprobs; CPU: the reference paths).
"""
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# decided once, as triton.jit itself does: kernels decorated under TRITON_INTERPRET=1 run interpreted on CPU tensors
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) == exp2(x * LOG2E); the kernels work in base 2
IGNORE_INDEX = -100  # a target of -100 gives logp 0 and no gradient (padding in dpo.py)


def _use_triton(t):
    return t.is_cuda or _INTERPRET


# -----------------------------------------------------------------------------
# attention: reference (the CPU path, and the documentation of the maths)

def layout_mask(layout, T, device=None):
    """layout (B, 3) int [P, C, R] -> bool (B, 1, T, T), True where query i may attend key j (the rule above)."""
    layout = layout.to(device=device, dtype=torch.long)
    P, C, R = (layout[:, k].view(-1, 1, 1, 1) for k in range(3))
    i = torch.arange(T, device=device).view(1, 1, T, 1)  # query index
    j = torch.arange(T, device=device).view(1, 1, 1, T)  # key index
    second_branch_row = (i >= P + C) & (i < P + C + R)
    first_branch_key = (j >= P) & (j < P + C)
    return (j <= i) & (i < P + C + R) & ~(second_branch_row & first_branch_key)


def _check_attention_args(q, k, v, causal, layout):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"attention expects q (B, Hq, T, D) and k, v (B, Hkv, T, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"attention needs q and k/v with the same batch, length and head dim; got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)} (decode with a KV cache belongs to F.scaled_dot_product_attention)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]}) for GQA")
    if layout is not None:
        if not causal:
            raise ValueError("layout [P, C, R] is a causal rule; pass causal=True or layout=None")
        if layout.shape != (B, 3) or layout.dtype.is_floating_point:
            raise ValueError(f"layout must be an int tensor of shape ({B}, 3) holding [P, C, R] per row; "
                             f"got {layout.dtype} {tuple(layout.shape)}")
        # checking values needs the host; on CUDA we skip it (no sync per layer) and the kernel clamps to T instead
        if not layout.is_cuda and (bool((layout < 0).any()) or bool((layout.sum(1) > T).any())):
            raise ValueError(f"layout rows [P, C, R] must be >= 0 with P+C+R <= T={T}; got {layout.tolist()}")


def attention_ref(q, k, v, causal=True, layout=None):
    """Reference attention on SDPA with GQA (no repeated K/V). q (B, Hq, T, D), k/v (B, Hkv, T, D) -> o (B, Hq, T, D);
    scale D**-0.5; padding rows are exactly 0. With a layout each row runs as the rule's two pieces: prefix + first
    branch is one plain causal block (no mask), and the second branch attends [prefix | itself] through a small
    (R, P+R) mask. Same maths as masking with `layout_mask`, without the dense (T, T) mask: on CPU a mask costs SDPA
    1.45x fwd+bwd (`python kernels.py`), and the chosen x rejected block is never computed."""
    _check_attention_args(q, k, v, causal, layout)
    gqa = q.shape[1] != k.shape[1]
    T = q.shape[2]
    if layout is not None and not layout.is_cuda and bool((layout[:, 0] == T).all()):
        layout = None  # every row is [T, 0, 0]: one batched plain causal call
    if layout is None:  # the plain fast path: no mask tensor at all
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    rows = []
    for b, (P, C, R) in enumerate(layout.tolist()):
        qb, kb, vb = q[b:b + 1], k[b:b + 1], v[b:b + 1]  # (1, H, T, D)
        PC = P + C
        parts = []
        if PC:
            parts.append(F.scaled_dot_product_attention(qb[:, :, :PC], kb[:, :, :PC], vb[:, :, :PC], is_causal=True,
                                                        enable_gqa=gqa))
        if R:
            keys, values = (torch.cat([x[:, :, :P], x[:, :, PC:PC + R]], dim=2) for x in (kb, vb))  # (1, H, P+R, D)
            sees = torch.ones(R, P + R, dtype=torch.bool, device=q.device).tril(diagonal=P)  # all of P, branch <= i
            parts.append(F.scaled_dot_product_attention(qb[:, :, PC:PC + R], keys, values, attn_mask=sees,
                                                        enable_gqa=gqa))
        if T > PC + R:
            parts.append(q.new_zeros(1, q.shape[1], T - PC - R, q.shape[3]))  # padding rows: exactly 0
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


# -----------------------------------------------------------------------------
# attention: Triton kernels. Grid (query or key tiles, batch*heads); fp32 accumulation; the head dim is padded to
# the next power of two (72 -> 128) with masked loads; scores live in base 2 (qk_scale = D**-0.5 * LOG2E).
# Masked scores get -1e6 rather than -inf so a tile that is fully masked for some row keeps finite statistics; the
# first real key of that row rescales them away (alpha = exp2(-1e6 - s) == 0).

@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (interpreter only): Triton 3.9's interpreter multiplies bf16 tiles as raw integers, so feed it fp32.
    # Same numbers as a tensor-core bf16 dot: bf16 x bf16 products are exact in fp32, accumulation is fp32.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, offs_m, offs_d, lo, hi, P, PC, qk_scale,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # keys [lo, hi) for one query tile; MASKED applies the causal + branch rule (diagonal / straddling tiles only)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        qk = _dot(q, tl.trans(k), None, PREC, UPCAST) * qk_scale  # (BM, BN)
        keep = offs_n[None, :] < hi
        if MASKED:
            second = offs_m[:, None] >= PC
            first_key = (offs_n[None, :] >= P) & (offs_n[None, :] < PC)
            keep = keep & (offs_n[None, :] <= offs_m[:, None]) & ~(second & first_key)
        qk = tl.where(keep, qk, -1.0e6)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _load_layout(LAYOUT, b, T, HAS_LAYOUT: tl.constexpr):
    # -> P, P+C, P+C+R clamped to T (out-of-range layouts cannot read out of bounds)
    if HAS_LAYOUT:
        P = tl.load(LAYOUT + b * 3).to(tl.int32)
        C = tl.load(LAYOUT + b * 3 + 1).to(tl.int32)
        R = tl.load(LAYOUT + b * 3 + 2).to(tl.int32)
        return tl.minimum(P, T), tl.minimum(P + C, T), tl.minimum(P + C + R, T)
    else:
        return T, T, T


@triton.jit
def _key_ranges(m0, BLOCK_M: tl.constexpr, P, PC, L, CAUSAL: tl.constexpr):
    # the key tiles one query tile [m0, m0+BLOCK_M) needs: unmasked [0, a1) and [b0, b1), masked [c0, c1).
    # A tile wholly in the second branch skips the first branch's keys [P, P+C) (the saving prefix sharing buys);
    # a prefix / first-branch tile is plain causal; the one tile that straddles P+C applies the full rule;
    # a tile made only of padding rows computes nothing. Non-causal: every key, unmasked.
    if CAUSAL:
        q_end = tl.minimum(m0 + BLOCK_M, L)  # keys at or past q_end are invisible to the whole tile
        live = m0 < L
        second = live & (m0 >= PC)
        plain = live & (q_end <= PC)
        a1 = tl.where(second, P, tl.where(plain, m0, 0))
        b1 = tl.where(second, m0, PC)
        c0 = tl.where(second | plain, m0, 0)
        return a1, PC, b1, c0, tl.where(live, q_end, 0)
    else:
        return L, 0, 0, 0, 0


@triton.jit
def _query_ranges(n0, BLOCK_N: tl.constexpr, P, PC, L, CAUSAL: tl.constexpr):
    # the query rows that see key tile [n0, n0+BLOCK_N): masked [lo, mid), unmasked [mid, hi). First-branch keys are
    # read by rows < P+C only, prefix and second-branch keys by rows < P+C+R; only the diagonal rows need the mask,
    # except for a key tile that straddles P or P+C (masked throughout). Padding keys: no rows, zero gradient.
    if CAUSAL:
        k_end = tl.minimum(n0 + BLOCK_N, L)
        live = n0 < L
        first = (n0 >= P) & (k_end <= PC)
        clean = (k_end <= P) | (n0 >= PC) | first
        hi = tl.where(first, PC, L)
        mid = tl.where(clean, tl.minimum(n0 + BLOCK_N, hi), hi)
        return n0, tl.where(live, mid, n0), tl.where(live, hi, n0)
    else:
        return 0, 0, L


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, LAYOUT, qk_scale, T, H, G,
              sqb, sqh, sqt, skb, skh, skt, sob, soh, sot,
              HAS_LAYOUT: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)  # int64: b * stride passes 2**31 elements on long batches
    h = tl.program_id(1) % H
    P, PC, L = _load_layout(LAYOUT, b, T, HAS_LAYOUT)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)  # (BM, BD)
    K += b * skb + (h // G) * skh  # GQA by index: query head h reads kv head h // G
    V += b * skb + (h // G) * skh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    a1, b0, b1, c0, c1 = _key_ranges(m0, BLOCK_M, P, PC, L, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, offs_m, offs_d, 0, a1, P, PC, qk_scale,
                               D, BLOCK_N, False, PREC, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, offs_m, offs_d, b0, b1, P, PC, qk_scale,
                               D, BLOCK_N, False, PREC, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, offs_m, offs_d, c0, c1, P, PC, qk_scale,
                               D, BLOCK_N, True, PREC, UPCAST)
    row_ok = offs_m < L
    l_safe = tl.where(row_ok, l_i, 1.0)
    o = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(row_ok, m_i + tl.log2(l_safe), 0.0)  # base-2 log-sum-exp of the scaled scores, per row
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    tl.store(LSE + tl.program_id(1) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, offs_m, offs_d, lo, hi, P, PC, L, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), None, PREC, UPCAST) * qk_scale
        keep = (offs_n[None, :] < hi) & (offs_m[:, None] < L)
        if MASKED:
            second = offs_m[:, None] >= PC
            first_key = (offs_n[None, :] >= P) & (offs_n[None, :] < PC)
            keep = keep & (offs_n[None, :] <= offs_m[:, None]) & ~(second & first_key)
        p = tl.where(keep, tl.exp2(qk - lse[:, None]), 0.0)  # softmax recomputed from the saved LSE
        dp = _dot(do, tl.trans(v), None, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PREC, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, LAYOUT, qk_scale, sm_scale, T, H, G,
                 sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt,
                 HAS_LAYOUT: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    # one query tile of one head
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)  # int64: b * stride passes 2**31 elements on long batches
    h = tl.program_id(1) % H
    P, PC, L = _load_layout(LAYOUT, b, T, HAS_LAYOUT)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qd_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + tl.program_id(1) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + tl.program_id(1) * T + offs_m, mask=offs_m < T, other=0.0)
    K += b * skb + (h // G) * skh
    V += b * skb + (h // G) * skh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    a1, b0, b1, c0, c1 = _key_ranges(m0, BLOCK_M, P, PC, L, CAUSAL)  # exactly the forward's tiles
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, offs_m, offs_d, 0, a1, P, PC, L, qk_scale,
                   D, BLOCK_N, False, PREC, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, offs_m, offs_d, b0, b1, P, PC, L, qk_scale,
                   D, BLOCK_N, False, PREC, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, offs_m, offs_d, c0, c1, P, PC, L, qk_scale,
                   D, BLOCK_N, True, PREC, UPCAST)
    dq = dq * sm_scale  # s = sm_scale * q.k, so ds/dq = sm_scale * k
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=qd_mask)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dt, offs_n, offs_d, lo, hi, P, PC, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # query rows [lo, hi) against one key tile, computed transposed: (BN, BM) score tiles
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT_mask = (offs_d[:, None] < D) & (offs_m[None, :] < hi)
        qT = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=qT_mask, other=0.0)  # (BD, BM)
        lse = tl.load(LSE + offs_m, mask=offs_m < hi, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=offs_m < hi, other=0.0)
        qkT = _dot(k, qT, None, PREC, UPCAST) * qk_scale  # (BN, BM)
        keep = offs_m[None, :] < hi
        if MASKED:
            second = offs_m[None, :] >= PC
            first_key = (offs_n[:, None] >= P) & (offs_n[:, None] < PC)
            keep = keep & (offs_n[:, None] <= offs_m[None, :]) & ~(second & first_key)
        pT = tl.where(keep, tl.exp2(qkT - lse[None, :]), 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dt + offs_d[None, :],
                     mask=(offs_m[:, None] < hi) & (offs_d[None, :] < D), other=0.0)  # (BM, BD)
        dv = _dot(pT.to(do.dtype), do, dv, PREC, UPCAST)
        dpT = _dot(v, tl.trans(do), None, PREC, UPCAST)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, LAYOUT, qk_scale, sm_scale, T, H, G,
                   sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt,
                   HAS_LAYOUT: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    # one key tile of one kv head; loops over the G query heads that share it (GQA without atomics) and over the
    # query rows that can see it (_query_ranges)
    pid_n = tl.program_id(0)
    b = (tl.program_id(1) // (H // G)).to(tl.int64)
    hk = tl.program_id(1) % (H // G)
    P, PC, L = _load_layout(LAYOUT, b, T, HAS_LAYOUT)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kd_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, mid, hi = _query_ranges(n0, BLOCK_N, P, PC, L, CAUSAL)
    for g in range(G):
        h = hk * G + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        LSEh = LSE + (b * H + h) * T
        DELTAh = DELTA + (b * H + h) * T
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdt, offs_n, offs_d, lo, mid, P, PC,
                             qk_scale, D, BLOCK_M, True, PREC, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, sqt, sdt, offs_n, offs_d, mid, hi, P, PC,
                             qk_scale, D, BLOCK_M, False, PREC, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kd_mask)
    tl.store(DV + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


def _attn_config(D, device, dtype):
    # (BLOCK_M, BLOCK_N) per kernel and launch options. Under the interpreter: the smallest tiles tl.dot allows,
    # so tiny test shapes still cross several tiles. On CUDA: Triton-tutorial sizes, not tuned on a GPU yet; fp32
    # (parity checks only) gets half-size tiles so its doubled shared-memory footprint still fits.
    if device.type != "cuda":
        return dict(fwd=(16, 16), dq=(16, 16), dkdv=(16, 16), opts={})
    if dtype == torch.float32:
        return dict(fwd=(64, 32), dq=(64, 32), dkdv=(32, 64), opts=dict(num_warps=4, num_stages=2))
    big = triton.next_power_of_2(D) > 64
    return dict(fwd=(128, 64), dq=(128, 32), dkdv=(32, 128),
                opts=dict(num_warps=8 if big else 4, num_stages=3 if big else 4))


def _prec(dtype):
    # fp32 inputs must not silently drop to tf32 (1e-3 error) on GPU: fp32 is the parity-test dtype
    return "ieee" if dtype == torch.float32 else "tf32"


def _attn_forward(q, k, v, causal, layout):
    B, H, T, D = q.shape
    G = H // k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # base 2
    cfg = _attn_config(D, q.device, q.dtype)
    BM, BN = cfg["fwd"]
    lay = layout if layout is not None else lse  # a dummy pointer, never read when HAS_LAYOUT is False
    _attn_fwd[(triton.cdiv(T, BM), B * H)](
        q, k, v, o, lse, lay, D ** -0.5 * LOG2E, T, H, G,
        *q.stride()[:3], *k.stride()[:3], *o.stride()[:3],
        HAS_LAYOUT=layout is not None, CAUSAL=causal, D=D, BLOCK_M=BM, BLOCK_N=BN,
        BLOCK_D=triton.next_power_of_2(D), PREC=_prec(q.dtype), UPCAST=_INTERPRET, **cfg["opts"])
    return o, lse


def _attn_backward(q, k, v, o, lse, do, causal, layout):
    B, H, T, D = q.shape
    G = H // k.shape[1]
    delta = (o.float() * do.float()).sum(-1)  # (B, H, T) rowsum(dO * O), the softmax-backward correction
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _attn_config(D, q.device, q.dtype)
    lay = layout if layout is not None else lse
    common = dict(HAS_LAYOUT=layout is not None, CAUSAL=causal, D=D, BLOCK_D=triton.next_power_of_2(D),
                  PREC=_prec(q.dtype), UPCAST=_INTERPRET, **cfg["opts"])
    strides = (*q.stride()[:3], *k.stride()[:3], *do.stride()[:3])
    BM, BN = cfg["dq"]
    _attn_bwd_dq[(triton.cdiv(T, BM), B * H)](q, k, v, do, dq, lse, delta, lay, D ** -0.5 * LOG2E, D ** -0.5,
                                              T, H, G, *strides, BLOCK_M=BM, BLOCK_N=BN, **common)
    BM, BN = cfg["dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(T, BN), B * (H // G))](q, k, v, do, dk, dv, lse, delta, lay, D ** -0.5 * LOG2E,
                                                       D ** -0.5, T, H, G, *strides, BLOCK_M=BM, BLOCK_N=BN,
                                                       **common)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, layout):
        # contiguous (B, H, T, D): k and v then share strides, and dq/dk/dv mirror q/k/v
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        layout = layout.to(device=q.device, dtype=torch.int32).contiguous() if layout is not None else None
        o, lse = _attn_forward(q, k, v, causal, layout)
        ctx.save_for_backward(q, k, v, o, lse, layout)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, layout = ctx.saved_tensors
        dq, dk, dv = _attn_backward(q, k, v, o, lse, do.contiguous(), ctx.causal, layout)
        return dq, dk, dv, None, None


def attention(q, k, v, causal=True, layout=None):
    """Fused attention. q (B, Hq, T, D), k/v (B, Hkv, T, D) with Hq % Hkv == 0 -> o (B, Hq, T, D), q's dtype.
    causal=False: bidirectional (vision tower). layout (B, 3) int [P, C, R]: the prefix-sharing rule in the module
    docstring (padding rows come out exactly 0). Scale D**-0.5. CUDA -> Triton, CPU -> attention_ref."""
    _check_attention_args(q, k, v, causal, layout)
    if not _use_triton(q):
        return attention_ref(q, k, v, causal, layout)
    return _Attention.apply(q, k, v, causal, layout)


# -----------------------------------------------------------------------------
# fused_logprobs: log p(target) = logit[target] - logsumexp(logits), in row chunks of (chunk, V) logits.
# Forward: one matmul per chunk + one pass for LSE and the target logit; only logp and LSE (N,) are kept.
# Backward recomputes each chunk's logits (a 4th matmul against the naive 3, the price of never holding N x V) and
# overwrites them with dlogp/dlogits = g * (onehot(target) - softmax), then grad_h = G @ W and grad_W += G.T @ h.

@triton.jit
def _logp_fwd_kernel(LOGITS, TARGETS, LOGP, LSE, V, stride_row, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    # one row of a chunk: online log-sum-exp over the vocabulary in BLOCK_V slices, fp32
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)  # running max (a scalar)
    s = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)  # running sum of exp(x - m)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp2((m - m_new) * 1.4426950408889634) + tl.sum(tl.exp2((x - m_new) * 1.4426950408889634), 0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(TARGETS + row)
    x_t = tl.load(base + tl.maximum(t, 0)).to(tl.float32)  # clamped: an ignored row reads logit 0, discarded
    tl.store(LOGP + row, tl.where(t != IGNORE, x_t - lse, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _logp_bwd_kernel(LOGITS, GRAD, TARGETS, LSE, DLOGP, V, stride_row, stride_grad, BLOCK_V: tl.constexpr):
    # GRAD[row] = dlogp * (onehot(target) - exp(logits - lse)); GRAD may alias LOGITS (fp32: truly in place).
    # Ignored rows arrive with dlogp = 0 and a clamped target, so they write zeros.
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    gbase = GRAD + row.to(tl.int64) * stride_grad
    lse = tl.load(LSE + row)
    g = tl.load(DLOGP + row)
    t = tl.load(TARGETS + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
        grad = tl.where(offs == t, g, 0.0) - g * tl.exp2((x - lse) * 1.4426950408889634)
        tl.store(gbase + offs, grad.to(GRAD.dtype.element_ty), mask=offs < V)


def _chunk_logits(h, weight, buf):
    # (n, d) x (V, d) -> (n, V) fp32. On CUDA cuBLAS keeps its fp32 accumulator (no bf16 rounding of logits). On
    # CPU fp32 the chunks reuse one buffer: a fresh 64 MiB allocation per chunk is returned to the OS and page-faulted
    # back every time (measured: ~20% of the CPU run was system time before this).
    if h.dtype == torch.float32:
        return torch.mm(h, weight.T, out=buf[:h.shape[0]]) if buf is not None else h @ weight.T
    if h.is_cuda:
        try:
            return torch.mm(h, weight.T, out_dtype=torch.float32)
        except TypeError:  # torch without mm(out_dtype=): bf16 logits, upcast (costs ~2**-9 relative on each logit)
            pass
    return (h @ weight.T).float()


def _logits_buffer(hidden, weight, chunk):
    if hidden.is_cuda or hidden.dtype != torch.float32:
        return None  # the CUDA caching allocator already reuses memory
    return torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=torch.float32)


def _chunk_logp(logits, targets):
    # -> logp (n,), lse (n,) for one chunk; targets already validated, IGNORE_INDEX allowed
    n, V = logits.shape
    if _use_triton(logits):
        logp, lse = torch.empty(n, device=logits.device), torch.empty(n, device=logits.device)
        _logp_fwd_kernel[(n,)](logits, targets, logp, lse, V, logits.stride(0), IGNORE=IGNORE_INDEX,
                               BLOCK_V=min(4096, triton.next_power_of_2(V)))
        return logp, lse
    lse = torch.logsumexp(logits, dim=-1)
    ignore = targets == IGNORE_INDEX
    x_t = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(ignore, 0.0, x_t - lse), lse


def _chunk_grad_logits(logits, targets, lse, dlogp, dtype):
    # overwrite a chunk's fp32 logits with dlogp/dlogits; returned in `dtype` for the matmuls
    n, V = logits.shape
    dlogp = torch.where(targets == IGNORE_INDEX, 0.0, dlogp.float())
    t = targets.clamp(min=0)
    if _use_triton(logits):
        grad = logits if dtype == torch.float32 else torch.empty(n, V, device=logits.device, dtype=dtype)
        _logp_bwd_kernel[(n,)](logits, grad, t, lse, dlogp, V, logits.stride(0), grad.stride(0),
                               BLOCK_V=min(4096, triton.next_power_of_2(V)))
        return grad
    grad = logits.sub_(lse[:, None]).exp_().mul_(-dlogp[:, None])
    grad[torch.arange(n, device=grad.device), t] += dlogp
    return grad.to(dtype)


def _default_chunk(V, device):
    # rows per chunk so one fp32 logits chunk is ~256 MiB on CUDA (~440 rows at V=151936: large enough that the
    # matmuls stay efficient) and ~128 MiB on CPU (~220 rows; measured at N=256, V=151936, d=3584 on 2 cores:
    # 110-row chunks ran 1.53x naive's time, one 256-row chunk 1.20x, as the CPU GEMM slows down below ~200 rows)
    budget = 2 ** 28 if device.type == "cuda" else 2 ** 27
    return max(1, budget // (4 * V))


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        N = hidden.shape[0]
        logp = torch.empty(N, device=hidden.device, dtype=torch.float32)
        lse = torch.empty(N, device=hidden.device, dtype=torch.float32)
        buf = _logits_buffer(hidden, weight, chunk)
        for i in range(0, N, chunk):
            logits = _chunk_logits(hidden[i:i + chunk], weight, buf)  # (chunk, V) fp32: the only large buffer
            logp[i:i + chunk], lse[i:i + chunk] = _chunk_logp(logits, targets[i:i + chunk])
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # grad_W accumulates over chunks in weight's dtype (an fp32 copy would cost V x d x 4 bytes, more than
        # every logits chunk together); one addmm per chunk keeps fp32 accumulation inside each matmul
        grad_w = torch.empty_like(weight) if need_w else None
        buf = _logits_buffer(hidden, weight, ctx.chunk)
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i:i + ctx.chunk]
            logits = _chunk_logits(h, weight, buf)
            g = _chunk_grad_logits(logits, targets[i:i + ctx.chunk], lse[i:i + ctx.chunk],
                                   dlogp[i:i + ctx.chunk], hidden.dtype)  # (chunk, V)
            if need_h:
                torch.mm(g, weight, out=grad_h[i:i + ctx.chunk])
            if need_w and i == 0:
                torch.mm(g.T, h, out=grad_w)  # the first chunk initializes: no V x d memset
            elif need_w:
                grad_w.addmm_(g.T, h)
            del logits, g
        return grad_h, grad_w, None, None


def _check_logprobs_args(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_logprobs expects hidden (N, d) and weight (V, d); got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be an int tensor of shape ({hidden.shape[0]},); got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one")
    V = weight.shape[0]
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= V)
    if bool(bad.any()):  # one host sync per call (not per layer): a wrong target would read out of bounds
        raise ValueError(f"targets must lie in [0, {V}) or equal {IGNORE_INDEX} (ignore); got "
                         f"{targets[bad][:5].tolist()}")


def fused_logprobs_ref(hidden, weight, targets):
    """Naive reference: materializes the (N, V) fp32 logits. Same contract as fused_logprobs."""
    _check_logprobs_args(hidden, weight, targets)
    logp = torch.log_softmax(hidden.float() @ weight.float().T, dim=-1)
    logp = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets == IGNORE_INDEX, 0.0, logp)


def fused_logprobs(hidden, weight, targets, chunk_size=None):
    """log softmax(hidden @ weight.T)[n, targets[n]] -> (N,) float32, differentiable in hidden and weight.
    hidden (N, d), weight (V, d), targets (N,) int in [0, V) or -100 (ignored: logp 0, no gradient).
    Never allocates N x V: rows go in chunks of `chunk_size` (default: equal chunks of at most ~256 MiB of fp32
    logits on CUDA, ~128 MiB on CPU), so extra memory is O(chunk_size x V) -- one fp32 chunk, plus one chunk in
    hidden's dtype in backward when that is not fp32 -- besides the (N,) LSE and the gradients themselves.
    CUDA / interpreter: the per-chunk LSE / gradient pass is a Triton kernel, the matmuls stay on cuBLAS;
    CPU: the same chunks in PyTorch."""
    _check_logprobs_args(hidden, weight, targets)
    chunk = chunk_size
    if chunk is None:  # equal chunks under the budget: no small tail chunk, which the GEMMs run inefficiently
        N = hidden.shape[0]
        n_chunks = max(1, -(-N // _default_chunk(weight.shape[0], hidden.device)))
        chunk = max(1, -(-N // n_chunks))
    return _FusedLogprobs.apply(hidden, weight, targets, chunk)


if __name__ == "__main__":
    # the benchmark (CUDA: parity check first, then TFLOP/s and memory; CPU: the reference paths) lives with the
    # project's other benchmark scripts in tests/
    import runpy
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "bench_kernels.py"),
                   run_name="__main__")
