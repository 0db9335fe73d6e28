"""Triton: per-example LoRA gradients in one kernel launch.

    gB_i = scale Σ_s m_is dy_is (A x_is)ᵀ   (d_out, r)      gA_i = scale Σ_s m_is (Bᵀ dy_is) x_isᵀ   (r, d_in)

One program per (chunk of ``BLOCK_S`` rows of example i, tile of ``BLOCK_R`` ranks), the same plan as
``csrc/lora_per_sample_grads.cu``. Phase 1 streams the chunk's x and dy tiles and forms u = x Aᵀ and
v = dy B in registers (tensor cores, float32 accumulation), then folds scale and the mask into them.
Phase 2 streams the same tiles again (usually from L2) and writes the chunk's partial gB = dyᵀ u and
gA = vᵀ x straight to its own output slot; the chunk partials are summed afterwards (deterministic, no
atomics). Compared with the unfused reference this reads x and dy in their own dtype with no float32
copies, no masked copy of dy and no u/v round trip through device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["lora_per_sample_grads_triton"]


@triton.jit
def _lora_per_sample_grads_kernel(
    X,
    DY,
    A,
    B,
    MASK,
    GA,
    GB,
    S,
    din,
    dout,
    r,
    n_chunks,
    scale,
    sxn,
    sxs,
    sxd,
    syn,
    sys_,
    syd,
    sar,
    sad,
    sbo,
    sbr,
    smn,
    sms,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_c = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    pid_r = tl.program_id(2)
    offs_s = pid_c * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < r
    offs_b = tl.arange(0, BLOCK_D)
    x_rows = X + i * sxn + offs_s.to(tl.int64)[:, None] * sxs
    y_rows = DY + i * syn + offs_s.to(tl.int64)[:, None] * sys_
    op_dtype = X.dtype.element_ty

    # ---- phase 1: u = x Aᵀ, v = dy B for the chunk's rows
    u = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, din, BLOCK_D):
        offs_d = d0 + offs_b
        d_ok = offs_d < din
        x = tl.load(x_rows + offs_d[None, :] * sxd, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        a = tl.load(A + offs_r[:, None] * sar + offs_d[None, :] * sad, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        u = tl.dot(x, tl.trans(a.to(op_dtype)), u, input_precision=PRECISION)
    v = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, dout, BLOCK_D):
        offs_d = d0 + offs_b
        d_ok = offs_d < dout
        y = tl.load(y_rows + offs_d[None, :] * syd, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(B + offs_d[:, None] * sbo + offs_r[None, :] * sbr, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        v = tl.dot(y, b.to(op_dtype), v, input_precision=PRECISION)
    w = tl.where(s_ok, scale, 0.0)
    if HAS_MASK:
        w = w * tl.load(MASK + i * smn + offs_s * sms, mask=s_ok, other=0.0).to(tl.float32)
    u_op = (u * w[:, None]).to(op_dtype)
    v_op = (v * w[:, None]).to(op_dtype)

    # ---- phase 2: this chunk's gB = dyᵀ u and gA = vᵀ x
    gb_base = GB + (i * n_chunks + pid_c) * dout * r
    for d0 in range(0, dout, BLOCK_D):
        offs_d = d0 + offs_b
        d_ok = offs_d < dout
        y = tl.load(y_rows + offs_d[None, :] * syd, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        gb = tl.dot(tl.trans(y), u_op, input_precision=PRECISION)  # (BLOCK_D, BLOCK_R)
        tl.store(gb_base + offs_d[:, None] * r + offs_r[None, :], gb, mask=d_ok[:, None] & r_ok[None, :])
    ga_base = GA + (i * n_chunks + pid_c) * r * din
    for d0 in range(0, din, BLOCK_D):
        offs_d = d0 + offs_b
        d_ok = offs_d < din
        x = tl.load(x_rows + offs_d[None, :] * sxd, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        ga = tl.dot(tl.trans(v_op), x, input_precision=PRECISION)  # (BLOCK_R, BLOCK_D)
        tl.store(ga_base + offs_r[:, None] * din + offs_d[None, :], ga, mask=r_ok[:, None] & d_ok[None, :])


def _config(dtype: torch.dtype, S: int, r: int) -> dict:
    if _common.interpreting():
        return {"BLOCK_S": 16, "BLOCK_R": 16, "BLOCK_D": 16, "num_warps": 1, "num_stages": 1}
    block_r = min(64, max(16, triton.next_power_of_2(r)))
    block_s = 64 if S <= 2048 else 128
    return {
        "BLOCK_S": block_s,
        "BLOCK_R": block_r,
        "BLOCK_D": 64 if dtype != torch.float32 else 32,
        "num_warps": 4,
        "num_stages": 3,
    }


def lora_per_sample_grads_triton(x, dy, A, B, scale=1.0, mask=None, *, return_sq_norms=False, config=None):
    """Triton version of :func:`fastinf.ops.lora_per_sample_grads_reference` (same contract).

    ``config``: optional dict of block sizes overriding the default (for tuning runs).
    Under ``TRITON_INTERPRET=1`` bfloat16 inputs are upcast to float32 (the interpreter mishandles bf16).
    """
    x, dy = _common.interp_upcast(x, dy)
    x, dy, A, B = _common.lora_inputs(x, dy, A, B)
    N, S, din = x.shape
    dout, r = B.shape
    cfg = dict(config or _config(x.dtype, S, r))
    n_chunks = triton.cdiv(S, cfg["BLOCK_S"]) if S else 0
    pA = torch.empty(N, n_chunks, r, din, dtype=torch.float32, device=x.device)
    pB = torch.empty(N, n_chunks, dout, r, dtype=torch.float32, device=x.device)
    if N and n_chunks and r:
        has_mask = mask is not None
        m = mask.to(device=x.device) if has_mask else x  # dummy pointer when there is no mask
        if has_mask and m.dtype == torch.bool:
            m = m.to(torch.float32)
        grid = (n_chunks, N, triton.cdiv(r, cfg["BLOCK_R"]))
        _lora_per_sample_grads_kernel[grid](
            x, dy, A, B, m, pA, pB, S, din, dout, r, n_chunks, float(scale),
            *x.stride(), *dy.stride(), *A.stride(), *B.stride(),
            m.stride(0) if has_mask else 0, m.stride(1) if has_mask else 0,
            HAS_MASK=has_mask, PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32", **cfg,
        )  # fmt: skip
    return _common.lora_finish(pA, pB, return_sq_norms)
