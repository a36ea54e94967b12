"""Cross-attention of image tokens over padded T5 caption tokens: a flash-style Triton kernel.

PixArt's cross-attention has N = 256..4096 image-token queries against at most L = 120 caption keys (T5, padded,
with a mask), 16 heads of dim 72. Since L <= 128, all keys of one (batch, head) fit in ONE key block, and the
kernels use that:
- forward: the softmax of a query block is exact in registers (one max, one sum), with no online rescaling over
  key blocks; it stores the per-row logsumexp for the backward;
- backward (flash-attention-2 style: recompute P from q, k and the logsumexp): delta = rowsum(dO * O) is
  rowsum(dP * P) over the one key block, so the output is not read again; the program that accumulates dk and dv
  over a run of query blocks also writes those blocks' complete dq, so there is neither a second dq kernel nor an
  atomic add.
- both loop over query blocks with the keys and values loaded once per program, the next block's loads in
  flight during this one's products (software pipelining, NUM_STAGES = 2).

Shapes: q (B, N, H, Dh); k, v (B, L, H, Dh); kv_mask (B, L), True (or nonzero) = attend; output (B, N, H, Dh);
lse (B, H, N) fp32, natural-log logsumexp of the scaled scores, -inf for a caption with no valid token.
Head dim: a multiple of 8 up to 128, taken in two power-of-two column blocks (72 = 64 + 16, 8 columns masked: no
padding to 128), except by sm_80's backward, which pads it to one (72 -> 128, masked; see _config); L: 1 to 128.
"""
import math

import torch
import torch.nn.functional as F

from .backend import interpreting, tl, triton, use_triton
from .utils import SUPPORTED_DTYPES, compute_capability, launch_config, launch_options, sm_count

MAX_KV_LEN = 128  # all keys in one block; PixArt's captions have 120 tokens
MAX_HEAD_DIM = 128
MIN_ROWS_PER_PROGRAM = 512  # backward: queries one program walks at least (see _backward_splits)
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)


def cross_attention_ref(q, k, v, kv_mask=None):
    """softmax(q k^T / sqrt(Dh), keys where kv_mask) v per batch and head, in plain PyTorch.

    q (B, N, H, Dh); k, v (B, L, H, Dh); kv_mask (B, L) bool or 0/1 numbers, None = all keys. Returns (B, N, H, Dh).
    A caption with no valid token gives a zero output and zero gradients (SDPA alone may give NaN there).
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, Dh)
    if kv_mask is None:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    mask = kv_mask.bool()
    has_keys = mask.any(dim=1)  # (B,)
    # An empty caption attends to every key (a finite softmax), then its output is multiplied by 0.
    mask = mask | ~has_keys[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2) * has_keys[:, None, None, None].to(out.dtype)


@triton.jit
def _tile(base, rows, row_stride, d):
    """Pointers (len(rows), len(d)) to rows of a (tokens, HEAD_DIM) matrix at `base`. The launchers hand in rows
    that start 16-byte aligned (strides multiples of 8 elements, aligned data): the hint lets loads be 16 bytes."""
    return tl.multiple_of(base + rows[:, None] * row_stride + d[None, :], [16, 16])


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b, accumulated in fp32. "ieee": fp32 inputs get fp32 products, not TF32 (on a GPU that means FMA units,
    not tensor cores: fp32 is for checking, bf16/fp16 for speed). DOT_FP32 widens 16-bit tiles first; the
    launchers set it only for bf16 under TRITON_INTERPRET=1, whose tl.dot multiplies bf16 bit patterns as integers
    (triton-lang/triton#11584). bf16 x bf16 products are exact in fp32, so widening matches the tensor cores."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _load_cols(base, rows, row_stride, row_ok, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The (len(rows), WIDTH) tile of head-dim columns COL0 .. COL0 + WIDTH of a (tokens, HEAD_DIM) matrix; rows
    not row_ok and columns past HEAD_DIM read 0."""
    d = COL0 + tl.arange(0, WIDTH)
    return tl.load(_tile(base, rows, row_stride, d), mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _store_cols(base, rows, row_stride, row_ok, value, COL0: tl.constexpr, WIDTH: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    d = COL0 + tl.arange(0, WIDTH)
    tl.store(_tile(base, rows, row_stride, d), value.to(base.dtype.element_ty),
             mask=row_ok[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["blocks_per_program"])  # one compile for every grid
def _cross_attn_fwd_kernel(
    Q,  # (B, N, H, HEAD_DIM) queries, strided as _aligned allows (unit head-dim stride, rows 16-byte aligned)
    K,  # (B, L, H, HEAD_DIM) keys, likewise
    V,  # (B, L, H, HEAD_DIM) values, likewise
    MASK,  # (B, L) bool, contiguous: True = attend
    O,  # (B, N, H, HEAD_DIM) contiguous output, q's dtype
    LSE,  # (B, H, N) contiguous fp32 output: natural-log logsumexp of the scaled scores
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    N, L, H,
    blocks_per_program,  # query blocks of BLOCK_N rows that one program walks through
    sm_scale,  # 1 / sqrt(HEAD_DIM)
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # queries per step
    BLOCK_L: tl.constexpr,  # >= L: every key in one block
    BLOCK_D0: tl.constexpr,  # the head dim in two power-of-two column blocks (see _config), no padding to
    BLOCK_D1: tl.constexpr,  # a power of two: 72 = 64 + 16 (8 of them masked), 128 = 128 + 0
    DOT_FP32: tl.constexpr,  # widen tl.dot operands to fp32 (the interpreter's bf16, see _dot)
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the query-block loop
):
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    h = pid_bh % H
    keys = tl.arange(0, BLOCK_L)
    key_in = keys < L
    key_ok = tl.load(MASK + b * L + keys, mask=key_in, other=0) != 0
    q_base, k_base = Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh
    v_base, o_base = V + b * stride_vb + h * stride_vh, O + (b * N * H + h) * HEAD_DIM
    # Keys and values once per program, for all its query blocks.
    kt0 = tl.trans(_load_cols(k_base, keys, stride_kl, key_in, 0, BLOCK_D0, HEAD_DIM))
    v0 = _load_cols(v_base, keys, stride_vl, key_in, 0, BLOCK_D0, HEAD_DIM)
    if BLOCK_D1 > 0:
        kt1 = tl.trans(_load_cols(k_base, keys, stride_kl, key_in, BLOCK_D0, BLOCK_D1, HEAD_DIM))
        v1 = _load_cols(v_base, keys, stride_vl, key_in, BLOCK_D0, BLOCK_D1, HEAD_DIM)

    for i in tl.range(0, blocks_per_program, num_stages=NUM_STAGES):
        rows = (pid_split * blocks_per_program + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        s = _dot(_load_cols(q_base, rows, stride_qn, row_ok, 0, BLOCK_D0, HEAD_DIM), kt0, DOT_FP32)
        if BLOCK_D1 > 0:
            s += _dot(_load_cols(q_base, rows, stride_qn, row_ok, BLOCK_D0, BLOCK_D1, HEAD_DIM), kt1, DOT_FP32)
        s = s * (sm_scale * _LOG2E)  # (BLOCK_N, BLOCK_L), log2 units
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # empty caption: keep exp2 finite; every p is 0 below
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, 1)
        l_safe = tl.where(l == 0.0, 1.0, l)  # empty caption: o = 0 / 1 = 0 and lse = -inf
        lse = tl.where(l == 0.0, float("-inf"), (m + tl.log2(l_safe)) * _LN2)  # natural log
        p = p.to(O.dtype.element_ty)
        _store_cols(o_base, rows, H * HEAD_DIM, row_ok, _dot(p, v0, DOT_FP32) / l_safe[:, None], 0, BLOCK_D0,
                    HEAD_DIM)
        if BLOCK_D1 > 0:
            _store_cols(o_base, rows, H * HEAD_DIM, row_ok, _dot(p, v1, DOT_FP32) / l_safe[:, None], BLOCK_D0,
                        BLOCK_D1, HEAD_DIM)
        tl.store(LSE + pid_bh.to(tl.int64) * N + rows, lse, mask=row_ok)


@triton.jit
def _cross_attn_bwd_kernel(
    Q,  # (B, N, H, HEAD_DIM) queries, strided as _aligned allows (unit head-dim stride, rows 16-byte aligned)
    K,  # (B, L, H, HEAD_DIM) keys, likewise
    V,  # (B, L, H, HEAD_DIM) values, likewise
    DO,  # (B, N, H, HEAD_DIM) gradient of the output, likewise
    LSE,  # (B, H, N) contiguous fp32: the forward's logsumexp
    MASK,  # (B, L) bool, contiguous: True = attend
    DQ,  # (B, N, H, HEAD_DIM) contiguous output, q's dtype
    DK,  # contiguous output: dk itself, (B, L, H, HEAD_DIM) in k's dtype, when one program per (batch, head) walks
         # all queries (SPLITS = 1); else (SPLITS, B, L, H, HEAD_DIM) fp32, dk summed over each program's queries
    DV,  # dv likewise
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_dob, stride_don, stride_doh,
    N, L, H,
    blocks_per_program,  # query blocks of BLOCK_N rows that one program walks through
    sm_scale,  # 1 / sqrt(HEAD_DIM)
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # queries per step
    BLOCK_L: tl.constexpr,  # >= L: every key in one block
    BLOCK_D0: tl.constexpr,  # the head dim in two column blocks, as in the forward
    BLOCK_D1: tl.constexpr,
    DOT_FP32: tl.constexpr,  # widen tl.dot operands to fp32 (the interpreter's bf16, see _dot)
    KEYS_MAJOR: tl.constexpr,  # scores as (keys, queries) instead of (queries, keys) (see _config)
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the query-block loop
):
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    h = pid_bh % H
    keys = tl.arange(0, BLOCK_L)
    key_in = keys < L
    key_ok = tl.load(MASK + b * L + keys, mask=key_in, other=0) != 0
    q_base, do_base = Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh
    dq_base = DQ + (b * N * H + h) * HEAD_DIM
    k0 = _load_cols(K + b * stride_kb + h * stride_kh, keys, stride_kl, key_in, 0, BLOCK_D0, HEAD_DIM)
    v0 = _load_cols(V + b * stride_vb + h * stride_vh, keys, stride_vl, key_in, 0, BLOCK_D0, HEAD_DIM)
    dk0 = tl.zeros((BLOCK_L, BLOCK_D0), dtype=tl.float32)
    dv0 = tl.zeros((BLOCK_L, BLOCK_D0), dtype=tl.float32)
    if BLOCK_D1 > 0:
        k1 = _load_cols(K + b * stride_kb + h * stride_kh, keys, stride_kl, key_in, BLOCK_D0, BLOCK_D1, HEAD_DIM)
        v1 = _load_cols(V + b * stride_vb + h * stride_vh, keys, stride_vl, key_in, BLOCK_D0, BLOCK_D1, HEAD_DIM)
        dk1 = tl.zeros((BLOCK_L, BLOCK_D1), dtype=tl.float32)
        dv1 = tl.zeros((BLOCK_L, BLOCK_D1), dtype=tl.float32)
    qk_scale = sm_scale * _LOG2E  # scores in log2 units, for exp2

    for i in tl.range(0, blocks_per_program, num_stages=NUM_STAGES):
        rows = (pid_split * blocks_per_program + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        q0 = _load_cols(q_base, rows, stride_qn, row_ok, 0, BLOCK_D0, HEAD_DIM)
        do0 = _load_cols(do_base, rows, stride_don, row_ok, 0, BLOCK_D0, HEAD_DIM)
        if BLOCK_D1 > 0:
            q1 = _load_cols(q_base, rows, stride_qn, row_ok, BLOCK_D0, BLOCK_D1, HEAD_DIM)
            do1 = _load_cols(do_base, rows, stride_don, row_ok, BLOCK_D0, BLOCK_D1, HEAD_DIM)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * _LOG2E
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty caption: exp2(s - inf) = 0, not inf
        # Masked keys and padding rows get p = 0 explicitly: an empty caption's lse is -inf.
        if KEYS_MAJOR:  # scores as (keys, queries): the dk, dv, dp and s products have BLOCK_L rows
            st = _dot(k0, tl.trans(q0), DOT_FP32)
            dpt = _dot(v0, tl.trans(do0), DOT_FP32)
            if BLOCK_D1 > 0:
                st += _dot(k1, tl.trans(q1), DOT_FP32)
                dpt += _dot(v1, tl.trans(do1), DOT_FP32)
            pt = tl.where(key_ok[:, None] & row_ok[None, :], tl.exp2(st * qk_scale - lse[None, :]), 0.0)
            delta = tl.sum(pt * dpt, 0)  # rowsum(dP * P) = rowsum(dO * O), all keys being in this block
            dst = (pt * (dpt - delta[None, :])).to(q0.dtype)  # dLoss/dS^T for S = sm_scale * q k^T
            pt = pt.to(do0.dtype)
            ds = tl.trans(dst)
        else:  # (queries, keys)
            s = _dot(q0, tl.trans(k0), DOT_FP32)
            dp = _dot(do0, tl.trans(v0), DOT_FP32)
            if BLOCK_D1 > 0:
                s += _dot(q1, tl.trans(k1), DOT_FP32)
                dp += _dot(do1, tl.trans(v1), DOT_FP32)
            p = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            delta = tl.sum(p * dp, 1)  # rowsum(dP * P) = rowsum(dO * O), all keys being in this block
            ds = (p * (dp - delta[:, None])).to(q0.dtype)  # dLoss/dS for S = sm_scale * q k^T
            pt = tl.trans(p.to(do0.dtype))
            dst = tl.trans(ds)
        dv0 += _dot(pt, do0, DOT_FP32)
        dk0 += _dot(dst, q0, DOT_FP32)
        _store_cols(dq_base, rows, H * HEAD_DIM, row_ok, _dot(ds, k0, DOT_FP32) * sm_scale, 0, BLOCK_D0, HEAD_DIM)
        if BLOCK_D1 > 0:
            dv1 += _dot(pt, do1, DOT_FP32)
            dk1 += _dot(dst, q1, DOT_FP32)
            _store_cols(dq_base, rows, H * HEAD_DIM, row_ok, _dot(ds, k1, DOT_FP32) * sm_scale, BLOCK_D0, BLOCK_D1,
                        HEAD_DIM)

    part = ((pid_split * (tl.num_programs(1) // H) + b) * L * H + h) * HEAD_DIM  # (split, b, 0, h, 0) of DK / DV
    _store_cols(DK + part, keys, H * HEAD_DIM, key_in, dk0 * sm_scale, 0, BLOCK_D0, HEAD_DIM)
    _store_cols(DV + part, keys, H * HEAD_DIM, key_in, dv0, 0, BLOCK_D0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_cols(DK + part, keys, H * HEAD_DIM, key_in, dk1 * sm_scale, BLOCK_D0, BLOCK_D1, HEAD_DIM)
        _store_cols(DV + part, keys, H * HEAD_DIM, key_in, dv1, BLOCK_D0, BLOCK_D1, HEAD_DIM)


def head_dim_blocks(head_dim: int) -> tuple[int, int]:
    """The head dim as two power-of-two column blocks (tl.dot needs blocks >= 16; the second may be 0): the
    largest power of two that fits, then the rest rounded up. 72 -> (64, 16): 80 columns of MMA work and
    accumulators instead of 128; 128 -> (128, 0); 24 -> (16, 16); 8 -> (16, 0)."""
    first = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - first
    return first, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


def _config(kind: str, head_dim: int, kv_len: int, dtype: torch.dtype, dot_fp32: bool = False,
            capability: int | None = None) -> dict:
    """Block sizes, warps and pipelining of one kernel ("fwd" or "bwd"); the launchers and aot_specs() both read it.

    All keys in one block (BLOCK_L >= L). Both kernels loop over query blocks of BLOCK_N rows with the keys and
    values loaded once per program, the next block's loads in flight during this one's products (NUM_STAGES = 2).
    Forward: the head dim in two column blocks (head_dim_blocks: 72 -> 64 + 16, no padding to 128), 64 rows, 4
    warps: in 16 bits 130 / 245 registers, 3 / 2 programs per SM on sm_90 / sm_80, every sm_90 product on wgmma
    (128-row blocks: 254 registers, 2 programs per SM on sm_90; 248 bytes of spills on sm_80).
    Backward on sm_90 and later (capability >= 90), 16 bits: the scores as (keys, queries) (KEYS_MAJOR, so dk, dv,
    dp and s have 128 key rows), the head dim split as in the forward, 64 query rows, 8 warps: all 42 products on
    wgmma, 247 registers, 1 program per SM. On sm_80 (and in fp32) the backward keeps (queries, keys), 16 rows and
    one head-dim block padded to a power of two (72 -> 128): 244-255 registers; there the split head dim spills 520-630
    bytes and (keys, queries) 24-68 bytes at every query block tried. Chosen for zero register spills on sm_80 and
    sm_90 at PixArt's shapes (L = 120 -> 128) in 16 bits; fp32 (FMA units, 8 warps: for checking) spills at every
    configuration tried, so cross_attention() runs it only when asked for backend="triton".
    """
    split = kind == "fwd" or ((capability or 0) >= 90 and dtype != torch.float32)
    if kind == "fwd":
        block_n, num_warps = 64, 4
    else:
        block_n, num_warps = (64 if split else 16), 8
    num_warps = 8 if dtype == torch.float32 else num_warps
    block_d0, block_d1 = head_dim_blocks(head_dim) if split else (max(16, triton.next_power_of_2(head_dim)), 0)
    return launch_config(
        num_warps,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        BLOCK_L=max(16, triton.next_power_of_2(kv_len)),
        BLOCK_D0=block_d0,
        BLOCK_D1=block_d1,
        DOT_FP32=dot_fp32,
        NUM_STAGES=2,
        **({} if kind == "fwd" else {"KEYS_MAJOR": split}),
    )


def _aligned(x):
    """x itself when it meets the kernels' load hint (see _tile): unit head-dim stride, the other strides multiples
    of 8 elements, 16-byte aligned data. kv_linear(y).view(B, L, 2, H, Dh).unbind(2) views do; anything else (a
    transposed head dim, an odd offset, an expanded gradient) is copied to a contiguous tensor first."""
    strides_ok = all(s % 8 == 0 for s, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1)
    if x.stride(-1) == 1 and strides_ok and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _dot_fp32(x) -> bool:
    """The interpreter's tl.dot cannot read bf16 tiles (see _dot); compiled kernels use the tensor cores."""
    return interpreting() and x.dtype == torch.bfloat16


def _launch_cross_attention_fwd(q, k, v, kv_mask):
    """Forward. q (B, N, H, Dh); k, v (B, L, H, Dh); kv_mask (B, L) bool contiguous.

    Returns out (B, N, H, Dh) contiguous in q's dtype and lse (B, H, N) fp32.
    """
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    B, N, H, Dh = q.shape
    L = k.shape[1]
    out = q.new_empty(B, N, H, Dh)
    lse = q.new_empty(B, H, N, dtype=torch.float32)
    cfg = _config("fwd", Dh, L, q.dtype, _dot_fp32(q))
    n_blocks = triton.cdiv(N, cfg["constexprs"]["BLOCK_N"])
    blocks_per_program = triton.cdiv(n_blocks, _forward_splits(n_blocks, B * H, q.device))
    grid = (triton.cdiv(n_blocks, blocks_per_program), B * H)
    _cross_attn_fwd_kernel[grid](
        q, k, v, kv_mask, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        N, L, H, blocks_per_program, 1.0 / math.sqrt(Dh),
        **launch_options(cfg),
    )
    return out, lse


def _forward_splits(n_blocks: int, bh: int, device) -> int:
    """How many programs share one (batch, head)'s query blocks in the forward: one, unless the batch and heads
    give fewer than 4 programs per SM (the GPU holds 2-3 at once, see _config): each program loads the keys and
    values once for all its query blocks, and at PixArt-XL/2's training batches one per (batch, head) fills it."""
    return max(1, min(n_blocks, triton.cdiv(4 * sm_count(device), bh)))


def _backward_splits(n_blocks: int, block_n: int, bh: int, device) -> int:
    """How many programs share one (batch, head)'s n_blocks query blocks of block_n rows in the backward.

    Enough to fill the GPU about twice over, but each program walks at least MIN_ROWS_PER_PROGRAM queries: its
    fp32 dk/dv partials (2 x L x Dh, written, then read by the sum) then cost at most about a third of its own
    q/dO/dq traffic (3 x 512 x Dh in 16 bits), and much less at the usual 1 to 3 splits.
    """
    return max(1, min(triton.cdiv(2 * sm_count(device), bh), n_blocks * block_n // MIN_ROWS_PER_PROGRAM))


def _launch_cross_attention_bwd(do, q, k, v, lse, kv_mask, splits=None):
    """Backward. do (B, N, H, Dh); q, k, v, kv_mask as in the forward; lse (B, H, N) fp32 from it.

    splits: programs per (batch, head) along N (None = chosen from the GPU's size). Returns dq, dk, dv, each
    contiguous in its input's dtype.
    """
    do, q, k, v = (_aligned(x) for x in (do, q, k, v))
    B, N, H, Dh = q.shape
    L = k.shape[1]
    cfg = _config("bwd", Dh, L, q.dtype, _dot_fp32(q), compute_capability(q.device))
    block_n = cfg["constexprs"]["BLOCK_N"]
    n_blocks = triton.cdiv(N, block_n)
    splits = _backward_splits(n_blocks, block_n, B * H, q.device) if splits is None else splits
    blocks_per_program = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, blocks_per_program)  # no program without a query block
    dq = q.new_empty(B, N, H, Dh)
    # One split: the kernel writes dk and dv in their dtypes; more: fp32 partial sums, summed below.
    shape, partial = ((B, L, H, Dh), None) if splits == 1 else ((splits, B, L, H, Dh), torch.float32)
    dk, dv = q.new_empty(shape, dtype=partial or k.dtype), q.new_empty(shape, dtype=partial or v.dtype)
    _cross_attn_bwd_kernel[(splits, B * H)](
        q, k, v, do, lse, kv_mask, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        N, L, H, blocks_per_program, 1.0 / math.sqrt(Dh),
        **launch_options(cfg),
    )
    return (dq, dk, dv) if splits == 1 else (dq, dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype))


@torch.library.custom_op("pixart_fast::cross_attn_fwd", mutates_args=())
def _cross_attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_cross_attention_fwd(q, k, v, kv_mask)


@_cross_attn_fwd_op.register_fake
def _(q, k, v, kv_mask):
    B, N, H, Dh = q.shape
    return q.new_empty(B, N, H, Dh), q.new_empty(B, H, N, dtype=torch.float32)


@torch.library.custom_op("pixart_fast::cross_attn_bwd", mutates_args=())
def _cross_attn_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor, kv_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_cross_attention_bwd(do, q, k, v, lse, kv_mask)


@_cross_attn_bwd_op.register_fake
def _(do, q, k, v, lse, kv_mask):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class CrossAttentionFunction(torch.autograd.Function):
    """Triton forward and backward; saves q, k, v and the (B, H, N) logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v, kv_mask):
        out, lse = torch.ops.pixart_fast.cross_attn_fwd(q, k, v, kv_mask)
        ctx.save_for_backward(q, k, v, lse, kv_mask)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lse, kv_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.pixart_fast.cross_attn_bwd(dout, q, k, v, lse, kv_mask)
        return dq, dk, dv, None


def _check_inputs(q, k, v, kv_mask):
    """Shape, dtype and device errors a caller can make, for either backend."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"cross_attention: {name} must be 4-D (batch, tokens, heads, head_dim), got {tuple(x.shape)}"
            )
    B, _, H, Dh = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (H, Dh):
        raise ValueError(
            f"cross_attention: q {tuple(q.shape)} = (B, N, H, Dh) needs k and v of shape (B, L, H, Dh), "
            f"got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if kv_mask is not None and kv_mask.shape != (B, k.shape[1]):
        raise ValueError(
            f"cross_attention: kv_mask must have shape (B, L) = {(B, k.shape[1])}, got {tuple(kv_mask.shape)}"
        )
    tensors = (q, k, v) if kv_mask is None else (q, k, v, kv_mask)
    if len({x.device for x in tensors}) != 1:
        devices = [str(x.device) for x in tensors]
        raise ValueError(f"cross_attention: inputs on different devices {devices}; move them to one device")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            "cross_attention: q, k, v must share one dtype of float32/float16/bfloat16, "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def cross_attention(q, k, v, kv_mask=None, backend="auto"):
    """Multi-head cross-attention, softmax scale 1/sqrt(Dh).

    q (B, N, H, Dh) image-token queries; k, v (B, L, H, Dh) caption keys/values (views such as
    `kv_linear(y).view(B, L, 2, H, Dh).unbind(2)` are read in place); kv_mask (B, L) bool or 0/1 numbers,
    True = attend, None = all keys. Returns (B, N, H, Dh) in q's dtype; a caption with no valid token gives zeros.
    backend: "auto" | "triton" | "torch" (see kernels/backend.py). The Triton kernels need Dh a multiple of 8
    up to 128 and 1 <= L <= 128; "auto" runs PyTorch's attention for other shapes (PixArt-Sigma's 300 tokens),
    "triton" refuses them. "auto" also runs PyTorch's for fp32 on a GPU: the kernels are built for 16-bit tensor
    cores, and their fp32 tiles (FMA units) spill (see _config); "triton" runs them, for checking.
    """
    _check_inputs(q, k, v, kv_mask)
    Dh, L = q.shape[3], k.shape[1]
    fits = (Dh % 8 == 0 and 8 <= Dh <= MAX_HEAD_DIM and 1 <= L <= MAX_KV_LEN
            and (q.dtype != torch.float32 or interpreting()))
    if not use_triton(backend, q) or (backend == "auto" and not fits):
        return cross_attention_ref(q, k, v, kv_mask)
    if Dh % 8 != 0 or not 8 <= Dh <= MAX_HEAD_DIM:
        raise ValueError(f"cross_attention: head dim {Dh} is not supported by the Triton kernel; "
                         f"use a multiple of 8 up to {MAX_HEAD_DIM}, or backend='torch'")
    if not 1 <= L <= MAX_KV_LEN:
        raise ValueError(f"cross_attention: {L} keys, the Triton kernel holds 1 to {MAX_KV_LEN} in one block; "
                         "truncate the caption or use backend='torch'")
    if kv_mask is None:
        kv_mask = torch.ones(q.shape[0], L, dtype=torch.bool, device=q.device)
    return CrossAttentionFunction.apply(q, k, v, kv_mask.bool().contiguous())


def aot_specs(sms: int = 132, batch: int = 8, tokens=(256, 1024, 4096), capability: int = 90) -> list[dict]:
    """The launches PixArt-XL/2's cross-attention makes, forward and backward, for ahead-of-time compilation.

    The real launchers run on meta tensors shaped and strided as pixart_fast/model.py's CrossAttention passes them
    (the kernels' launches are recorded, not run): H = 16, Dh = 72, L = 120, batch 8, N = 256 / 1024 / 4096 query
    tokens; q a view of q_linear's output, k and v views of kv_linear's (.view(B, L, 2, H, Dh).unbind(2)), all in
    the autocast dtype, bf16 or fp16 (in fp32 the model's calls run PyTorch's attention, see cross_attention);
    on a GPU of `sms` SMs (the backward's splits depend on it) and compute capability `capability` (90: sm_90;
    the backward's form depends on it). Entries as kernels/modulation.py's aot_specs().
    """
    from .utils import recorded_launches

    H, head_dim, kv_len = 16, 72, 120
    D = H * head_dim
    specs = []
    for regime, dtype in (("bf16 autocast", torch.bfloat16), ("fp16 autocast", torch.float16)):
        for N in tokens:
            q = torch.empty(batch, N, D, dtype=dtype, device="meta").view(batch, N, H, head_dim)
            k, v = torch.empty(batch, kv_len, 2 * D, dtype=dtype, device="meta").view(
                batch, kv_len, 2, H, head_dim).unbind(2)
            mask = torch.empty(batch, kv_len, dtype=torch.bool, device="meta")
            with recorded_launches(globals(), (_cross_attn_fwd_kernel, _cross_attn_bwd_kernel), sms,
                                   capability) as calls:
                out, lse = _launch_cross_attention_fwd(q, k, v, mask)
                _launch_cross_attention_bwd(torch.empty_like(out), q, k, v, lse, mask)
            for call in calls:
                kind = "fwd" if call["fn"] is _cross_attn_fwd_kernel else "bwd"
                args = dict(zip(call["fn"].arg_names, call["args"]))
                # Kernel-private tensors (kernels/roofline.py): the logsumexp, and dk / dv when split into partials.
                private = ["LSE"] + [n for n in ("DK", "DV") if n in args and args[n].dim() == 5]
                specs.append({"name": f"cross_attn_{kind}", "call": f"{regime} B={batch} N={N}", "private": private,
                              **call})
    return specs
