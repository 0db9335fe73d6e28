"""Triton: DataInf's preconditioned test vectors H = (T − C G / n) / λ, C_ji = (t_j·g_i)/(λ + ‖g_i‖²).

Two tensor-core passes over G for all m tests at once (the same plan as ``csrc/datainf_inverse_sum.cu``):

* ``_datainf_inverse_sum_coef_kernel``: P = T Gᵀ (m × n, float32), split over the width d when m × n
  alone gives too few tiles (one float32 slice per split, summed afterwards: deterministic), with ‖g_i‖²
  from the same G tiles;
* ``_datainf_inverse_sum_kernel``: H = T/λ − (C G)·(1/(n λ)), C_ji = P_ji/(λ + ‖g_i‖²) formed on the fly
  from the P tile in float32; the epilogue reads T once.

Programs that share a G tile are adjacent in launch order (the m tile varies fastest), so each G tile comes
from device memory once per pass and from L2 for the other m tiles. The only m × n intermediate is P
(m n 4 bytes, 9 MB at m = 512, n = 4500, against 590 MB of bf16 G at d = 65k); removing it would need
every C_ji before any g_i is used (a grid-wide dependency) or atomics on the m × d output.
Rounding plan (what :func:`fastinf.kernels._emulate.datainf_emulated` reproduces in float64): P, ‖g‖², cinv
in float32; C scaled per test row by a power of two (max |C_j·| in [0.5, 1), exact) and, for float16/bfloat16
G, split into hi + lo parts in G's dtype (two tensor-core products, ~16/22 significant bits: rounding C once
to 16 bits loses the cancellation T − CG/n for near-collinear gradients); 1/n, 1/λ and the row scale are
applied in the float32 epilogue, never folded into C (fp16 would reach subnormals). float32 inputs use 3×TF32
(``tf32x3``, about float32 accuracy); accumulation is float32 throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["datainf_inverse_sum_triton"]


@triton.jit
def _datainf_inverse_sum_coef_kernel(
    T_ptr,
    G_ptr,
    P_ptr,
    NSQ_ptr,
    m,
    n,
    d,
    d_per_split,
    stride_tm,
    stride_td,
    stride_gn,
    stride_gd,
    COMPUTE_NSQ: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(m, BLOCK_M)
    pid_m = pid % num_m
    pid_n = pid // num_m
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m
    n_ok = offs_n < n
    rows_t = offs_m.to(tl.int64)[:, None] * stride_tm  # 64-bit offsets: n d may exceed 2**31
    rows_g = offs_n.to(tl.int64)[:, None] * stride_gn
    k_lo = pid_s * d_per_split
    k_hi = tl.minimum(k_lo + d_per_split, d)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    nsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        t = tl.load(
            T_ptr + rows_t + offs_k[None, :] * stride_td,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        g = tl.load(
            G_ptr + rows_g + offs_k[None, :] * stride_gd,
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(t, tl.trans(g), acc, input_precision=PRECISION)
        if COMPUTE_NSQ:
            gf = g.to(tl.float32)
            nsq += tl.sum(gf * gf, axis=1)
    p_ptrs = P_ptr + pid_s.to(tl.int64) * m * n + offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]
    tl.store(p_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])
    if COMPUTE_NSQ:
        tl.store(NSQ_ptr + pid_s * n + offs_n, nsq, mask=n_ok & (pid_m == 0))


@triton.jit
def _datainf_inverse_sum_kernel(
    T_ptr,
    G_ptr,
    P_ptr,
    CINV_ptr,
    RS_ptr,
    OS_ptr,
    H_ptr,
    m,
    n,
    d,
    inv_lam,
    stride_tm,
    stride_td,
    stride_gn,
    stride_gd,
    ACCUMULATE: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(m, BLOCK_M)
    pid_m = pid % num_m
    pid_d = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = offs_m < m
    d_ok = offs_d < d
    rs = tl.load(RS_ptr + offs_m, mask=m_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n
        p_ptrs = P_ptr + offs_m.to(tl.int64)[:, None] * n + offs_k[None, :]
        p = tl.load(p_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        ci = tl.load(CINV_ptr + offs_k, mask=k_ok, other=0.0)
        g = tl.load(
            G_ptr + offs_k.to(tl.int64)[:, None] * stride_gn + offs_d[None, :] * stride_gd,
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        c = p * ci[None, :] * rs[:, None]  # float32, row max in [0.5, 1)
        if SPLIT:  # 16-bit G: C = hi + lo, both in G's dtype, two tensor-core products
            hi = c.to(g.dtype)
            lo = (c - hi.to(tl.float32)).to(g.dtype)
            acc = tl.dot(hi, g, acc)
            acc = tl.dot(lo, g, acc)
        else:  # float32 G: 3xTF32 keeps C and G at about float32 accuracy
            acc = tl.dot(c, g, acc, input_precision=PRECISION)
    osc = tl.load(OS_ptr + offs_m, mask=m_ok, other=0.0)  # 1 / (rscale n λ): undoes the row scale
    h_ptrs = H_ptr + offs_m.to(tl.int64)[:, None] * d + offs_d[None, :]
    hmask = m_ok[:, None] & d_ok[None, :]
    if ACCUMULATE:
        h = tl.load(h_ptrs, mask=hmask, other=0.0) - acc * osc[:, None]
    else:
        t_ptrs = T_ptr + offs_m.to(tl.int64)[:, None] * stride_tm + offs_d[None, :] * stride_td
        t = tl.load(t_ptrs, mask=hmask, other=0.0)
        h = t.to(tl.float32) * inv_lam - acc * osc[:, None]
    tl.store(h_ptrs, h, mask=hmask)


def _configs(dtype: torch.dtype, m: int):
    """(coef config, apply config): block sizes, warps and pipeline stages for this dtype and m."""
    if _common.interpreting():
        one = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}
        return one, {"BLOCK_M": 16, "BLOCK_D": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}
    # small m (GEMV-shaped, bandwidth-bound): a 16-row m tile, so m = 1 does 16x (not 64x) the useful
    # tensor-core work, which is still far below the time G's bytes take
    bm = 16 if m <= 16 else (64 if m <= 64 else 128)
    bk = 32 if dtype == torch.float32 else 64
    warps = 8 if bm == 128 else 4
    coef = {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": bk, "num_warps": warps, "num_stages": 3}
    apply = {"BLOCK_M": bm, "BLOCK_D": 128, "BLOCK_K": bk, "num_warps": warps, "num_stages": 3}
    return coef, apply


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # (16-bit operands ignore it)


def datainf_inverse_sum_triton(G, T, lam, *, sq_norms=None, chunk_size=None, config=None):
    """Triton version of :func:`fastinf.ops.datainf_inverse_sum_reference` (same contract; float32 output).

    ``config``: optional ``(coef, apply)`` dicts overriding the block sizes (for tuning runs).
    Under ``TRITON_INTERPRET=1`` bfloat16 inputs are upcast to float32 (the interpreter mishandles bf16).
    """
    G, T = _common.interp_upcast(G, T)
    dt = _common.compute_dtype(G, T)
    cfg_coef, cfg_apply = config or _configs(dt, T.shape[0])
    prec = _precision(dt)
    sms = _common.sm_count(G.device)

    def coef(g, t, need_nsq):
        n, d = g.shape
        m = t.shape[0]
        bm, bn, bk = cfg_coef["BLOCK_M"], cfg_coef["BLOCK_N"], cfg_coef["BLOCK_K"]
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        split = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(d, 8 * bk)))
        per = triton.cdiv(triton.cdiv(d, split), bk) * bk
        split = max(1, triton.cdiv(d, per))
        P = torch.empty(split, m, n, dtype=torch.float32, device=g.device)
        nsq = torch.empty(split, n, dtype=torch.float32, device=g.device) if need_nsq else P
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        _datainf_inverse_sum_coef_kernel[grid](
            t, g, P, nsq, m, n, d, per, t.stride(0), t.stride(1), g.stride(0), g.stride(1),
            COMPUTE_NSQ=need_nsq, PRECISION=prec, **cfg_coef,
        )  # fmt: skip
        P = P[0] if split == 1 else P.sum(0)
        if not need_nsq:
            return P, None
        return P, (nsq[0] if split == 1 else nsq.sum(0))

    def apply(g, t, P, cinv, rscale, out_scale, H, inv_lam, accumulate):
        n, d = g.shape
        m = t.shape[0]
        grid = (triton.cdiv(m, cfg_apply["BLOCK_M"]) * triton.cdiv(d, cfg_apply["BLOCK_D"]),)
        _datainf_inverse_sum_kernel[grid](
            t, g, P, cinv, rscale, out_scale, H, m, n, d, inv_lam,
            t.stride(0), t.stride(1), g.stride(0), g.stride(1),
            ACCUMULATE=accumulate, SPLIT=dt != torch.float32, PRECISION=prec, **cfg_apply,
        )  # fmt: skip

    return _common.datainf_run(G, T, lam, sq_norms, chunk_size, coef, apply)
