"""−covariance (or −correlation) of loss traces over draws: the BIF kernel (METHODS.md §8).

trace_cov(X (N, n), Y (N, m)) = −(1/(N−1)) Σ_d (Y_d − Ȳ)ᵀ (X_d − X̄)  → (m, n);
``normalize=True`` divides by the standard deviations (−Pearson correlation).
trace_cov_topk(X, Y, k) gives each query's k largest (or smallest) scores and their training columns
without ever holding the (m, n) matrix.

The reference accumulates over blocks of draws with the pairwise (Chan et al.) merge of means and
co-moments — never the one-pass Σxy − Nμμᵀ — so long float32 traces stay accurate.
"""

from __future__ import annotations

import torch

from ..kernels._common import check_k, check_traces, check_variances, chunked_topk
from ._dispatch import select

__all__ = ["trace_cov", "trace_cov_reference", "trace_cov_topk", "trace_cov_topk_reference", "CoMoments"]


class CoMoments:
    """Streaming means and co-moments of paired traces, merged block by block (Chan et al. 1979).

    ``update(Xb (b, n), Yb (b, m))`` adds a block of draws; ``merge(other)`` combines two
    accumulators (e.g. chains, or ranks of a distributed run).
    """

    def __init__(self, n: int, m: int, dtype=torch.float64, device=None) -> None:
        self.count = 0
        self.mx = torch.zeros(n, dtype=dtype, device=device)
        self.my = torch.zeros(m, dtype=dtype, device=device)
        self.sxx = torch.zeros(n, dtype=dtype, device=device)
        self.syy = torch.zeros(m, dtype=dtype, device=device)
        self.sxy = torch.zeros(m, n, dtype=dtype, device=device)

    def _merge_stats(self, nb, mxb, myb, sxxb, syyb, sxyb) -> None:
        na = self.count
        if na == 0:  # first block: take its statistics as they are (no pass over the (m, n) matrix)
            self.mx, self.my, self.sxx, self.syy = mxb.clone(), myb.clone(), sxxb.clone(), syyb.clone()
            self.sxy = sxyb if sxyb.dtype == self.sxy.dtype else sxyb.to(self.sxy.dtype)
            self.count = nb
            return
        tot = na + nb
        dx, dy = mxb - self.mx, myb - self.my
        f = na * nb / tot
        self.sxy += sxyb + f * torch.outer(dy, dx)
        self.sxx += sxxb + f * dx * dx
        self.syy += syyb + f * dy * dy
        self.mx += dx * (nb / tot)
        self.my += dy * (nb / tot)
        self.count = tot

    def update(self, Xb: torch.Tensor, Yb: torch.Tensor) -> CoMoments:
        b = Xb.shape[0]
        if b == 0:
            return self
        Xb, Yb = Xb.to(self.mx.dtype), Yb.to(self.my.dtype)
        mxb, myb = Xb.mean(0), Yb.mean(0)
        xc, yc = Xb - mxb, Yb - myb
        self._merge_stats(b, mxb, myb, xc.pow(2).sum(0), yc.pow(2).sum(0), yc.T @ xc)
        return self

    def merge(self, other: CoMoments) -> CoMoments:
        if other.count:
            self._merge_stats(other.count, other.mx, other.my, other.sxx, other.syy, other.sxy)
        return self

    def result(self, normalize: bool = False) -> torch.Tensor:
        """−covariance (m, n), or −correlation with ``normalize=True``."""
        if self.count < 2:
            raise ValueError(f"need at least 2 draws for a covariance, got {self.count}")
        if not normalize:
            return self.sxy.mul(-1.0 / (self.count - 1))
        sx, sy = self.sxx.sqrt(), self.syy.sqrt()
        check_variances(sx, sy)
        return self.sxy.div(torch.outer(sy, sx)).neg_()


def trace_cov_reference(
    X: torch.Tensor, Y: torch.Tensor, normalize: bool = False, *, block: int = 256, dtype=None
) -> torch.Tensor:
    """PyTorch reference: blocks of ``block`` draws merged pairwise; accumulates in float64 by
    default (``dtype`` overrides, at least float32). Returns (m, n)."""
    check_traces(X, Y)
    acc_dtype = dtype or torch.float64
    acc = CoMoments(X.shape[1], Y.shape[1], dtype=acc_dtype, device=X.device)
    for s in range(0, X.shape[0], block):
        acc.update(X[s : s + block], Y[s : s + block])
    return acc.result(normalize)


def trace_cov(X: torch.Tensor, Y: torch.Tensor, normalize: bool = False, *, backend: str = "auto", **kw):
    """Dispatching version of :func:`trace_cov_reference` (same contract and keyword options).

    ``backend``: ``"auto"`` (the route of ``fastinf.ops._dispatch.DISPATCH_TABLE``; no CUDA kernel),
    ``"cuda"``, ``"triton"`` or ``"torch"``. The Triton kernel takes float16/bfloat16/float32 inputs,
    accumulates in float32 and returns float32; float64 inputs (or ``dtype=torch.float64``) run on the
    PyTorch reference, which returns float64 by default.
    """
    check_traces(X, Y)
    _, fn = select("trace_cov", backend, X.device, (X, Y, normalize), kw)
    return fn(X, Y, normalize, **kw)


def trace_cov_topk_reference(
    X: torch.Tensor,
    Y: torch.Tensor,
    k: int,
    *,
    normalize: bool = False,
    largest: bool = True,
    block: int = 256,
    dtype=None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the per-query top-k of :func:`trace_cov_reference`: (values (m, k), indices
    (m, k) int64), sorted (descending for ``largest``, else ascending).

    Never holds the (m, n) matrix: :func:`trace_cov_reference` runs on ``chunk_size`` training columns at a
    time (default: about 2²⁴ scores per chunk, at least k columns) and the chunk top-k's are merged. Each
    column's score depends only on that column, so the values are those of the full reference.
    """
    check_traces(X, Y)
    n, m = X.shape[1], Y.shape[1]
    check_k(k, n)
    if normalize:  # the full reference's zero-variance error, whichever chunk holds the column
        accx = CoMoments(n, 0, dtype=dtype or torch.float64, device=X.device)
        accy = CoMoments(0, m, dtype=dtype or torch.float64, device=X.device)
        for s in range(0, X.shape[0], block):
            accx.update(X[s : s + block], X[s : s + block, :0])
            accy.update(Y[s : s + block, :0], Y[s : s + block])
        check_variances(accx.sxx.sqrt(), accy.syy.sqrt())

    def scores(start: int, stop: int) -> torch.Tensor:
        return trace_cov_reference(X[:, start:stop], Y, normalize, block=block, dtype=dtype)

    return chunked_topk(n, m, k, scores, largest=largest, chunk_size=chunk_size)


def trace_cov_topk(
    X: torch.Tensor,
    Y: torch.Tensor,
    k: int,
    *,
    normalize: bool = False,
    largest: bool = True,
    backend: str = "auto",
    **kw,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatching version of :func:`trace_cov_topk_reference` (same contract and keyword options).

    The Triton kernel keeps a running top-k per query (k ≤ 64; larger k runs the full kernel over column
    chunks) and never writes the (m, n) matrix; its values are float32. Backends as for :func:`trace_cov`.
    """
    check_traces(X, Y)
    check_k(k, X.shape[1])
    kw = {"normalize": normalize, "largest": largest, **kw}
    _, fn = select("trace_cov_topk", backend, X.device, (X, Y, k), kw)
    return fn(X, Y, k, **kw)
