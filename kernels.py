"""
Triton kernels, each beside a pure-PyTorch reference of the same signature:

    attention(q, k, v, causal=True, layout=None) -> o          # fused attention, fwd + bwd, GQA, prefix-shared rows
    fused_logprobs(hidden, weight, targets) -> logp (N,) fp32   # log p(target) without materializing (N, V) logits

Dispatch: CUDA tensors -> Triton; CPU tensors -> the PyTorch reference; with TRITON_INTERPRET=1 set *before this
module is imported* (Triton decides at decoration time) CPU tensors run the Triton kernels in the interpreter (tests).

The layout rule. One int row per batch row, [S, q1, c1, r1, ..., qK, cK, rK] (layout (B, 1 + 3K)), lays the row out as
    [ shared prefix S | q1 c1 r1 | q2 c2 r2 | ... | qK cK rK | padding ]
(a video's system prompt + video tokens, then per pair its query, chosen and rejected answer). Key j is visible to
query i iff j <= i and
    i is in the prefix;  or  i is in branch b's query q_b or chosen c_b and j is in the prefix or in branch b;
    or  i is in branch b's rejected r_b and j is in the prefix, in q_b or in r_b  (never c_b, never another branch);
index >= S + sum(branches) is padding (output exactly 0, never attended). Equivalently, key j reaches the queries
[j, reach(j)): reach = the row's end for prefix keys, the end of c_b for chosen keys, the end of branch b for query and
rejected keys, nothing for padding (`layout_mask` spells this out densely). Special cases: a plain causal row of
length n is [n] (K = 0; or [n, 0, 0, 0]); a preference pair is [P, 0, C, R], also accepted as the (B, 3) row
[P, C, R]; zero-length trailing branches pad a batch to one K. Positions are the packer's job (this op never sees
them): q_b starts at S, c_b and r_b both start at S + |q_b|.

The benchmark is `python tests/bench_kernels.py` (CUDA: a parity check, then attention TFLOP/s and fused_logprobs;
CPU: the reference paths and the tiles the kernels visit).
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

def grouped_layout(layout):
    """The one layout form: (B, 1 + 3K) rows [S, q1, c1, r1, ...]; a (B, 3) pair row [P, C, R] becomes [P, 0, C, R]."""
    if layout.shape[1] == 3:
        return torch.cat([layout[:, :1], torch.zeros_like(layout[:, :1]), layout[:, 1:]], dim=1)
    return layout


def layout_mask(layout, T):
    """layout (B, 3) or (B, 1 + 3K) int -> bool (B, 1, T, T), True where query i may attend key j (the rule above,
    as key j reaching queries [j, reach(j))). Dense: for tests, tile counts and a masked-SDPA fallback."""
    lay = grouped_layout(layout).long()
    K = (lay.shape[1] - 1) // 3
    S = lay[:, :1]  # (B, 1)
    ends = S + lay[:, 1:].cumsum(1)  # (B, 3K): where q1, c1, r1, q2, ... end
    L = ends[:, -1:] if K else S  # (B, 1) the row's end
    j = torch.arange(T, device=lay.device)
    reach = torch.where(j < S, L, 0)  # (B, T); padding keys reach nothing
    for b in range(K):
        q0 = S if b == 0 else ends[:, 3 * b - 1:3 * b]
        c0, r0, end = ends[:, 3 * b:3 * b + 1], ends[:, 3 * b + 1:3 * b + 2], ends[:, 3 * b + 2:3 * b + 3]
        reach = torch.where((j >= q0) & (j < end), torch.where((j >= c0) & (j < r0), r0, end), reach)
    i = j.view(1, T, 1)
    return ((j.view(1, 1, T) <= i) & (i < reach[:, None, :]))[:, None]


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
            raise ValueError("a layout is a causal rule; pass causal=True or layout=None")
        width = layout.shape[-1]  # 1 + 3K, or 3 for a pair
        if (layout.dim() != 2 or layout.shape[0] != B or not (width == 3 or width % 3 == 1)
                or layout.dtype.is_floating_point or layout.dtype == torch.bool):
            raise ValueError(f"layout must be an int tensor of shape ({B}, 1 + 3K) holding [S, q1, c1, r1, ..., qK, "
                             f"cK, rK] per row (or ({B}, 3) holding a pair [P, C, R]); got {layout.dtype} "
                             f"{tuple(layout.shape)}")
        # checking values needs the host; on CUDA we skip it (no sync per layer) and the kernel clamps to [0, T]
        if not layout.is_cuda and (bool((layout < 0).any()) or bool((layout.sum(1) > T).any())):
            raise ValueError(f"layout entries must be >= 0 and sum to <= T={T} per row; got {layout.tolist()}")


def _pieces(row):
    """One row [S, q1, c1, r1, ...] -> its end and the pieces that cover rows [0, end) in order, each
    ((lo, hi), key ranges, hole): queries [lo, hi) are the last hi - lo of the piece's keys (so the mask is causal on
    the diagonal and open before it), and hole = (first row, first key, end key) marks a block they must not see.
    The prefix with q1 and c1 is one plain causal block; r1 attends [prefix | q1 | r1]; a later branch attends
    [prefix | q_b c_b r_b] with its rejected rows' chosen keys as the hole. One call per later branch ran fwd+bwd
    1.3x (S=3000, four 275-token branches) to 1.5x (S=819, four 51-token ones) faster than splitting off the rejected
    rows (2 busy CPU cores, interleaved, best of 3)."""
    S = start = causal_end = row[0]
    pieces = []
    for b in range(len(row) // 3):
        c0 = start + row[1 + 3 * b]
        r0 = c0 + row[2 + 3 * b]
        end = r0 + row[3 + 3 * b]
        if b == 0:
            causal_end = r0
            pieces.append(((r0, end), [(0, c0), (r0, end)], None))
        else:
            pieces.append(((start, end), [(0, S), (start, end)], (r0 - start, S + c0 - start, S + r0 - start)))
        start = end
    return start, [((0, causal_end), [(0, causal_end)], None)] + pieces


def attention_ref(q, k, v, causal=True, layout=None):
    """Reference attention on SDPA with GQA (no repeated K/V). q (B, Hq, T, D), k/v (B, Hkv, T, D) -> o (B, Hq, T, D);
    scale D**-0.5; padding rows are exactly 0. With a layout each row runs as the rule's pieces (`_pieces`): the
    prefix + first query + first chosen is one plain causal block (no mask), every other part attends only its
    prefix and its own branch through a small (n, keys) mask. Same maths as masking with `layout_mask`, without the
    dense (T, T) mask: on CPU a mask costs SDPA 1.45x fwd+bwd (`python kernels.py`), and no other branch's block is
    ever computed."""
    _check_attention_args(q, k, v, causal, layout)
    gqa = q.shape[1] != k.shape[1]
    T = q.shape[2]
    if layout is not None and not layout.is_cuda and bool((layout[:, 0] == T).all()):
        layout = None  # every row is plain causal over all T: one batched call
    if layout is None:  # the plain fast path: no mask tensor at all
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    rows = []
    for b, row in enumerate(grouped_layout(layout).tolist()):
        end, pieces = _pieces(row)
        parts = []
        for (lo, hi), key_ranges, hole in pieces:
            if hi == lo:
                continue
            keys, values = (torch.cat([x[b:b + 1, :, a:z] for a, z in key_ranges if z > a], dim=2) for x in (k, v))
            n, nk = hi - lo, keys.shape[2]
            sees = None
            if n != nk or hole is not None:
                sees = torch.ones(n, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - n)
                if hole is not None:
                    sees[hole[0]:, hole[1]:hole[2]] = False  # rejected rows never see chosen keys
            parts.append(F.scaled_dot_product_attention(q[b:b + 1, :, lo:hi], keys, values, attn_mask=sees,
                                                        is_causal=sees is None, enable_gqa=gqa))
        if T > end:
            parts.append(q.new_zeros(1, q.shape[1], T - end, q.shape[3]))  # padding rows: exactly 0
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


# -----------------------------------------------------------------------------
# attention: Triton kernels. Grid (query or key tiles, batch*heads); fp32 accumulation; the head dim is padded to
# the next power of two (72 -> 128) with masked loads; scores live in base 2 (qk_scale = D**-0.5 * LOG2E).
# Masked scores get -1e6 rather than -inf so a tile that is fully masked for some row keeps finite statistics; the
# first real key of that row rescales them away (alpha = exp2(-1e6 - s) == 0).
# The layout reaches the kernels as (B, 1 + 3K) int32 and K; without one (HAS_LAYOUT False) a row is [T].

@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (interpreter only): Triton 3.9's interpreter multiplies bf16 tiles as raw integers, so feed it fp32.
    # Same numbers as a tensor-core bf16 dot: bf16 x bf16 products are exact in fp32, accumulation is fp32.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _load_layout(LAYOUT, b, T, K, HAS_LAYOUT: tl.constexpr):
    # -> S (prefix end) and L (row end; >= L is padding), clamped to [0, T] so a bad CUDA layout cannot read out of
    # bounds (CPU layouts are validated on the host)
    if HAS_LAYOUT:
        lay = LAYOUT + b * (1 + 3 * K)
        S = tl.minimum(tl.maximum(tl.load(lay), 0), T)
        L = S
        for i in range(3 * K):
            L = tl.minimum(L + tl.maximum(tl.load(lay + 1 + i), 0), T)
        return S, L
    else:
        return T, T


@triton.jit
def _branch(LAYOUT, b, T, K, x, HAS_LAYOUT: tl.constexpr):
    # for indices x (a scalar or a vector): q0 <= c0 <= r0 <= end, the bounds of the branch [q | c | r] that holds x;
    # all 0 where x is in the prefix or padding
    q0 = x * 0
    c0, r0, end = q0, q0, q0
    if HAS_LAYOUT:
        lay = LAYOUT + b * (1 + 3 * K)
        start = tl.minimum(tl.maximum(tl.load(lay), 0), T)
        for i in range(K):
            c = tl.minimum(start + tl.maximum(tl.load(lay + 1 + 3 * i), 0), T)
            r = tl.minimum(c + tl.maximum(tl.load(lay + 2 + 3 * i), 0), T)
            e = tl.minimum(r + tl.maximum(tl.load(lay + 3 + 3 * i), 0), T)
            inside = (x >= start) & (x < e)
            q0 = tl.where(inside, start, q0)
            c0 = tl.where(inside, c, c0)
            r0 = tl.where(inside, r, r0)
            end = tl.where(inside, e, end)
            start = e
    return q0, c0, r0, end


@triton.jit
def _reach(LAYOUT, b, T, K, offs_n, S, L, HAS_LAYOUT: tl.constexpr):
    # the rule, per key: key j is visible to queries [j, reach(j)) (module docstring)
    q0, c0, r0, end = _branch(LAYOUT, b, T, K, offs_n, HAS_LAYOUT)
    own = tl.where((offs_n >= c0) & (offs_n < r0), r0, end)  # chosen keys stop at the end of chosen
    return tl.where(offs_n < S, L, tl.where(offs_n < L, own, 0))


@triton.jit
def _key_ranges(LAYOUT, b, T, K, m0, BLOCK_M: tl.constexpr, S, L, CAUSAL: tl.constexpr, HAS_LAYOUT: tl.constexpr):
    # the key tiles one query tile [m0, m0+BLOCK_M) needs: unmasked [0, a1), [b0, b1), [c0, c1), masked [d0, d1).
    # Every live row sees the whole prefix before it: [0, min(m0, S)). A "clean" tile (all rows past the prefix in
    # one part of one branch) also sees unmasked its branch's query [b0, b1) and its own part so far [c0, c1) (chosen
    # or rejected), and masks only the diagonal [m0, q_end): a rejected tile never visits chosen keys, no tile visits
    # another branch's keys. A tile that straddles parts masks everything from its first row's branch on; a prefix
    # tile is plain causal; a tile of padding rows computes nothing. Non-causal: every key, unmasked.
    if CAUSAL:
        q_end = tl.minimum(m0 + BLOCK_M, L)  # keys at or past q_end are invisible to the whole tile
        live = m0 < L
        past = live & (m0 >= S)
        q0, c0, r0, end = _branch(LAYOUT, b, T, K, m0, HAS_LAYOUT)
        part_start = tl.where(m0 >= r0, r0, tl.where(m0 >= c0, c0, q0))
        part_end = tl.where(m0 >= r0, end, tl.where(m0 >= c0, r0, c0))
        clean = past & (q_end <= part_end)
        a1 = tl.where(live, tl.minimum(m0, S), 0)
        b1 = tl.where(clean, tl.minimum(c0, m0), q0)
        own0 = tl.where(clean & (m0 >= c0), part_start, m0)  # chosen or rejected: its own earlier rows
        d0 = tl.where(past & ~clean, q0, m0)
        return a1, q0, b1, own0, m0, d0, tl.where(live, q_end, d0)
    else:
        return L, 0, 0, 0, 0, 0, 0


@triton.jit
def _query_ranges(n0, BLOCK_N: tl.constexpr, reach, offs_n, L, CAUSAL: tl.constexpr):
    # the query rows that see key tile [n0, n0+BLOCK_N) (each key j reaches rows [j, reach(j))): masked [lo, mid),
    # unmasked [mid, e0), masked [e0, hi). The diagonal rows need the mask; rows past the tile see every key of it
    # up to the smallest reach e0, some of it up to the largest hi (a tile straddling parts). Padding keys: no rows.
    if CAUSAL:
        live = n0 < L
        hi = tl.max(reach, 0)
        mid = tl.minimum(n0 + BLOCK_N, hi)
        e0 = tl.maximum(mid, tl.min(tl.where(offs_n < L, reach, hi), 0))  # padding keys reach 0: left out
        return n0, tl.where(live, mid, n0), tl.where(live, e0, n0), tl.where(live, hi, n0)
    else:
        return 0, 0, L, L


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K, V, stride_kn, offs_m, offs_d, lo, hi, LAYOUT, b, T, NB, S, L, qk_scale,
               D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LAYOUT: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    # keys [lo, hi) for one query tile; MASKED applies the rule (diagonal / straddling tiles only)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        qk = _dot(q, tl.trans(k), None, PREC, UPCAST) * qk_scale  # (BM, BN)
        keep = offs_n[None, :] < hi
        if MASKED:
            reach = _reach(LAYOUT, b, T, NB, offs_n, S, L, HAS_LAYOUT)
            keep = keep & (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < reach[None, :])
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
def _attn_fwd(Q, K, V, O, LSE, LAYOUT, NB, qk_scale, T, H, G,
              sqb, sqh, sqt, skb, skh, skt, sob, soh, sot,
              HAS_LAYOUT: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    # one query tile of one head; NB = K, the layout's branch count (K names the key pointer here)
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)  # int64: b * stride passes 2**31 elements on long batches
    h = tl.program_id(1) % H
    S, L = _load_layout(LAYOUT, b, T, NB, HAS_LAYOUT)
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
    a1, b0, b1, c0, c1, d0, d1 = _key_ranges(LAYOUT, b, T, NB, m0, BLOCK_M, S, L, CAUSAL, HAS_LAYOUT)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, offs_m, offs_d, 0, a1, LAYOUT, b, T, NB, S, L,
                               qk_scale, D, BLOCK_N, False, HAS_LAYOUT, PREC, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, offs_m, offs_d, b0, b1, LAYOUT, b, T, NB, S, L,
                               qk_scale, D, BLOCK_N, False, HAS_LAYOUT, PREC, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, offs_m, offs_d, c0, c1, LAYOUT, b, T, NB, S, L,
                               qk_scale, D, BLOCK_N, False, HAS_LAYOUT, PREC, UPCAST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, skt, offs_m, offs_d, d0, d1, LAYOUT, b, T, NB, S, L,
                               qk_scale, D, BLOCK_N, True, HAS_LAYOUT, PREC, UPCAST)
    row_ok = offs_m < L
    l_safe = tl.where(row_ok, l_i, 1.0)
    o = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(row_ok, m_i + tl.log2(l_safe), 0.0)  # base-2 log-sum-exp of the scaled scores, per row
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    tl.store(LSE + tl.program_id(1) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, stride_kn, offs_m, offs_d, lo, hi, LAYOUT, b, T, NB, S, L, qk_scale,
              D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LAYOUT: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < hi) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), None, PREC, UPCAST) * qk_scale
        keep = (offs_n[None, :] < hi) & (offs_m[:, None] < L)
        if MASKED:
            reach = _reach(LAYOUT, b, T, NB, offs_n, S, L, HAS_LAYOUT)
            keep = keep & (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < reach[None, :])
        p = tl.where(keep, tl.exp2(qk - lse[:, None]), 0.0)  # softmax recomputed from the saved LSE
        dp = _dot(do, tl.trans(v), None, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, PREC, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, LAYOUT, NB, qk_scale, sm_scale, T, H, G,
                 sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt,
                 HAS_LAYOUT: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    # one query tile of one head
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)  # int64: b * stride passes 2**31 elements on long batches
    h = tl.program_id(1) % H
    S, L = _load_layout(LAYOUT, b, T, NB, HAS_LAYOUT)
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
    a1, b0, b1, c0, c1, d0, d1 = _key_ranges(LAYOUT, b, T, NB, m0, BLOCK_M, S, L, CAUSAL, HAS_LAYOUT)  # as forward
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, offs_m, offs_d, 0, a1, LAYOUT, b, T, NB, S, L, qk_scale,
                   D, BLOCK_N, False, HAS_LAYOUT, PREC, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, offs_m, offs_d, b0, b1, LAYOUT, b, T, NB, S, L, qk_scale,
                   D, BLOCK_N, False, HAS_LAYOUT, PREC, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, offs_m, offs_d, c0, c1, LAYOUT, b, T, NB, S, L, qk_scale,
                   D, BLOCK_N, False, HAS_LAYOUT, PREC, UPCAST)
    dq = _dq_tiles(dq, q, do, lse, delta, K, V, skt, offs_m, offs_d, d0, d1, LAYOUT, b, T, NB, S, L, qk_scale,
                   D, BLOCK_N, True, HAS_LAYOUT, PREC, UPCAST)
    dq = dq * sm_scale  # s = sm_scale * q.k, so ds/dq = sm_scale * k
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=qd_mask)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, reach, Q, DO, LSE, DELTA, stride_qt, stride_dt, offs_n, offs_d, lo, hi, qk_scale,
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
            keep = keep & (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < reach[:, None])
        pT = tl.where(keep, tl.exp2(qkT - lse[None, :]), 0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dt + offs_d[None, :],
                     mask=(offs_m[:, None] < hi) & (offs_d[None, :] < D), other=0.0)  # (BM, BD)
        dv = _dot(pT.to(do.dtype), do, dv, PREC, UPCAST)
        dpT = _dot(v, tl.trans(do), None, PREC, UPCAST)  # (BN, BM)
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, LAYOUT, NB, qk_scale, sm_scale, T, H, G,
                   sqb, sqh, sqt, skb, skh, skt, sdb, sdh, sdt,
                   HAS_LAYOUT: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    # one key tile of one kv head; loops over the G query heads that share it (GQA without atomics) and over the
    # query rows that can see it (_query_ranges)
    pid_n = tl.program_id(0)
    b = (tl.program_id(1) // (H // G)).to(tl.int64)
    hk = tl.program_id(1) % (H // G)
    S, L = _load_layout(LAYOUT, b, T, NB, HAS_LAYOUT)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kd_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    reach = _reach(LAYOUT, b, T, NB, offs_n, S, L, HAS_LAYOUT)  # (BN,) key j is seen by rows [j, reach(j))
    lo, mid, e0, hi = _query_ranges(n0, BLOCK_N, reach, offs_n, L, CAUSAL)
    for g in range(G):
        h = hk * G + g
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        LSEh = LSE + (b * H + h) * T
        DELTAh = DELTA + (b * H + h) * T
        dk, dv = _dkdv_tiles(dk, dv, k, v, reach, Qh, DOh, LSEh, DELTAh, sqt, sdt, offs_n, offs_d, lo, mid,
                             qk_scale, D, BLOCK_M, True, PREC, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, reach, Qh, DOh, LSEh, DELTAh, sqt, sdt, offs_n, offs_d, mid, e0,
                             qk_scale, D, BLOCK_M, False, PREC, UPCAST)
        dk, dv = _dkdv_tiles(dk, dv, k, v, reach, Qh, DOh, LSEh, DELTAh, sqt, sdt, offs_n, offs_d, e0, hi,
                             qk_scale, D, BLOCK_M, True, PREC, UPCAST)
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


def _kernel_layout(layout, dummy):
    # -> the layout pointer and K, the branch count; without a layout a dummy pointer, never read (HAS_LAYOUT False)
    return (layout, (layout.shape[1] - 1) // 3) if layout is not None else (dummy, 0)


def _attn_forward(q, k, v, causal, layout):
    B, H, T, D = q.shape
    G = H // k.shape[1]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)  # base 2
    cfg = _attn_config(D, q.device, q.dtype)
    BM, BN = cfg["fwd"]
    lay, NB = _kernel_layout(layout, lse)
    _attn_fwd[(triton.cdiv(T, BM), B * H)](
        q, k, v, o, lse, lay, NB, D ** -0.5 * LOG2E, T, H, G,
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
    lay, NB = _kernel_layout(layout, lse)
    common = dict(HAS_LAYOUT=layout is not None, CAUSAL=causal, D=D, BLOCK_D=triton.next_power_of_2(D),
                  PREC=_prec(q.dtype), UPCAST=_INTERPRET, **cfg["opts"])
    strides = (*q.stride()[:3], *k.stride()[:3], *do.stride()[:3])
    BM, BN = cfg["dq"]
    _attn_bwd_dq[(triton.cdiv(T, BM), B * H)](q, k, v, do, dq, lse, delta, lay, NB, D ** -0.5 * LOG2E, D ** -0.5,
                                              T, H, G, *strides, BLOCK_M=BM, BLOCK_N=BN, **common)
    BM, BN = cfg["dkdv"]
    _attn_bwd_dkdv[(triton.cdiv(T, BN), B * (H // G))](q, k, v, do, dk, dv, lse, delta, lay, NB, D ** -0.5 * LOG2E,
                                                       D ** -0.5, T, H, G, *strides, BLOCK_M=BM, BLOCK_N=BN,
                                                       **common)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, layout):
        # contiguous (B, H, T, D): k and v then share strides, and dq/dk/dv mirror q/k/v
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if layout is not None:  # (B, 1 + 3K) int32, whichever form came in
            layout = grouped_layout(layout).to(device=q.device, dtype=torch.int32).contiguous()
        o, lse = _attn_forward(q, k, v, causal, layout)
        ctx.save_for_backward(q, k, v, o, lse, layout)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, layout = ctx.saved_tensors
        dq, dk, dv = _attn_backward(q, k, v, o, lse, do.contiguous(), ctx.causal, layout)
        return dq, dk, dv, None, None


IMPLS = ("auto", "triton", "sdpa")


def attention(q, k, v, causal=True, layout=None, impl="auto"):
    """Fused attention. q (B, Hq, T, D), k/v (B, Hkv, T, D) with Hq % Hkv == 0 -> o (B, Hq, T, D), q's dtype.
    causal=False: bidirectional (vision tower). layout (B, 1 + 3K) int [S, q1, c1, r1, ..., qK, cK, rK] (or a pair
    (B, 3) [P, C, R]): the prefix-sharing rule in the module docstring; padding rows come out exactly 0, and tiles
    the rule fully masks are never visited. Scale D**-0.5. impl: "auto" = Triton on CUDA (and under the
    interpreter), attention_ref on CPU; "sdpa" = attention_ref anywhere (PyTorch SDPA, every layout through its
    pieces: the always-correct fallback); "triton" = the Triton kernels (CUDA or the interpreter only). The first
    Triton call per device checks itself against attention_ref (_self_check)."""
    _check_attention_args(q, k, v, causal, layout)
    if impl not in IMPLS:
        raise ValueError(f"attn_impl {impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "sdpa" or (impl == "auto" and not _use_triton(q)):
        return attention_ref(q, k, v, causal, layout)
    if not _use_triton(q):
        raise ValueError("attn_impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for tests); use 'auto' or 'sdpa'")
    _self_check(q.device)
    return _Attention.apply(q, k, v, causal, layout)


_CHECKED = set()  # devices whose Triton attention passed _self_check


def _self_check(device):
    """Once per device, before the first real call: the Triton kernels against attention_ref on a tiny grouped case
    (fp32, GQA, ragged branches, padding), outputs and gradients. A GPU, driver or Triton version on which the kernels
    miscompile stops the run here, with the switch that avoids them, instead of training on wrong attention."""
    key = str(device)
    if key in _CHECKED:
        return
    _CHECKED.add(key)  # set first: the check itself calls the kernels
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 21, 64, generator=g).to(device).requires_grad_() for h in (4, 2, 2))
    layout = torch.tensor([[5, 2, 3, 4, 1, 2, 2], [9, 0, 4, 5, 0, 0, 0]], device=device)
    do = torch.randn(2, 4, 21, 64, generator=g).to(device)
    outs = []
    for fn in (lambda: _Attention.apply(q, k, v, True, layout), lambda: attention_ref(q, k, v, True, layout)):
        o = fn()
        outs.append([o.detach(), *torch.autograd.grad(o, (q, k, v), do)])
    worst = max(float((a - b).abs().max()) for a, b in zip(*outs))
    if not worst <= 1e-3:  # fp32 kernels agree to ~1e-5; NaN fails too
        _CHECKED.discard(key)
        raise RuntimeError(f"the Triton attention kernels disagree with the PyTorch reference on {device} (max |diff| "
                           f"{worst:.3g} on a tiny check case): rerun with --attn_impl=sdpa, and please report the GPU, "
                           "driver and Triton version")


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

