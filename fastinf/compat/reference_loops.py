"""Plain per-example / per-block loops following the DataInf and RRInf reference engines.

These are straightforward transcriptions of the formulas of METHODS.md, one example and one parameter
tensor at a time, in the reference engines' layout (one ``{tensor_name: gradient}`` dict per example),
following the *algorithm* (not the code) of the DataInf repository's ``IFEngine`` / ``IFEngineGeneration``
(``identity``, ``proposed`` = DataInf, ``LiSSA`` with the flipped damping sign and 10 steps, ``accurate``
= per-tensor d_l×d_l matrix from summed outer products + eigendecomposition, the IF loop) and of the
RRInf repository's SGD loops (neuron mode on a dense Φ (D × n), layer mode per tensor).

They are the test oracles of ``fastinf.compat`` (tests/compat) and the baselines of
``bench/bench_estimators.py``: deliberately slow, vectorised only inside one example's tensor. They
compute in the dtype of their inputs (pass float64 tensors for an oracle).

Where the references divide by zero (a zero row of Φ in RRInf), the loops follow METHODS.md §5 instead:
the row's data term is zero and the step's regulariser still applies.
"""

from __future__ import annotations

from typing import Any

import torch

from ..gradients.gradient_set import GradientSet

__all__ = [
    "DAMPING_FACTOR",
    "example_dicts",
    "loop_hvp_lissa",
    "loop_hvp_proposed",
    "loop_if",
    "loop_lambda",
    "loop_method",
    "loop_outer_sum",
    "loop_rrinf",
    "loop_rrinf_queries",
    "loop_solve_accurate",
    "loop_val_mean",
    "oracle_exact_mean",
]

DAMPING_FACTOR = 0.1  # λ = 0.1 × mean squared entry (both references: mean(g²) / lambda_const_param=10)


def example_dicts(gs: GradientSet, names: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """The references' layout: one ``{tensor_name: gradient}`` dict per example (1-D views, no copy)."""
    names = gs.names if names is None else names
    blocks = {k: gs[k] for k in names}
    return [{k: x[i] for k, x in blocks.items()} for i in range(gs.n)]


def loop_val_mean(te: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """v̄ = (1/m) Σ_j t_j, tensor by tensor."""
    out = {}
    for k in names:
        acc = torch.zeros_like(te[0][k])
        for ex in te:
            acc += ex[k]
        out[k] = acc / len(te)
    return out


def loop_lambda(tr: list[dict[str, torch.Tensor]], name: str, factor: float = DAMPING_FACTOR) -> float:
    """λ_l = factor × (1/n) Σ_i mean(g_il²) (the references' per-tensor λ, ``lambda_const_param = 1/factor``)."""
    acc = torch.zeros((), dtype=tr[0][name].dtype)
    for ex in tr:
        acc += torch.mean(ex[name] ** 2)
    return factor * float(acc) / len(tr)


def loop_hvp_proposed(tr: list[dict[str, torch.Tensor]], v: torch.Tensor, name: str, lam: float) -> torch.Tensor:
    """DataInf: h = (1/(nλ)) Σ_i [v − (g_iᵀv / (λ + ‖g_i‖²)) g_i]."""
    n = len(tr)
    h = torch.zeros_like(v)
    for ex in tr:
        g = ex[name]
        c = torch.sum(v * g) / (lam + torch.sum(g * g))
        h += (v - c * g) / (n * lam)
    return h


def loop_hvp_lissa(
    tr: list[dict[str, torch.Tensor]], v: torch.Tensor, name: str, lam: float, iters: int = 10, alpha: float = 1.0
) -> torch.Tensor:
    """The DataInf code's LiSSA variant: r ← v + r − α[(1/n) Σ_i (g_iᵀr) g_i − λ r] (damping sign flipped)."""
    n = len(tr)
    r = v.clone()
    for _ in range(iters):
        acc = torch.zeros_like(v)
        for ex in tr:
            g = ex[name]
            acc += (torch.sum(g * r) * g - lam * r) / n
        r = v + r - alpha * acc
    return r


def loop_outer_sum(tr: list[dict[str, torch.Tensor]], name: str, count: int) -> torch.Tensor:
    """Σ_i g_i g_iᵀ over the first ``count`` examples, one outer product at a time."""
    d = tr[0][name].numel()
    A = torch.zeros(d, d, dtype=tr[0][name].dtype)
    for ex in tr[:count]:
        g = ex[name].reshape(-1)
        A += torch.outer(g, g)
    return A


def loop_solve_accurate(A: torch.Tensor, v: torch.Tensor, lam: float, n: int, eig: str = "eigh") -> torch.Tensor:
    """(G + λI)⁻¹ v with G = A / n through an eigendecomposition of A = Σ g gᵀ.

    ``eig="eigh"``: the symmetric solver (correct). ``eig="eig"``: the general solver as the DataInf code does,
    keeping the real parts; its eigenvectors of the (d_l − n)-fold zero eigenvalue need not be orthonormal
    when d_l > n, so V diag(·) Vᵀ is then not the inverse.
    """
    if eig == "eigh":
        L, V = torch.linalg.eigh(A)
    else:
        L, V = torch.linalg.eig(A)
        L, V = L.real.to(A.dtype), V.real.to(A.dtype)
    w = (v.reshape(-1) @ V) / (lam + L / n)
    return (w @ V.T).reshape(v.shape)


def loop_if(tr: list[dict[str, torch.Tensor]], hvp: dict[str, torch.Tensor]) -> torch.Tensor:
    """IF_i = −Σ_l ⟨hvp_l, g_il⟩, example by example, tensor by tensor. Returns (n,)."""
    out = torch.empty(len(tr), dtype=next(iter(hvp.values())).dtype)
    for i, ex in enumerate(tr):
        s = torch.zeros((), dtype=out.dtype)
        for k, h in hvp.items():
            s += torch.sum(h * ex[k])
        out[i] = -s
    return out


def loop_rrinf(
    Phi: torch.Tensor, te: list[dict[str, torch.Tensor]], names: list[str], coords: list[int], lr: float
) -> torch.Tensor:
    """RRInf neuron mode on a dense Φ (D × n): υ = −n v̄, λ̃ = nλ/D, ω ← ω − lr (2 e φ/‖φ‖² + 2 λ̃ ω).

    λ = DAMPING_FACTOR × mean(Φ²) over all coordinates (accumulated over row chunks of Φ, no D×n temporary).
    A zero row has a zero data term and keeps the regulariser (METHODS.md §5; the reference code divides
    by zero there).
    """
    D, n = Phi.shape
    vbar = loop_val_mean(te, names)
    ups = -n * torch.cat([vbar[k].reshape(-1) for k in names])
    tot = 0.0
    for s in range(0, D, 1024):
        tot += float(torch.sum(Phi[s : s + 1024] ** 2))
    lam = DAMPING_FACTOR * tot / (D * n)
    reg = n * lam / D
    omega = torch.zeros(n, dtype=Phi.dtype)
    for idx in coords:
        phi = Phi[idx]
        nrm = torch.sum(phi * phi)
        if float(nrm) == 0.0:
            omega = omega - lr * (2 * reg * omega)
            continue
        e = torch.sum(phi * omega) - ups[idx]
        omega = omega - lr * (2 * e * phi / nrm + 2 * reg * omega)
    return omega


def loop_rrinf_queries(
    tr: list[dict[str, torch.Tensor]],
    queries: list[dict[str, torch.Tensor]],
    names: list[str],
    draws: list[Any],
    lr: float,
    *,
    layer: bool = False,
    factor: float = DAMPING_FACTOR,
) -> torch.Tensor:
    """RRInf for m query vectors at once (the generation engine's Ω, n × m), neuron or layer mode.

    ``queries``: one dict per query column (the mean validation gradient alone for ``IFEngine``).
    Υ = −n [t_1 … t_m] (D × m). Neuron mode (``draws`` = coordinate indices of the concatenated tensors in
    ``names`` order): E = φ_ιᵀΩ − Υ_ι, Ω ← Ω − lr (2 φ_ι E / ‖φ_ι‖² + 2 nλΩ/D), λ = factor × mean(Φ²).
    Layer mode (``draws`` = tensor names): Ω ← Ω − lr ((2/d_l) Φ_lᵀ((Φ_l Ω − Υ_l) ⊘ ‖rows‖²) + 2 nλ_l Ω/D),
    λ_l = :func:`loop_lambda`. Zero rows: zero data term, the regulariser still applies (METHODS.md §5).
    """
    n, m = len(tr), len(queries)
    D = sum(tr[0][k].numel() for k in names)
    dt = tr[0][names[0]].dtype
    # Φ (D × n) column by column, Υ (D × m) likewise
    Phi = torch.stack([torch.cat([ex[k].reshape(-1) for k in names]) for ex in tr], 1)
    Ups = -n * torch.stack([torch.cat([q[k].reshape(-1) for k in names]) for q in queries], 1)
    omega = torch.zeros(n, m, dtype=dt)
    if layer:
        offsets, off = {}, 0
        for k in names:
            offsets[k] = (off, off + tr[0][k].numel())
            off = offsets[k][1]
        lam_of = {k: loop_lambda(tr, k, factor) for k in names}
        for k in draws:
            a, b = offsets[k]
            Pl, Ul = Phi[a:b], Ups[a:b]  # (d_l, n), (d_l, m)
            nsq = Pl.pow(2).sum(1, keepdim=True)
            inv = torch.where(nsq > 0, 1.0 / torch.where(nsq > 0, nsq, torch.ones_like(nsq)), torch.zeros_like(nsq))
            grad = (2.0 / Pl.shape[0]) * Pl.T @ ((Pl @ omega - Ul) * inv) + 2 * n * lam_of[k] * omega / D
            omega = omega - lr * grad
        return omega
    lam = factor * float(Phi.pow(2).sum()) / (D * n)
    reg = n * lam / D
    for idx in draws:
        phi = Phi[idx]
        nrm = torch.sum(phi * phi)
        grad = 2 * reg * omega
        if float(nrm) > 0.0:
            grad = grad + 2 * torch.outer(phi, (phi @ omega - Ups[idx]) / nrm)
        omega = omega - lr * grad
    return omega


def loop_method(
    method: str, tr: list[dict[str, torch.Tensor]], te: list[dict[str, torch.Tensor]], names: list[str], **kw: Any
) -> torch.Tensor:
    """Whole IFEngine-style computation for one method on the mean test gradient: returns IF (n,)."""
    vbar = loop_val_mean(te, names)
    if method == "identity":
        hvp = {k: vbar[k] for k in names}
    else:
        hvp = {}
        for k in names:
            lam = loop_lambda(tr, k)
            if method == "datainf":
                hvp[k] = loop_hvp_proposed(tr, vbar[k], k, lam)
            elif method == "lissa":
                hvp[k] = loop_hvp_lissa(tr, vbar[k], k, lam, iters=kw.get("lissa_iters", 10))
            else:
                raise ValueError(f"method must be 'identity', 'datainf' or 'lissa', got {method!r}")
    return loop_if(tr, hvp)


def oracle_exact_mean(X: torch.Tensor, T: torch.Tensor, factor: float = DAMPING_FACTOR) -> torch.Tensor:
    """Untimed float64 check for one block: −Φᵀ(G + λI)⁻¹v̄ by a dense LU solve in the smaller space."""
    X, v = X.double(), T.double().mean(0)
    n, d = X.shape
    lam = factor * float(X.pow(2).sum()) / (n * d)
    if d <= n:
        H = X.T @ X / n
        H.diagonal().add_(lam)
        return -(X @ torch.linalg.solve(H, v))
    K = X @ X.T
    K.diagonal().add_(n * lam)
    return -n * torch.linalg.solve(K, X @ v)
