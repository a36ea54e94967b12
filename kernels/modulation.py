"""adaLN-single modulation of PixArt-alpha, fused: LayerNorm + (1 + scale) * x + shift, and the gated residual.

A PixArt block computes, per sample b and token t (D = 1152 for PixArt-XL/2):

    m = LN(x) * (1 + scale[b]) + shift[b]        modulate                 (LN: no affine, eps 1e-6)
    h = x + gate[b] * y                           gated_residual
    h, m = x + gate[b] * y, modulate(h, ...)      gated_residual_modulate  (the residual add fused with the next LN)

shift / scale / gate are (B, D) per-sample vectors broadcast over the T tokens inside the kernels, never expanded to
(B, T, D). They usually are strided views: `(table[None] + t0.reshape(B, 6, D)).chunk(6, 1)` squeezed gives
(B, D) views with row stride 6 * D, which the kernels read in place.

Every kernel walks a block of tokens of one sample: it loads the sample's (B, D) vectors once, then its rows in a
software-pipelined loop (the next row's loads in flight, cp.async into shared memory, while the current row is
reduced). The backward recomputes the normalised rows from x and the stored (B*T,) mean / rstd, writes dx (and dy)
and keeps fp32 partial sums of dshift / dscale / dgate over its tokens; the (B, n_blocks, D) partial rows are summed
afterwards. The tokens per program make whole waves of the programs per SM the compiled kernel allows, read from it
on the GPU. No (B, T, D) temporary is saved for backward: the fused op recomputes h = x + gate * y from its
inputs.

All arithmetic is fp32; outputs take the dtype PyTorch's own expression would give (type promotion over the
inputs), gradients the dtype of their input. What feeds a Linear can be written in that Linear's dtype instead
(out_dtype for m, copy_dtype for a second copy of gated_residual's output: under autocast, the autocast dtype), so
no cast pass runs between a kernel and the Linear, forward or backward; the residual stream keeps its dtype.
gated_residual_modulate with gate None is a plain residual add (gate 1): x + cross_attn(...) fused with the MLP's
modulation in pixart_fast/model.py.
"""
import functools

import torch
import torch.nn.functional as F

from .backend import tl, triton, use_triton
from .utils import (SUPPORTED_DTYPES, compiled_programs_per_sm, launch_config, launch_options, sm_count,
                    tokens_per_program)

Tensor = torch.Tensor

MAX_D = 8192  # widest row one program holds in registers
# Token loops are software-pipelined this deep: the next row's loads (cp.async into shared memory) are in flight
# while the current row is reduced.
NUM_STAGES = tl.constexpr(2)


# ----------------------------------------------------------------------------------------------------------------
# Pure-PyTorch references
# ----------------------------------------------------------------------------------------------------------------


def modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                 out_dtype: torch.dtype | None = None) -> Tensor:
    """LN(x) * (1 + scale) + shift, cast to out_dtype if given. x: (B, T, D); shift, scale: (B, D). Returns (B, T, D)."""
    m = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]
    return m if out_dtype is None else m.to(out_dtype)


def gated_residual_ref(x: Tensor, gate: Tensor, y: Tensor, copy_dtype: torch.dtype | None = None):
    """x + gate * y (x, y: (B, T, D); gate: (B, D)); with copy_dtype also the result cast to it."""
    out = x + gate[:, None] * y
    return out if copy_dtype is None else (out, out.to(copy_dtype))


def gated_residual_modulate_ref(x, gate, y, shift, scale, eps: float = 1e-6, out_dtype: torch.dtype | None = None):
    """(h, m) with h = x + gate * y (gate None: x + y) and m = modulate_ref(h, shift, scale, eps, out_dtype)."""
    h = x + y if gate is None else gated_residual_ref(x, gate, y)
    return h, modulate_ref(h, shift, scale, eps, out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. (B, T, D) inputs are addressed by batch / token strides (unit stride along D); outputs and
# gradients are written contiguous, row r = b * T + t. (B, D) vectors are addressed by their row stride.
# ----------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["rows_per_program"])  # one compile for every grid (see _tokens_per_program)
def _modulate_fwd_kernel(
    X,  # (B, T, D) input (the residual stream)
    GATE,  # (B, D) residual gate, or None for gate 1; only with HAS_RESIDUAL
    Y,  # (B, T, D) residual branch; only with HAS_RESIDUAL
    SHIFT,  # (B, D)
    SCALE,  # (B, D)
    H,  # (B*T, D) out: h = x + gate * y; only with HAS_RESIDUAL
    M,  # (B*T, D) out: LN(h) * (1 + scale) + shift   (h = x without HAS_RESIDUAL), in the next Linear's dtype
    MEAN,  # (B*T,) fp32 out: mean of h over D
    RSTD,  # (B*T,) fp32 out: 1 / sqrt(var(h) + eps)
    T,
    D,
    rows_per_program,  # tokens of one sample one program walks through
    stride_xb,
    stride_xt,
    stride_yb,
    stride_yt,
    stride_gate,  # row stride of GATE
    stride_shift,  # row stride of SHIFT
    stride_scale,  # row stride of SCALE
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    # The sample's vectors once per program, before its rows; the rows' loads pipelined (the next row's in flight
    # while this one is reduced).
    shift = tl.load(SHIFT + b * stride_shift + cols, mask=mask, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL and GATE is not None:
        gate = tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    t_start = block.to(tl.int64) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    for t in tl.range(t_start, t_end, num_stages=NUM_STAGES):
        row = b * T + t
        h = tl.load(X + b * stride_xb + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = tl.load(Y + b * stride_yb + t * stride_yt + cols, mask=mask, other=0.0).to(tl.float32)
            if GATE is not None:
                h += gate * y
            else:
                h += y
            tl.store(H + row * D + cols, h.to(H.dtype.element_ty), mask=mask)
        mean = tl.sum(h, axis=0) / D
        hc = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, axis=0) / D + eps)
        tl.store(M + row * D + cols, (hc * rstd * scale1 + shift).to(M.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=["rows_per_program"])  # one compile for every grid (see _tokens_per_program)
def _modulate_bwd_kernel(
    DM,  # (B, T, D) grad of m
    DH,  # (B, T, D) grad of h; only with HAS_RESIDUAL
    X,  # (B, T, D) forward input
    GATE,  # (B, D), or None for gate 1; only with HAS_RESIDUAL
    Y,  # (B, T, D); only with HAS_RESIDUAL
    SCALE,  # (B, D)
    MEAN,  # (B*T,) fp32, from the forward
    RSTD,  # (B*T,) fp32, from the forward
    DX,  # (B*T, D) out: grad of x (= total grad of h)
    DY,  # (B*T, D) out: grad of y = gate * grad of h; only with HAS_RESIDUAL
    DSHIFT_PART,  # (B, n_blocks, D) fp32 out: sum of dm over this program's tokens
    DSCALE_PART,  # (B, n_blocks, D) fp32 out: sum of dm * LN(h) over this program's tokens
    DGATE_PART,  # (B, n_blocks, D) fp32 out: sum of dh * y over this program's tokens; only with GATE
    T,
    D,
    rows_per_program,  # tokens of one sample reduced by one program
    stride_dmb,
    stride_dmt,
    stride_dhb,
    stride_dht,
    stride_xb,
    stride_xt,
    stride_yb,
    stride_yt,
    stride_gate,  # row stride of GATE
    stride_scale,  # row stride of SCALE
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL and GATE is not None:
        gate = tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    dshift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)

    t_start = block.to(tl.int64) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    for t in tl.range(t_start, t_end, num_stages=NUM_STAGES):
        row = b * T + t
        # Every load of the row first (dh too), then the two row reductions.
        h = tl.load(X + b * stride_xb + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
        dm = tl.load(DM + b * stride_dmb + t * stride_dmt + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        if HAS_RESIDUAL:
            y = tl.load(Y + b * stride_yb + t * stride_yt + cols, mask=mask, other=0.0).to(tl.float32)
            dh_out = tl.load(DH + b * stride_dhb + t * stride_dht + cols, mask=mask, other=0.0).to(tl.float32)
            # Recompute h and its normalised value instead of having stored them.
            if GATE is not None:
                h += gate * y
            else:
                h += y
        hhat = tl.where(mask, (h - mean) * rstd, 0.0)
        dshift += dm
        dscale += dm * hhat

        # LayerNorm backward: dh = rstd * (g - mean(g) - hhat * mean(g * hhat)), g = dm * (1 + scale).
        g = dm * scale1
        dh = (g - (tl.sum(g, axis=0) / D + hhat * (tl.sum(g * hhat, axis=0) / D))) * rstd
        if HAS_RESIDUAL:
            dh += dh_out
            if GATE is not None:
                tl.store(DY + row * D + cols, (gate * dh).to(DY.dtype.element_ty), mask=mask)
                dgate += dh * y
            else:
                tl.store(DY + row * D + cols, dh.to(DY.dtype.element_ty), mask=mask)
        tl.store(DX + row * D + cols, dh.to(DX.dtype.element_ty), mask=mask)

    part = (b * tl.num_programs(0) + block) * D + cols
    tl.store(DSHIFT_PART + part, dshift, mask=mask)
    tl.store(DSCALE_PART + part, dscale, mask=mask)
    if HAS_RESIDUAL and GATE is not None:
        tl.store(DGATE_PART + part, dgate, mask=mask)


@triton.jit(do_not_specialize=["rows_per_program"])
def _gated_residual_fwd_kernel(
    X,  # (B, T, D) residual stream
    GATE,  # (B, D)
    Y,  # (B, T, D) residual branch
    OUT,  # (B*T, D) out: x + gate * y
    COPY,  # (B*T, D) out: the same in the next Linear's dtype, or None
    T,
    D,
    rows_per_program,  # tokens of one sample one program walks through
    stride_xb,
    stride_xt,
    stride_yb,
    stride_yt,
    stride_gate,  # row stride of GATE
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    t_start = block.to(tl.int64) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    for t in tl.range(t_start, t_end, num_stages=NUM_STAGES):
        x = tl.load(X + b * stride_xb + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * stride_yb + t * stride_yt + cols, mask=mask, other=0.0).to(tl.float32)
        out = x + gate * y
        tl.store(OUT + (b * T + t) * D + cols, out.to(OUT.dtype.element_ty), mask=mask)
        if COPY is not None:
            tl.store(COPY + (b * T + t) * D + cols, out.to(COPY.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows_per_program"])
def _gated_residual_bwd_kernel(
    DOUT,  # (B, T, D) grad of the output
    DCOPY,  # (B, T, D) grad of the copy, or None
    GATE,  # (B, D)
    Y,  # (B, T, D)
    DX,  # (B*T, D) out: dout + dcopy; only with DCOPY (without it the grad of x is dout itself)
    DY,  # (B*T, D) out: gate * (dout + dcopy)
    DGATE_PART,  # (B, n_blocks, D) fp32 out: sum of (dout + dcopy) * y over this program's tokens
    T,
    D,
    rows_per_program,  # tokens of one sample reduced by one program
    stride_dob,
    stride_dot,
    stride_dcb,
    stride_dct,
    stride_yb,
    stride_yt,
    stride_gate,  # row stride of GATE
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    gate = tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    dgate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_start = block.to(tl.int64) * rows_per_program
    t_end = tl.minimum(t_start + rows_per_program, T)
    for t in tl.range(t_start, t_end, num_stages=NUM_STAGES):
        dout = tl.load(DOUT + b * stride_dob + t * stride_dot + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * stride_yb + t * stride_yt + cols, mask=mask, other=0.0).to(tl.float32)
        if DCOPY is not None:
            dout += tl.load(DCOPY + b * stride_dcb + t * stride_dct + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + (b * T + t) * D + cols, dout.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + (b * T + t) * D + cols, (gate * dout).to(DY.dtype.element_ty), mask=mask)
        dgate += dout * y
    tl.store(DGATE_PART + (b * tl.num_programs(0) + block) * D + cols, dgate, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _config(D: int, backward: bool) -> dict:
    """Launch configuration for rows of width D; the token count does not enter (the backward's tokens per
    program are a runtime argument). One row per program. The backward keeps three fp32 partial-sum rows and two
    (B, D) vectors live across its token loop, so it spreads a row over twice as many threads: ~4 fp32 values per
    thread per row tensor (at D = 1152: 64 registers, two programs per SM) instead of ~8 in the forward.
    Compiled for sm_80 / sm_90 nothing spills up to D = 4096; at D = 8192 the backward spills (correct, slower)."""
    if D > MAX_D:
        raise ValueError(f"modulation kernels hold one row of D <= {MAX_D} values per program, got D = {D}; "
                         "use backend='torch' for wider rows")
    block_d = triton.next_power_of_2(D)
    num_warps = min(max(block_d // (128 if backward else 256), 1), 16)
    return launch_config(num_warps, BLOCK_D=block_d)


MIN_TOKENS_PER_PROGRAM = 8  # a program's own rows (vectors read, partial sums written) stay a small part of its traffic


def _tokens_per_program(kernel, args, options: dict, B: int, T: int, D: int, device: torch.device) -> int:
    """Tokens one program walks: whole waves of the programs per SM the compiled kernel allows, read from it
    (utils.compiled_programs_per_sm), over the device's SMs (utils.tokens_per_program). args(rows, part) are the
    launch arguments with `part` standing for a backward's partial-sum buffers; rows_per_program is not
    specialised on, so the kernel measured is the one launched."""
    part = torch.empty((B, 1, D), device=device, dtype=torch.float32)
    programs = compiled_programs_per_sm(kernel, args(MIN_TOKENS_PER_PROGRAM, part), options, device)
    return tokens_per_program(B, T, programs * sm_count(device), MIN_TOKENS_PER_PROGRAM)


def _rows(t: Tensor | None) -> Tensor | None:
    """The kernels need unit stride along D; any batch / token / row strides are read in place."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _bt_strides(t: Tensor | None) -> tuple[int, int]:
    """Batch and token strides of a (B, T, D) tensor; (0, 0) for one the kernel does not read."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _row_stride(v: Tensor | None) -> int:
    """Row stride of a (B, D) vector; 0 for one the kernel does not read."""
    return v.stride(0) if v is not None else 0


def _result_dtype(*tensors: Tensor | None) -> torch.dtype:
    """The dtype PyTorch's expression over the tensors (None: not there) gives: type promotion."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))


def _check_triton(x: Tensor, *others: Tensor | None) -> dict:
    """Checks only the Triton path needs; returns the forward's launch configuration."""
    for t in (x, *others):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"modulation kernels support {SUPPORTED_DTYPES}, got {t.dtype}; cast the inputs or "
                            "use backend='torch'")
    if x.numel() == 0:
        raise ValueError(f"modulation kernels need at least one token, got x of shape {tuple(x.shape)}")
    return _config(x.shape[-1], backward=False)


def _launch_modulate_fwd(x, gate, y, shift, scale, eps: float, m_dtype: torch.dtype):
    """(h, m, mean, rstd) as in the kernel, m in m_dtype; without y (plain modulate) h is None and m = modulate(x).
    With y and no gate the gate is 1."""
    residual = y is not None
    cfg = _check_triton(x, shift, scale, gate, y)
    x, gate, y, shift, scale = map(_rows, (x, gate, y, shift, scale))
    B, T, D = x.shape
    h = torch.empty((B, T, D), device=x.device, dtype=_result_dtype(x, gate, y)) if residual else None
    m = torch.empty((B, T, D), device=x.device, dtype=m_dtype)
    mean = torch.empty(B * T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    def args(rows, _):
        return (x, gate, y, shift, scale, h, m, mean, rstd, T, D, rows, *_bt_strides(x), *_bt_strides(y),
                _row_stride(gate), _row_stride(shift), _row_stride(scale), eps)

    options = {"HAS_RESIDUAL": residual, **launch_options(cfg)}
    rows = _tokens_per_program(_modulate_fwd_kernel, args, options, B, T, D, x.device)
    _modulate_fwd_kernel[(triton.cdiv(T, rows), B)](*args(rows, None), **options)
    return h, m, mean, rstd


def _launch_modulate_bwd(dh, dm, x, gate, y, scale, mean, rstd, shift_dtype: torch.dtype):
    """(dx, dgate, dy, dshift, dscale); without y (plain modulate) dgate and dy are None, without gate dgate is."""
    residual = y is not None
    cfg = _config(x.shape[-1], backward=True)
    dh, dm, x, gate, y, scale = map(_rows, (dh, dm, x, gate, y, scale))
    B, T, D = x.shape
    dx = torch.empty((B, T, D), device=x.device, dtype=x.dtype)
    dy = torch.empty((B, T, D), device=x.device, dtype=y.dtype) if residual else None

    def args(rows, dshift, dscale, dgate):
        return (dm, dh, x, gate, y, scale, mean, rstd, dx, dy, dshift, dscale, dgate,
                T, D, rows, *_bt_strides(dm), *_bt_strides(dh), *_bt_strides(x), *_bt_strides(y),
                _row_stride(gate), _row_stride(scale))

    options = {"HAS_RESIDUAL": residual, **launch_options(cfg)}
    def warmup_args(rows, part):  # one buffer standing for the partial sums
        return args(rows, part, part, None if gate is None else part)

    rows = _tokens_per_program(_modulate_bwd_kernel, warmup_args, options, B, T, D, x.device)
    n_blocks = triton.cdiv(T, rows)
    dshift = torch.empty((B, n_blocks, D), device=x.device, dtype=torch.float32)
    dscale = torch.empty_like(dshift)
    dgate = torch.empty_like(dshift) if gate is not None else None
    _modulate_bwd_kernel[(n_blocks, B)](*args(rows, dshift, dscale, dgate), **options)
    dgate = dgate.sum(1).to(gate.dtype) if gate is not None else None
    return dx, dgate, dy, dshift.sum(1).to(shift_dtype), dscale.sum(1).to(scale.dtype)


def _launch_gated_residual_fwd(x, gate, y, copy_dtype: torch.dtype | None):
    """[x + gate * y] (B, T, D), and its copy in copy_dtype when one is asked for."""
    cfg = _check_triton(x, gate, y)
    x, gate, y = map(_rows, (x, gate, y))
    B, T, D = x.shape
    out = torch.empty((B, T, D), device=x.device, dtype=_result_dtype(x, gate, y))
    copy = torch.empty((B, T, D), device=x.device, dtype=copy_dtype) if copy_dtype is not None else None
    def args(rows, _):
        return x, gate, y, out, copy, T, D, rows, *_bt_strides(x), *_bt_strides(y), _row_stride(gate)

    options = launch_options(cfg)
    rows = _tokens_per_program(_gated_residual_fwd_kernel, args, options, B, T, D, x.device)
    _gated_residual_fwd_kernel[(triton.cdiv(T, rows), B)](*args(rows, None), **options)
    return [out] if copy is None else [out, copy]


def _launch_gated_residual_bwd(dout, dcopy, gate, y, x_dtype: torch.dtype):
    """[dgate, dy], and dx = dout + dcopy with a copy's gradient (without it the grad of x is dout itself)."""
    cfg = _config(y.shape[-1], backward=True)
    dout, dcopy, gate, y = map(_rows, (dout, dcopy, gate, y))
    B, T, D = y.shape
    dx = torch.empty((B, T, D), device=y.device, dtype=x_dtype) if dcopy is not None else None
    dy = torch.empty((B, T, D), device=y.device, dtype=y.dtype)

    def args(rows, dgate):
        return (dout, dcopy, gate, y, dx, dy, dgate, T, D, rows, *_bt_strides(dout), *_bt_strides(dcopy),
                *_bt_strides(y), _row_stride(gate))

    options = launch_options(cfg)
    rows = _tokens_per_program(_gated_residual_bwd_kernel, args, options, B, T, D, y.device)
    dgate = torch.empty((B, triton.cdiv(T, rows), D), device=y.device, dtype=torch.float32)
    _gated_residual_bwd_kernel[(dgate.shape[1], B)](*args(rows, dgate), **options)
    return [dgate.sum(1).to(gate.dtype), dy] + ([dx] if dx is not None else [])


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration (torch.compile sees these ops and their fakes)
# ----------------------------------------------------------------------------------------------------------------


def _empty_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape, dtype=dtype)


def _empty_stats(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)


def _empty_vector(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[2]), dtype=dtype)


@torch.library.custom_op("pixart_fast::modulate_fwd", mutates_args=())
def _modulate_fwd_op(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, m_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    _, m, mean, rstd = _launch_modulate_fwd(x, None, None, shift, scale, eps, m_dtype)
    return m, mean, rstd


@_modulate_fwd_op.register_fake
def _(x, shift, scale, eps, m_dtype):
    return _empty_rows(x, m_dtype), _empty_stats(x), _empty_stats(x)


@torch.library.custom_op("pixart_fast::modulate_bwd", mutates_args=())
def _modulate_bwd_op(
    dm: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, shift_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    dx, _, _, dshift, dscale = _launch_modulate_bwd(None, dm, x, None, None, scale, mean, rstd, shift_dtype)
    return dx, dshift, dscale


@_modulate_bwd_op.register_fake
def _(dm, x, scale, mean, rstd, shift_dtype):
    return _empty_rows(x, x.dtype), _empty_vector(x, shift_dtype), _empty_vector(x, scale.dtype)


@torch.library.custom_op("pixart_fast::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd_op(x: Tensor, gate: Tensor, y: Tensor, copy_dtype: torch.dtype | None) -> list[Tensor]:
    return _launch_gated_residual_fwd(x, gate, y, copy_dtype)


@_gated_residual_fwd_op.register_fake
def _(x, gate, y, copy_dtype):
    out = _empty_rows(x, _result_dtype(x, gate, y))
    return [out] if copy_dtype is None else [out, _empty_rows(x, copy_dtype)]


@torch.library.custom_op("pixart_fast::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(
    dout: Tensor, dcopy: Tensor | None, gate: Tensor, y: Tensor, x_dtype: torch.dtype
) -> list[Tensor]:
    return _launch_gated_residual_bwd(dout, dcopy, gate, y, x_dtype)


@_gated_residual_bwd_op.register_fake
def _(dout, dcopy, gate, y, x_dtype):
    grads = [_empty_vector(y, gate.dtype), _empty_rows(y, y.dtype)]
    return grads if dcopy is None else grads + [_empty_rows(y, x_dtype)]


@torch.library.custom_op("pixart_fast::gated_residual_modulate_fwd", mutates_args=())
def _gated_residual_modulate_fwd_op(
    x: Tensor, gate: Tensor | None, y: Tensor, shift: Tensor, scale: Tensor, eps: float, m_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_launch_modulate_fwd(x, gate, y, shift, scale, eps, m_dtype))


@_gated_residual_modulate_fwd_op.register_fake
def _(x, gate, y, shift, scale, eps, m_dtype):
    return _empty_rows(x, _result_dtype(x, gate, y)), _empty_rows(x, m_dtype), _empty_stats(x), _empty_stats(x)


@torch.library.custom_op("pixart_fast::gated_residual_modulate_bwd", mutates_args=())
def _gated_residual_modulate_bwd_op(
    dh: Tensor, dm: Tensor, x: Tensor, gate: Tensor | None, y: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor,
    shift_dtype: torch.dtype,
) -> list[Tensor]:
    """[dx, dy, dshift, dscale], then dgate when there is a gate."""
    dx, dgate, dy, dshift, dscale = _launch_modulate_bwd(dh, dm, x, gate, y, scale, mean, rstd, shift_dtype)
    return [dx, dy, dshift, dscale] + ([dgate] if gate is not None else [])


@_gated_residual_modulate_bwd_op.register_fake
def _(dh, dm, x, gate, y, scale, mean, rstd, shift_dtype):
    grads = [_empty_rows(x, x.dtype), _empty_rows(y, y.dtype), _empty_vector(x, shift_dtype),
             _empty_vector(x, scale.dtype)]
    return grads + ([_empty_vector(x, gate.dtype)] if gate is not None else [])


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


class ModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, m_dtype):
        m, mean, rstd = torch.ops.pixart_fast.modulate_fwd(x, shift, scale, eps, m_dtype)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return m

    @staticmethod
    def backward(ctx, dm):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.pixart_fast.modulate_bwd(dm, x, scale, mean, rstd, ctx.shift_dtype)
        return dx, dshift, dscale, None, None


class GatedResidualFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, copy_dtype):
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        outs = torch.ops.pixart_fast.gated_residual_fwd(x, gate, y, copy_dtype)
        return tuple(outs) if copy_dtype is not None else outs[0]

    @staticmethod
    def backward(ctx, dout, dcopy=None):  # dcopy: there only with a copy
        gate, y = ctx.saved_tensors
        grads = torch.ops.pixart_fast.gated_residual_bwd(dout, dcopy, gate, y, ctx.x_dtype)
        dx = grads[2] if dcopy is not None else dout.to(ctx.x_dtype)
        return dx, grads[0], grads[1], None


class GatedResidualModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, shift, scale, eps, m_dtype):
        h, m, mean, rstd = torch.ops.pixart_fast.gated_residual_modulate_fwd(x, gate, y, shift, scale, eps, m_dtype)
        # Save the inputs, not h: backward recomputes h = x + gate * y in fp32, exactly as the forward did.
        ctx.save_for_backward(x, gate, y, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return h, m

    @staticmethod
    def backward(ctx, dh, dm):
        x, gate, y, scale, mean, rstd = ctx.saved_tensors
        dx, dy, dshift, dscale, *dgate = torch.ops.pixart_fast.gated_residual_modulate_bwd(
            dh, dm, x, gate, y, scale, mean, rstd, ctx.shift_dtype
        )
        return dx, dgate[0] if dgate else None, dy, dshift, dscale, None, None


# ----------------------------------------------------------------------------------------------------------------
# Functional entry points
# ----------------------------------------------------------------------------------------------------------------


def _check_shapes(x: Tensor, y: Tensor | None = None, **vectors: Tensor | None) -> None:
    """x (and y): (B, T, D); every vector given: (B, D); all on x's device."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, D), got shape {tuple(x.shape)}")
    B, T, D = x.shape
    if y is not None and y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    vectors = {name: v for name, v in vectors.items() if v is not None}
    for name, v in vectors.items():
        if v.shape != (B, D):
            raise ValueError(
                f"{name} must be (B, D) = ({B}, {D}) for x of shape {tuple(x.shape)}, got {tuple(v.shape)}; "
                "pass one vector per sample (squeeze a (B, 1, D) chunk to (B, D))"
            )
    for name, t in ({"y": y} | vectors).items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, backend: str = "auto",
             out_dtype: torch.dtype | None = None) -> Tensor:
    """adaLN modulation LN(x) * (1 + scale) + shift, LN over D without affine parameters.

    x: (B, T, D); shift, scale: (B, D) per-sample vectors (strided views allowed), broadcast over the T tokens.
    Returns (B, T, D) in out_dtype (the next Linear's dtype: the kernel writes it, no cast pass), by default the
    promoted dtype of (x, shift, scale). Its gradient is read in whatever dtype it arrives. Triton: D <= 8192.
    """
    _check_shapes(x, shift=shift, scale=scale)
    if not use_triton(backend, x):
        return modulate_ref(x, shift, scale, eps, out_dtype)
    return ModulateFunction.apply(x, shift, scale, eps, out_dtype or _result_dtype(x, shift, scale))


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, backend: str = "auto",
                   copy_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Gated residual x + gate * y. x, y: (B, T, D); gate: (B, D) broadcast over tokens. Returns (B, T, D) in the
    promoted dtype; with copy_dtype, (out, out in copy_dtype): the residual stream and, written by the same pass,
    the next Linear's input (gradients flow from both)."""
    _check_shapes(x, y, gate=gate)
    if not use_triton(backend, x):
        return gated_residual_ref(x, gate, y, copy_dtype)
    return GatedResidualFunction.apply(x, gate, y, copy_dtype)


def gated_residual_modulate(
    x: Tensor, gate: Tensor | None, y: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
    backend: str = "auto", out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The residual add of one branch fused with the next branch's LayerNorm + modulation, in one pass.

    x, y: (B, T, D) residual stream and branch output; gate, shift, scale: (B, D) per-sample vectors; gate None
    is a plain residual add (gate 1). Returns (h, m): h = x + gate * y, the new residual stream in the promoted
    dtype, and m = LN(h) * (1 + scale) + shift in out_dtype (default: promoted), both (B, T, D).
    Gradients flow from both h and m. Triton: D <= 8192.
    """
    _check_shapes(x, y, gate=gate, shift=shift, scale=scale)
    if not use_triton(backend, x):
        return gated_residual_modulate_ref(x, gate, y, shift, scale, eps, out_dtype)
    m_dtype = out_dtype or _result_dtype(x, gate, y, shift, scale)
    return GatedResidualModulateFunction.apply(x, gate, y, shift, scale, eps, m_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs
# ----------------------------------------------------------------------------------------------------------------


def aot_specs(sms: int = 132, D: int = 1152, batch: int = 8, tokens=(256, 1024, 4096),
              capability: int = 90) -> list[dict]:
    """The launches PixArt-XL/2's blocks make, forward and backward, for ahead-of-time compilation (kernels/aot.py).

    The real launchers run on meta tensors shaped, strided and typed as the model's (the kernels' launches are
    recorded, not run): D = 1152, batch 8, T = 256 / 1024 / 4096 tokens (256 / 512 / 1024 px), on a GPU of `sms`
    SMs (the backward's tokens per program depend on it). Dtypes as pixart_fast/model.py gives them under bf16 and
    fp16 autocast and in fp32: the residual stream x is fp32 (the fp32 pos_embed promotes it), shift / scale /
    gate are fp32 (the fp32 scale_shift_table + t0) row-stride 6D views, the branch output y is the autocast dtype
    (a Linear's output); what feeds a Linear (m, the residual's copy) is written in the autocast dtype and its
    gradient arrives in it, the residual stream's gradient is fp32. The calls, in a block's order: the model's
    first modulate, the attention's gated residual (with the query copy under autocast), the cross-attention's
    residual add fused with the MLP's modulate (gate 1, "_add"), the MLP's gated residual fused with the next
    modulate ("_residual"). `capability` (the target's, as every module's aot_specs() takes it) changes none of
    these launches. Each entry: {"name", "call", "fn", "args", "kwargs", "grid"}; kernels/aot.py
    specialises the arguments as Triton's JIT would and compiles each distinct specialisation once.
    """
    from .utils import recorded_launches

    kernels = (_modulate_fwd_kernel, _modulate_bwd_kernel, _gated_residual_fwd_kernel, _gated_residual_bwd_kernel)
    specs = []
    for regime, low in (("bf16 autocast", torch.bfloat16), ("fp16 autocast", torch.float16), ("fp32", torch.float32)):
        copy = low if low != torch.float32 else None
        for T in tokens:
            x = torch.empty(batch, T, D, dtype=torch.float32, device="meta")  # the residual stream
            y = torch.empty(batch, T, D, dtype=low, device="meta")  # attn / cross-attn / mlp output
            t0 = torch.empty(batch, 6 * D, dtype=low, device="meta")  # t_block output
            table = torch.empty(6, D, dtype=torch.float32, device="meta")  # a block's scale_shift_table
            shift, scale, gate = (table[None] + t0.reshape(batch, 6, D)).unbind(1)[:3]
            dx = torch.empty_like(x)  # the residual stream's gradient
            with recorded_launches(globals(), kernels, sms, capability) as calls:
                _, m, mean, rstd = _launch_modulate_fwd(x, None, None, shift, scale, 1e-6, low)
                _launch_modulate_bwd(None, torch.empty_like(m), x, None, None, scale, mean, rstd, shift.dtype)
                outs = _launch_gated_residual_fwd(x, gate, y, copy)
                _launch_gated_residual_bwd(dx, torch.empty_like(outs[-1]) if copy else None, gate, y, x.dtype)
                for g in (None, gate):
                    _, m, mean, rstd = _launch_modulate_fwd(x, g, y, shift, scale, 1e-6, low)
                    _launch_modulate_bwd(dx, torch.empty_like(m), x, g, y, scale, mean, rstd, shift.dtype)
            for call in calls:
                args = dict(zip(call["fn"].arg_names, call["args"]))
                suffix = ("_add" if args["GATE"] is None else "_residual") if call["kwargs"].get("HAS_RESIDUAL") \
                    else "_copy" if args.get("COPY") is not None or args.get("DCOPY") is not None else ""
                name = call["fn"].__name__.strip("_").removesuffix("_kernel") + suffix
                specs.append({"name": name, "call": f"{regime} B={batch} T={T}", **call})
    return specs
