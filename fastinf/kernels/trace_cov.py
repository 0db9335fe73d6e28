"""Triton: the BIF kernel −Cov (or −Corr) of loss traces over draws, and its per-query top-k (METHODS.md §8).

trace_cov(X (N, n), Y (N, m)) = −(1/(N−1)) Σ_d (Y_d − Ȳ)ᵀ (X_d − X̄)  → (m, n); ``normalize=True`` gives
−Σ_d (Y_d − Ȳ)ᵀ (X_d − X̄) / (σ_y σ_x) with σ² the centred sums of squares (the N − 1 cancels).

Two passes over the traces, the centring (and scaling) fused into the GEMM:

* ``_trace_cov_stats_kernel`` (once for X, once for Y): per column, the mean and the centred sum of squares
  over the N draws, float32. Every value is first shifted by the column's first draw (so a constant column
  gives exactly 0 and the sums see the variation, not the level of the losses); each chunk of draws gets its
  own mean and centred sum of squares (centred before squaring), and chunks are merged with the pairwise
  (Chan et al.) update — never Σx² − Nμ².
* ``_trace_cov_kernel``: one (BLOCK_M × BLOCK_N) output tile per program; for each chunk of draws it loads the
  Y and X tiles in the input dtype, centres them in float32 ((x − x₀) − mean of the shifted values, masked
  draws set to 0) and accumulates with ``tl.dot`` on float32 operands (3×TF32 on the GPU, about float32
  accuracy, whatever the input dtype). The epilogue scales by −1/(N−1), or by −1/(σ_y σ_x) from pass 1.
* ``_trace_cov_topk_kernel``: the same tiles, never written out. A program owns BLOCK_M queries and a range of
  training columns, and keeps a running top-KP per query (KP = next power of two ≥ k ≤ ``MAX_K``) as int64
  keys (order-preserving bits of the float32 score above, 2³¹−1 − column below, so equal scores rank the
  smaller column first). A tile whose keys all fall below each query's current k-th best is skipped; otherwise
  ``tl.topk`` of the tile is merged into the running list with one bitonic merge. Each program writes KP
  candidates per query (m × splits × KP int64); the host takes the top k of those and decodes them. For
  k > ``MAX_K`` the launcher runs the full kernel over column chunks of X and merges chunk top-k's instead
  (still never the whole (m, n) matrix).

Zero-variance columns with ``normalize=True`` raise the reference's ValueError, found on the host from the
pass-1 sums of squares (exactly 0 for a constant column). Inputs float32/float16/bfloat16, output float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["trace_cov_triton", "trace_cov_topk_triton", "supports_trace_cov", "supports_trace_cov_topk", "MAX_K"]

MAX_K = 64  # the largest k the fused top-k kernel keeps in registers; larger k runs over column chunks
_LOW = 2147483647  # 2**31 − 1: key low bits = _LOW − column
_INT64_MIN = -(2**63)


@triton.jit
def _trace_cov_stats_kernel(
    A_ptr,
    MEAN_ptr,
    M2_ptr,
    N,
    c,
    stride_d,
    stride_c,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < c
    shift = tl.load(A_ptr + offs_c * stride_c, mask=c_ok, other=0.0).to(tl.float32)  # the first draw
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for d0 in range(0, N, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < N
        a = tl.load(
            A_ptr + offs_d.to(tl.int64)[:, None] * stride_d + offs_c[None, :] * stride_c,
            mask=d_ok[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        a = tl.where(d_ok[:, None], a - shift[None, :], 0.0)
        na = d0 * 1.0  # draws merged so far (float32)
        nb = tl.minimum(N - d0, BLOCK_D).to(tl.float32)
        mb = tl.sum(a, axis=0) / nb
        r = tl.where(d_ok[:, None], a - mb[None, :], 0.0)
        m2b = tl.sum(r * r, axis=0)
        tot = na + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (na * nb / tot)
    tl.store(MEAN_ptr + offs_c, mean, mask=c_ok)
    tl.store(M2_ptr + offs_c, m2, mask=c_ok)


@triton.jit
def _centred_cross(
    X_ptr,
    Y_ptr,
    KX_ptr,
    MX_ptr,
    KY_ptr,
    MY_ptr,
    N,
    offs_m,
    offs_n,
    m_ok,
    n_ok,
    stride_xd,
    stride_xn,
    stride_yd,
    stride_ym,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Σ_d (Y_d − Ȳ)ᵀ (X_d − X̄) on one (BLOCK_M, BLOCK_N) tile, float32."""
    kx = tl.load(KX_ptr + offs_n, mask=n_ok, other=0.0)
    mx = tl.load(MX_ptr + offs_n, mask=n_ok, other=0.0)
    ky = tl.load(KY_ptr + offs_m, mask=m_ok, other=0.0)
    my = tl.load(MY_ptr + offs_m, mask=m_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < N
        rows = offs_k.to(tl.int64)[:, None]
        y = tl.load(
            Y_ptr + rows * stride_yd + offs_m[None, :] * stride_ym, mask=k_ok[:, None] & m_ok[None, :], other=0.0
        ).to(tl.float32)
        x = tl.load(
            X_ptr + rows * stride_xd + offs_n[None, :] * stride_xn, mask=k_ok[:, None] & n_ok[None, :], other=0.0
        ).to(tl.float32)
        yc = tl.where(k_ok[:, None], (y - ky[None, :]) - my[None, :], 0.0)
        xc = tl.where(k_ok[:, None], (x - kx[None, :]) - mx[None, :], 0.0)
        acc = tl.dot(tl.trans(yc), xc, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _scaled(acc, SX_ptr, SY_ptr, offs_m, offs_n, m_ok, n_ok, alpha, SCALE: tl.constexpr):
    if SCALE:  # −1/(σ_y σ_x): the sign sits in SY
        sx = tl.load(SX_ptr + offs_n, mask=n_ok, other=0.0)
        sy = tl.load(SY_ptr + offs_m, mask=m_ok, other=0.0)
        acc = acc * sy[:, None] * sx[None, :]
    else:
        acc = acc * alpha
    return acc


@triton.jit
def _trace_cov_kernel(
    X_ptr,
    Y_ptr,
    KX_ptr,
    MX_ptr,
    KY_ptr,
    MY_ptr,
    SX_ptr,
    SY_ptr,
    OUT_ptr,
    N,
    n,
    m,
    alpha,
    stride_xd,
    stride_xn,
    stride_yd,
    stride_ym,
    stride_om,
    SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(m, BLOCK_M)
    pid_m = pid % num_m  # the m tile varies fastest: programs sharing an X tile run together (L2)
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m
    n_ok = offs_n < n
    acc = _centred_cross(
        X_ptr, Y_ptr, KX_ptr, MX_ptr, KY_ptr, MY_ptr, N, offs_m, offs_n, m_ok, n_ok,
        stride_xd, stride_xn, stride_yd, stride_ym, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    acc = _scaled(acc, SX_ptr, SY_ptr, offs_m, offs_n, m_ok, n_ok, alpha, SCALE)
    out = OUT_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _trace_cov_topk_kernel(
    X_ptr,
    Y_ptr,
    KX_ptr,
    MX_ptr,
    KY_ptr,
    MY_ptr,
    SX_ptr,
    SY_ptr,
    CAND_ptr,
    N,
    n,
    m,
    alpha,
    k,
    cols_per_split,
    stride_xd,
    stride_xn,
    stride_yd,
    stride_ym,
    stride_cm,
    SCALE: tl.constexpr,
    NEGATE: tl.constexpr,
    PRECISION: tl.constexpr,
    LOW: tl.constexpr,
    KEY_MIN: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m
    lo = pid_s * cols_per_split
    hi = tl.minimum(lo + cols_per_split, n)
    cols_kp = tl.arange(0, KP)
    best = tl.full((BLOCK_M, KP), KEY_MIN, dtype=tl.int64)  # sorted descending
    thr = tl.full((BLOCK_M,), KEY_MIN, dtype=tl.int64)  # each query's current k-th best key
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        acc = _centred_cross(
            X_ptr, Y_ptr, KX_ptr, MX_ptr, KY_ptr, MY_ptr, N, offs_m, offs_n, m_ok, n_ok,
            stride_xd, stride_xn, stride_yd, stride_ym, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        s = _scaled(acc, SX_ptr, SY_ptr, offs_m, offs_n, m_ok, n_ok, alpha, SCALE)
        if NEGATE:
            s = -s
        bits = s.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
        key = (ordered.to(tl.int64) << 32) | (LOW - offs_n).to(tl.int64)[None, :]
        key = tl.where(n_ok[None, :], key, KEY_MIN)
        if tl.max(tl.max((key > thr[:, None]).to(tl.int32), axis=1), axis=0) > 0:
            top = tl.topk(key, KP)  # (BLOCK_M, KP) descending
            # best descending, top ascending: the elementwise max holds the top KP of both and is bitonic
            best = tl.bitonic_merge(tl.maximum(best, tl.flip(top, 1)), descending=True)
            thr = tl.max(tl.where(cols_kp[None, :] == k - 1, best, KEY_MIN), axis=1)
    cand = CAND_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + (pid_s * KP + cols_kp)[None, :]
    tl.store(cand, best, mask=m_ok[:, None])


# ----------------------------------------------------------------------------------------------- host side
def _configs(m: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Block sizes, warps and stages of the three kernels (one config under the interpreter); the top-k
    kernel's ``programs`` is the number of programs its column splits aim at. float32 tiles take two pipeline
    stages in the GEMM (about 96 KB of shared memory at 128 × 128 × 32; three would need 128 KB)."""
    if _common.interpreting():
        return {
            "stats": {"BLOCK_D": 8, "BLOCK_C": 16, "num_warps": 1, "num_stages": 1},
            "gemm": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1},
            "topk": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1, "programs": 2},
        }
    bm = 64 if m <= 64 else 128
    sms = _common.sm_count(device)
    st = 2 if dtype == torch.float32 else 3
    return {
        "stats": {"BLOCK_D": 32, "BLOCK_C": 128, "num_warps": 4, "num_stages": 2},
        "gemm": {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 4 if bm == 64 else 8, "num_stages": st},
        "topk": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3, "programs": 4 * sms},
    }


def supports_trace_cov(X, Y, normalize=False, *, block=256, dtype=None, **_) -> str | None:
    why = _common._dtype_reason(X, Y) or _common._device_reason(X, Y)
    if why is None and dtype is not None and dtype != torch.float32:
        why = f"the kernel accumulates in float32, dtype={dtype} was requested (runs on the PyTorch reference)"
    return why


def supports_trace_cov_topk(X, Y, k, *, normalize=False, largest=True, block=256, dtype=None, **_) -> str | None:
    return supports_trace_cov(X, Y, normalize, block=block, dtype=dtype)


def _inputs(X: torch.Tensor, Y: torch.Tensor):
    X, Y = _common.interp_upcast(X, Y)
    dt = _common.compute_dtype(X, Y)
    return X.to(dt), Y.to(dt)


def _stats(A: torch.Tensor, cfg: dict):
    """(shift = first draw, mean of the shifted values, centred sum of squares), each (c,) float32."""
    N, c = A.shape
    mean = torch.empty(c, dtype=torch.float32, device=A.device)
    m2 = torch.empty(c, dtype=torch.float32, device=A.device)
    if c:
        grid = (triton.cdiv(c, cfg["BLOCK_C"]),)
        _trace_cov_stats_kernel[grid](A, mean, m2, N, c, A.stride(0), A.stride(1), **cfg)
    return A[0].to(torch.float32).contiguous(), mean, m2


class _Prepared:
    """Pass 1 done: inputs, statistics and the epilogue's scaling."""

    def __init__(self, X, Y, normalize: bool, cfgs: dict) -> None:
        _common.check_traces(X, Y)
        self.X, self.Y = _inputs(X, Y)
        self.N, self.n = self.X.shape
        self.m = self.Y.shape[1]
        self.cfgs = cfgs
        self.kx, self.mx, m2x = _stats(self.X, cfgs["stats"])
        self.ky, self.my, m2y = _stats(self.Y, cfgs["stats"])
        self.normalize = bool(normalize)
        if self.normalize:
            _common.check_variances(m2x, m2y)  # the reference's error: a constant column's sum is exactly 0
            self.sx = m2x.double().rsqrt().float()
            self.sy = m2y.double().rsqrt().neg().float()
        else:
            self.sx, self.sy = self.mx, self.my  # unused (SCALE=False)
        self.alpha = -1.0 / (self.N - 1)
        self.prec = "tf32x3"  # the dot's operands are float32 (centred in float32) for every input dtype

    def full(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Scores of training columns [start, stop) for every query: (m, stop − start) float32."""
        stop = self.n if stop is None else stop
        X = self.X[:, start:stop]
        n = X.shape[1]
        out = torch.empty(self.m, n, dtype=torch.float32, device=X.device)
        if self.m == 0 or n == 0:
            return out
        cfg = self.cfgs["gemm"]
        grid = (triton.cdiv(self.m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _trace_cov_kernel[grid](
            X, self.Y, self.kx[start:stop], self.mx[start:stop], self.ky, self.my, self.sx[start:stop], self.sy,
            out, self.N, n, self.m, self.alpha, X.stride(0), X.stride(1), self.Y.stride(0), self.Y.stride(1),
            out.stride(0), SCALE=self.normalize, PRECISION=self.prec, **cfg,
        )  # fmt: skip
        return out

    def topk_fused(self, k: int, largest: bool):
        cfg = dict(self.cfgs["topk"])
        programs = cfg.pop("programs", 1)
        kp = max(2, triton.next_power_of_2(k))
        cfg["BLOCK_N"] = max(cfg["BLOCK_N"], kp)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        tiles_m = triton.cdiv(self.m, bm)
        splits = max(1, min(triton.cdiv(programs, tiles_m), triton.cdiv(self.n, bn)))
        per = triton.cdiv(triton.cdiv(self.n, splits), bn) * bn
        splits = triton.cdiv(self.n, per)
        cand = torch.empty(self.m, splits * kp, dtype=torch.int64, device=self.X.device)
        _trace_cov_topk_kernel[(tiles_m, splits)](
            self.X, self.Y, self.kx, self.mx, self.ky, self.my, self.sx, self.sy, cand, self.N, self.n, self.m,
            self.alpha, k, per, self.X.stride(0), self.X.stride(1), self.Y.stride(0), self.Y.stride(1),
            cand.stride(0), SCALE=self.normalize, NEGATE=not largest, PRECISION=self.prec, LOW=_LOW,
            KEY_MIN=_INT64_MIN, KP=kp, **cfg,
        )  # fmt: skip
        keys = torch.topk(cand, k, dim=1).values  # descending; k ≤ n valid keys per row, sentinels never chosen
        hi = keys >> 32
        bits = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(torch.int32)
        vals = bits.view(torch.float32)
        idx = _LOW - (keys & 0xFFFFFFFF)
        return (vals if largest else vals.neg()), idx


def trace_cov_triton(X, Y, normalize=False, *, block=256, dtype=None, config=None):
    """Triton version of :func:`fastinf.ops.trace_cov_reference` (same contract; float32 output).

    ``block`` (the reference's merge granularity) is accepted and ignored; ``dtype`` may only be None or
    float32. ``config``: optional dict of per-kernel configs overriding the defaults (tuning runs).
    Under ``TRITON_INTERPRET=1`` bfloat16 inputs are upcast to float32 (the interpreter mishandles bf16).
    """
    why = supports_trace_cov(X, Y, normalize, block=block, dtype=dtype)
    if why is not None:
        raise ValueError(f"trace_cov_triton: {why}")
    cfgs = {**_configs(Y.shape[1] if Y.dim() == 2 else 0, X.device, _common.compute_dtype(X, Y)), **(config or {})}
    return _Prepared(X, Y, normalize, cfgs).full()


def trace_cov_topk_triton(
    X, Y, k, *, normalize=False, largest=True, block=256, dtype=None, chunk_size=None, config=None
):
    """Triton version of :func:`fastinf.ops.trace_cov_topk_reference`: (values (m, k) float32, indices (m, k)
    int64), values sorted (descending for ``largest``, else ascending), never the (m, n) matrix.

    k ≤ ``MAX_K`` (and no ``chunk_size``): the fused top-k kernel. Larger k, or a given ``chunk_size``: the
    full kernel over ``chunk_size`` training columns at a time (default: about 2²⁴ scores per chunk, at least
    k columns) with a running ``torch.topk`` merge.
    """
    why = supports_trace_cov_topk(X, Y, k, block=block, dtype=dtype)
    if why is not None:
        raise ValueError(f"trace_cov_topk_triton: {why}")
    _common.check_traces(X, Y)
    _common.check_k(k, X.shape[1])
    cfgs = {**_configs(Y.shape[1] if Y.dim() == 2 else 0, X.device, _common.compute_dtype(X, Y)), **(config or {})}
    p = _Prepared(X, Y, normalize, cfgs)
    if p.m == 0:
        empty = torch.empty(0, k, device=p.X.device)
        return empty, empty.long()
    if k <= MAX_K and chunk_size is None:
        return p.topk_fused(k, largest)
    return _common.chunked_topk(p.n, p.m, k, p.full, largest=largest, chunk_size=chunk_size)
