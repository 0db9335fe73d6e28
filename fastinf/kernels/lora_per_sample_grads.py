"""Triton: per-example LoRA gradients, reading x and dy once each.

    gB_i = scale Σ_s m_is dy_is u_isᵀ   (d_out, r)      gA_i = scale Σ_s m_is v_is x_isᵀ   (r, d_in)

with u = x Aᵀ (recorded by the capture hook; computed here with one torch GEMM when not given) and
v = dy B. Two launches, the same plan as ``csrc/lora_per_sample_grads.cu``:

* ``_lora_dy_kernel``: one program per (example i, tile of ``BLOCK_D`` columns of d_out, split of S). It streams
  its dy tile over S once and forms both gB's tile (dyᵀ u_op, accumulated over S in registers) and the
  tile's piece of v = dy B (``BLOCK_S`` × r per step, written to a (N, ⌈d_out/BLOCK_D⌉, S, r) float32 buffer
  that glue sums in a fixed order: r/BLOCK_D · 8 bytes per dy element written and read, 1/4 of bf16 dy's
  bytes at r = 16 and BLOCK_D = 256). Where that would cost more than reading dy again (8r ≥ BLOCK_D × element
  size: r ≥ 64 in bf16), ``_lora_v_kernel`` computes v in a pass of its own instead
  (:func:`fastinf.kernels._common.lora_v_pieces`).
* ``_lora_x_kernel``: one program per (example i, tile of d_in, split of S) streams its x tile over S once and
  accumulates gA's tile = v_opᵀ x.

All ranks r sit in one tile (``BLOCK_R`` = next power of two ≥ 16; the d tile shrinks as r grows), so the
inputs are read once for any rank. S is split only when N × tiles would not fill the GPU (about two waves);
the (N, splits, …) partials are summed afterwards, so results are deterministic (no atomics) and no buffer
grows with S except v's pieces. Every program index is on grid axis 0 (no 65 535 limit on N).

Rounding plan (what :func:`fastinf.kernels._emulate.lora_emulated` reproduces in float64): x, dy and B in the
input dtype; u·w and v·w (w = scale · mask) each rounded once to the input dtype after an exact per-example
power-of-two scaling (:func:`fastinf.kernels._common.pow2_normalise`), so fp16 operands never fall into the
subnormal range because of their overall size; products accumulate in float32; outputs float32. float32
inputs use 3×TF32 (about float32 accuracy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["lora_per_sample_grads_triton"]


@triton.jit
def _lora_dy_kernel(
    DY,
    U,
    B,
    GB,
    VP,
    EU,
    S,
    dout,
    r,
    n_tiles,
    n_splits,
    s_per_split,
    syn,
    sys_,
    syd,
    sbo,
    sbr,
    WRITE_V: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid % n_tiles  # d tiles of one example are adjacent: u_i is read from L2 by all but the first
    rest = pid // n_tiles
    p = rest % n_splits
    i = (rest // n_splits).to(tl.int64)
    offs_d = t * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dout
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < r
    op_dtype = DY.dtype.element_ty
    b = tl.load(B + offs_d[:, None] * sbo + offs_r[None, :] * sbr, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_D, BLOCK_R), dtype=tl.float32)
    s_lo = p * s_per_split
    s_hi = tl.minimum(s_lo + s_per_split, S)
    y_base = DY + i * syn
    u_base = U + i * S * r
    vp_base = VP + (i * n_tiles + t) * S * r
    for s0 in range(s_lo, s_hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < s_hi
        y = tl.load(
            y_base + offs_s.to(tl.int64)[:, None] * sys_ + offs_d[None, :] * syd,
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        u = tl.load(u_base + offs_s[:, None] * r + offs_r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(y), u, acc, input_precision=PRECISION)  # gB tile += dyᵀ u_op
        if WRITE_V:  # this tile's piece of v = dy B
            v = tl.dot(y, b.to(op_dtype), input_precision=PRECISION)
            tl.store(vp_base + offs_s[:, None] * r + offs_r[None, :], v, mask=s_ok[:, None] & r_ok[None, :])
    acc = acc * tl.load(EU + i)
    gb = GB + (i * n_splits + p) * dout * r
    tl.store(gb + offs_d[:, None] * r + offs_r[None, :], acc, mask=d_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_v_kernel(
    DY,
    B,
    V,
    S,
    dout,
    r,
    syn,
    sys_,
    syd,
    sbo,
    sbr,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """v = dy B (N, S, r) float32, one program per (example, BLOCK_S rows), all of d_out: the pass the dy
    kernel leaves out when v's pieces would cost more than this extra read of dy (large r)."""
    pid = tl.program_id(0)
    n_sb = tl.cdiv(S, BLOCK_S)
    i = (pid // n_sb).to(tl.int64)
    offs_s = (pid % n_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < r
    op_dtype = DY.dtype.element_ty
    acc = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, dout, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dout
        y = tl.load(
            DY + i * syn + offs_s.to(tl.int64)[:, None] * sys_ + offs_d[None, :] * syd,
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        b = tl.load(B + offs_d[:, None] * sbo + offs_r[None, :] * sbr, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(y, b.to(op_dtype), acc, input_precision=PRECISION)
    tl.store(V + i * S * r + offs_s[:, None] * r + offs_r[None, :], acc, mask=s_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_x_kernel(
    X,
    V,
    GA,
    EV,
    S,
    din,
    r,
    n_tiles,
    n_splits,
    s_per_split,
    sxn,
    sxs,
    sxd,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    t = pid % n_tiles
    rest = pid // n_tiles
    p = rest % n_splits
    i = (rest // n_splits).to(tl.int64)
    offs_d = t * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < din
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < r
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    s_lo = p * s_per_split
    s_hi = tl.minimum(s_lo + s_per_split, S)
    x_base = X + i * sxn
    v_base = V + i * S * r
    for s0 in range(s_lo, s_hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < s_hi
        x = tl.load(
            x_base + offs_s.to(tl.int64)[:, None] * sxs + offs_d[None, :] * sxd,
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        v = tl.load(v_base + offs_s[:, None] * r + offs_r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(v), x, acc, input_precision=PRECISION)  # gA tile += v_opᵀ x
    acc = acc * tl.load(EV + i)
    ga = GA + (i * n_splits + p) * r * din
    tl.store(ga + offs_r[:, None] * din + offs_d[None, :], acc, mask=r_ok[:, None] & d_ok[None, :])


def _config(dtype: torch.dtype, r: int) -> dict:
    """Block sizes: the whole rank in one tile; the d tile shrinks as r grows (accumulator ≈ 8 K floats)."""
    block_r = max(16, triton.next_power_of_2(max(1, r)))
    if _common.interpreting():
        return {"BLOCK_S": 16, "BLOCK_R": block_r, "BLOCK_D": 16, "BLOCK_D_DY": 16, "num_warps": 1, "num_stages": 1}
    bd = max(16, min(128, 8192 // block_r))
    return {
        "BLOCK_S": 64 if dtype != torch.float32 else 32,
        "BLOCK_R": block_r,
        "BLOCK_D": bd,  # d_in tile (x kernel)
        "BLOCK_D_DY": max(16, min(256, 8192 // block_r)),  # d_out tile (dy kernel): fewer v pieces
        "num_warps": 4 if bd * block_r <= 4096 else 8,
        "num_stages": 3,
    }


def lora_per_sample_grads_triton(x, dy, A, B, scale=1.0, mask=None, *, u=None, return_sq_norms=False, config=None):
    """Triton version of :func:`fastinf.ops.lora_per_sample_grads_reference` (same contract).

    ``u``: (N, S, r) = x Aᵀ as the capture hook recorded it (None: computed with one torch GEMM).
    ``config``: optional dict of block sizes overriding the default (for tuning runs).
    Under ``TRITON_INTERPRET=1`` bfloat16 inputs are upcast to float32 (the interpreter mishandles bf16).
    """
    if u is not None:
        x, dy, u = _common.interp_upcast(x, dy, u)
    else:
        x, dy = _common.interp_upcast(x, dy)
    x, dy, B, u_op, eu, w = _common.lora_prepare(x, dy, A, B, scale, mask, u)
    N, S, din = x.shape
    dout, r = B.shape
    cfg = dict(config or _config(x.dtype, r))
    bs, br = cfg.pop("BLOCK_S"), cfg.pop("BLOCK_R")
    bd_x = cfg.pop("BLOCK_D")
    bd_y = cfg.pop("BLOCK_D_DY", None) or bd_x
    if br < r:
        raise ValueError(f"lora_per_sample_grads_triton: BLOCK_R={br} must be >= r={r}")
    prec = "tf32x3" if x.dtype == torch.float32 else "tf32"
    sms = _common.sm_count(x.device)
    dev = x.device
    t_y = triton.cdiv(dout, bd_y) if dout else 0
    p_y, per_y = _common.lora_splits(N, S, t_y, bs, sms)
    run_y = bool(N and S and r and dout)
    pieces = _common.lora_v_pieces(r, bd_y, x.element_size())
    alloc = torch.empty if run_y else torch.zeros  # the kernels write every element they are launched for
    pB = alloc(N, p_y, dout, r, dtype=torch.float32, device=dev)
    vp = alloc(N, max(t_y, 1) if pieces else 1, S, r, dtype=torch.float32, device=dev)
    if run_y:
        _lora_dy_kernel[(N * t_y * p_y,)](
            dy, u_op, B, pB, vp, eu, S, dout, r, t_y, p_y, per_y, *dy.stride(), *B.stride(),
            WRITE_V=pieces, PRECISION=prec, BLOCK_S=bs, BLOCK_R=br, BLOCK_D=bd_y, **cfg,
        )  # fmt: skip
        if not pieces:
            _lora_v_kernel[(N * triton.cdiv(S, bs),)](
                dy, B, vp, S, dout, r, *dy.stride(), *B.stride(),
                PRECISION=prec, BLOCK_S=bs, BLOCK_R=br, BLOCK_D=bd_x, **cfg,
            )  # fmt: skip
    v_op, ev = _common.lora_v_operand(vp, w, scale, x.dtype)
    t_x = triton.cdiv(din, bd_x) if din else 0
    p_x, per_x = _common.lora_splits(N, S, t_x, bs, sms)
    run_x = bool(N and S and r and din)
    pA = (torch.empty if run_x else torch.zeros)(N, p_x, r, din, dtype=torch.float32, device=dev)
    if run_x:
        _lora_x_kernel[(N * t_x * p_x,)](
            x, v_op, pA, ev, S, din, r, t_x, p_x, per_x, *x.stride(),
            PRECISION=prec, BLOCK_S=bs, BLOCK_R=br, BLOCK_D=bd_x, **cfg,
        )  # fmt: skip
    return _common.lora_finish(pA, pB, return_sq_norms)
