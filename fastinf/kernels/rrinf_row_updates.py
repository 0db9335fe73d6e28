"""Triton: RRInf's multi-test normalised SGD on Ω, all steps in one launch.

For each step (rows φ_j of the step's batch):  E_j = φ_jᵀΩ − υ_j,
Ω ← Ω − lr_s (2/c Σ_{j: ‖φ_j‖>0} φ_j E_j / ‖φ_j‖² + 2 reg Ω),  c = number of non-zero rows; a step whose rows
are all zero leaves Ω unchanged.

Launch design (the same as ``csrc/rrinf_row_updates.cu``): column j of Ω evolves independently of every
other column (its update needs φ, υ_j and column j only), so each program owns ``BLOCK_M`` columns for all
steps and keeps them in registers; no grid-wide synchronisation and no per-step launches. The per-step
work is one pass over φ (dot products and ‖φ‖², reduced across the program) and one update. For m = 1 this
is the cooperative single-block design; for m ≥ #SMs one column per program fills the GPU. Ω is held in
registers as a (next_pow2(n), BLOCK_M) block, so this kernel takes n ≤ 16384 (the CUDA kernel has no limit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["rrinf_row_updates_triton", "supports", "MAX_N"]

MAX_N = 16384


@triton.jit
def _rrinf_row_updates_kernel(
    R,
    Y,
    W0,
    LR,
    OUT,
    n,
    m,
    steps,
    bsz,
    reg,
    srt,
    srn,
    syt,
    sym,
    swn,
    swm,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < n
    m_ok = offs_m < m
    w_mask = n_ok[:, None] & m_ok[None, :]
    W = tl.load(W0 + offs_n[:, None] * swn + offs_m[None, :] * swm, mask=w_mask, other=0.0).to(tl.float32)
    for s in range(0, steps):
        upd = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        cnt = tl.sum(tl.zeros((1,), dtype=tl.float32), axis=0)
        for j in range(0, bsz):
            t = (s * bsz + j).to(tl.int64)
            phi = tl.load(R + t * srt + offs_n * srn, mask=n_ok, other=0.0).to(tl.float32)
            y = tl.load(Y + t * syt + offs_m * sym, mask=m_ok, other=0.0).to(tl.float32)
            nsq = tl.sum(phi * phi, axis=0)
            e = tl.sum(phi[:, None] * W, axis=0) - y  # (BLOCK_M,)
            nz = nsq > 0.0
            inv = tl.where(nz, 1.0 / tl.where(nz, nsq, 1.0), 0.0)
            upd += phi[:, None] * (e * inv)[None, :]
            cnt += tl.where(nz, 1.0, 0.0)
        lr = tl.load(LR + s)
        lr_eff = tl.where(cnt > 0.0, lr, 0.0)
        W = W - lr_eff * (upd * (2.0 / tl.maximum(cnt, 1.0)) + (2.0 * reg) * W)
    tl.store(OUT + offs_n[:, None] * m + offs_m[None, :], W, mask=w_mask)


def supports(rows, targets, omega, lr, reg, batch_size=1, **_) -> str | None:
    why = _common.supports_rrinf(rows, targets, omega, lr, reg, batch_size)
    if why is None and rows.shape[1] > MAX_N:
        why = f"the Triton kernel keeps Ω in registers and takes n ≤ {MAX_N}, got n = {rows.shape[1]}"
    return why


def _config(n: int, m: int, device: torch.device) -> dict:
    block_n = max(16, triton.next_power_of_2(max(n, 1)))
    if _common.interpreting():
        return {"BLOCK_N": block_n, "BLOCK_M": min(4, triton.next_power_of_2(max(m, 1))), "num_warps": 1}
    sms = _common.sm_count(device)
    block_m = 1
    while triton.cdiv(m, block_m) > sms and block_n * block_m * 2 <= 16384:
        block_m *= 2
    warps = 4 if block_n * block_m <= 1024 else (8 if block_n * block_m <= 4096 else 16)
    return {"BLOCK_N": block_n, "BLOCK_M": block_m, "num_warps": warps}


def rrinf_row_updates_triton(rows, targets, omega, lr, reg, batch_size=1, *, config=None):
    """Triton version of :func:`fastinf.ops.rrinf_row_updates_reference` (same contract; float32 Ω).

    Under ``TRITON_INTERPRET=1`` bfloat16 inputs are upcast to float32 (the interpreter mishandles bf16).
    """
    if rows.shape[1] > MAX_N:
        raise ValueError(supports(rows, targets, omega, lr, reg, batch_size))
    rows, targets = _common.interp_upcast(rows, targets)
    rows, targets, out, lr_t = _common.rrinf_inputs(rows, targets, omega, lr, batch_size)
    n, m = out.shape
    steps = rows.shape[0] // batch_size
    if n == 0 or m == 0 or steps == 0:
        return out
    cfg = dict(config or _config(n, m, out.device))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _rrinf_row_updates_kernel[grid](
        rows, targets, out, lr_t, out, n, m, steps, batch_size, float(reg),
        rows.stride(0), rows.stride(1), targets.stride(0), targets.stride(1), out.stride(0), out.stride(1),
        **cfg,
    )  # fmt: skip
    return out
