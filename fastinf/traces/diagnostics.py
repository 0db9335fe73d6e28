"""Stationarity diagnostics of SGLD loss traces (METHODS.md §8): effective sample size, split R-hat
and a per-chain drift test, collected in :class:`SamplerDiagnostics` by :func:`compute_diagnostics`.

Input everywhere: per-draw mean losses of one eval set, shaped (chains, draws).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["SamplerDiagnostics", "compute_diagnostics", "effective_sample_size", "split_rhat"]

DRIFT_THRESHOLD = 0.5  # |last-quarter mean − first-quarter mean| / sd of the chain's mean-loss series
DRIFT_Z_THRESHOLD = 3.0  # … and that difference over its Monte Carlo standard error
RHAT_THRESHOLD = 1.1
MIN_DRAWS_FOR_DRIFT = 8  # quarters of at least 2 draws


def _as_chains(x: Any) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"expected a (chains, draws) array, got shape {a.shape}")
    return a


def _autocov(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance (divided by D) of each row of x (C, D), by FFT: (C, D)."""
    D = x.shape[1]
    xc = x - x.mean(1, keepdims=True)
    nfft = 1 << (2 * D - 1).bit_length()
    f = np.fft.rfft(xc, nfft, axis=1)
    return np.fft.irfft(f * np.conj(f), nfft, axis=1)[:, :D] / D


def effective_sample_size(x: Any) -> float:
    """Multi-chain effective sample size of a scalar quantity, x (chains, draws) or (draws,).

    Stan's estimator (Vehtari et al. 2021, without rank normalisation): the combined autocorrelation
    ρ_t = 1 − (W − mean_c acov_c(t)) / var⁺, summed over Geyer's initial positive and monotone
    sequence of pair sums; ESS = C·D / τ. NaN with fewer than 4 draws or a constant series.
    """
    a = _as_chains(x)
    C, D = a.shape
    if D < 4:
        return math.nan
    ac = _autocov(a)
    W = float((ac[:, 0] * D / (D - 1)).mean())
    var_plus = W * (D - 1) / D + (float(a.mean(1).var(ddof=1)) if C > 1 else 0.0)
    if not var_plus > 0:
        return math.nan
    rho = 1.0 - (W - ac.mean(0)) / var_plus
    rho[0] = 1.0
    pairs = []
    t = 0
    while t + 1 < D:
        p = rho[t] + rho[t + 1]
        if p < 0:
            break
        pairs.append(min(p, pairs[-1]) if pairs else p)
        t += 2
    tau = max(-1.0 + 2.0 * sum(pairs), 1.0 / math.log10(max(C * D, 10)))
    return C * D / tau


def split_rhat(x: Any) -> float:
    """Split-R̂ (Gelman et al., BDA3 §11.4) of x (chains, draws): every chain is cut in two halves,
    R̂ = √(var⁺ / W) with W the mean within-half variance and var⁺ = (h−1)/h W + B/h.
    ≈ 1 for stationary, well-mixed chains; a trend within chains or disagreement between chains
    raises it. NaN with fewer than 4 draws or zero within-half variance."""
    a = _as_chains(x)
    D = a.shape[1]
    h = D // 2
    if h < 2:
        return math.nan
    halves = np.concatenate([a[:, :h], a[:, D - h :]], 0)
    W = float(halves.var(1, ddof=1).mean())
    if not W > 0:
        return math.nan
    B_over_h = float(halves.mean(1).var(ddof=1))
    return math.sqrt(((h - 1) / h * W + B_over_h) / W)


def _drift(x: np.ndarray) -> tuple[float, float]:
    """(standardised drift, z) of one chain's series x (D,): Δ = mean(last quarter) − mean(first quarter),
    drift = Δ / sd(x), and z = Δ / SE(Δ) with SE² = 2 var(r) τ / q, where r = x minus its least-squares
    line, τ = D / ESS(r) its integrated autocorrelation time and q = D // 4 (Geweke-style; the fluctuation
    scale is estimated around the trend from the whole chain, so neither a trend nor a short quarter
    distorts it)."""
    D = x.shape[0]
    if D < MIN_DRAWS_FOR_DRIFT:
        return math.nan, math.nan
    q = D // 4
    delta = float(x[D - q :].mean() - x[:q].mean())
    sd = float(x.std(ddof=1))
    if not sd > 0:
        return math.nan, math.nan
    t = np.arange(D, dtype=np.float64) - (D - 1) / 2
    r = x - x.mean() - t * (float(t @ (x - x.mean())) / float(t @ t))
    var_r = float(r.var(ddof=2))
    ess = effective_sample_size(r)
    tau = D / ess if math.isfinite(ess) and ess > 0 else 1.0
    se = math.sqrt(2 * var_r * max(tau, 1.0) / q)
    z = delta / se if se > 0 else (math.copysign(math.inf, delta) if delta else 0.0)
    return delta / sd, z


@dataclass
class SamplerDiagnostics:
    """Stationarity diagnostics of a :func:`sample_posterior_traces` run, per eval set.

    Everything is computed on the per-draw **mean loss** of each eval set, m[c, d] (``mean_loss``).

    * ``drift[name]`` (chains,): (mean of the last quarter of the chain's draws − mean of the first
      quarter) / standard deviation of the chain's series. A chain whose loss is still rising (too
      short a burn-in) has |drift| of order 1–3; a stationary one ≈ ±√(8τ/D).
    * ``drift_z[name]`` (chains,): the same difference over its Monte Carlo standard error
      (Geweke-style; the fluctuation variance and autocorrelation time are estimated around the
      chain's least-squares trend line).
    * A chain has **not plateaued** when |drift| > 0.5 **and** |drift_z| > 3 (a drift that is both
      large and significant); ``plateaued`` is False when any chain of any eval set has not.
      Both are NaN (and the chain counts as plateaued) with fewer than 8 draws per chain.
    * ``rhat[name]``: split-R̂ across chains (:func:`split_rhat`); ``converged`` is False when any
      exceeds 1.1.
    * ``ess[name]``: multi-chain effective sample size of the mean loss (:func:`effective_sample_size`).
    * ``reference_loss[name]``: mean loss at w*; ``messages``: the problems found (also warned).

    ``diagnostics["rhat"]`` works as well as ``diagnostics.rhat``.
    """

    mean_loss: dict[str, torch.Tensor]
    reference_loss: dict[str, float]
    drift: dict[str, torch.Tensor]
    drift_z: dict[str, torch.Tensor]
    rhat: dict[str, float]
    ess: dict[str, float]
    plateaued: bool
    converged: bool
    settings: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.plateaued and self.converged

    def __getitem__(self, key: str) -> Any:
        if key == "ok" or key in self.__dataclass_fields__:
            return getattr(self, key)
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy: tensors as (nested) lists, plus ``ok``."""

        def plain(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.tolist()
            if isinstance(v, Mapping):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v]
            return v

        out = {k: plain(getattr(self, k)) for k in self.__dataclass_fields__}
        out["ok"] = self.ok
        return out

    def summary(self) -> str:
        lines = []
        for name, m in self.mean_loss.items():
            dr = ", ".join(f"{float(v):+.2f}" for v in self.drift[name])
            lines.append(
                f"{name}: mean loss {float(m.mean()):.4g} (at w*: {self.reference_loss[name]:.4g}), "
                f"drift per chain [{dr}], R-hat {self.rhat[name]:.3f}, ESS {self.ess[name]:.0f}"
            )
        lines.append(f"plateaued: {self.plateaued}, R-hat ≤ {RHAT_THRESHOLD}: {self.converged}")
        return "\n".join(lines)


def compute_diagnostics(
    mean_loss: Mapping[str, torch.Tensor], reference_loss: Mapping[str, float], settings: Mapping[str, Any] = ()
) -> SamplerDiagnostics:
    """Diagnostics from per-draw mean losses, name -> (chains, draws)."""
    drift, drift_z, rhat, ess, msgs = {}, {}, {}, {}, []
    plateaued = converged = True
    few = False
    for name, m in mean_loss.items():
        a = _as_chains(m)
        C, D = a.shape
        dz = [_drift(a[c]) for c in range(C)]
        drift[name] = torch.tensor([d for d, _ in dz], dtype=torch.float64)
        drift_z[name] = torch.tensor([z for _, z in dz], dtype=torch.float64)
        rhat[name] = split_rhat(a)
        ess[name] = effective_sample_size(a)
        few = few or D < MIN_DRAWS_FOR_DRIFT
        bad = [
            c
            for c, (d, z) in enumerate(dz)
            if math.isfinite(d) and abs(d) > DRIFT_THRESHOLD and abs(z) > DRIFT_Z_THRESHOLD
        ]
        if bad:
            plateaued = False
            worst = max(bad, key=lambda c: abs(dz[c][0]))
            msgs.append(
                f"eval set {name!r}: chain(s) {bad} have not plateaued: the mean loss drifts by "
                f"{dz[worst][0]:+.2f} sd between the first and last quarter of chain {worst} "
                f"(z = {dz[worst][1]:+.1f}); increase burnin (and/or localization), or check the step size"
            )
        if math.isfinite(rhat[name]) and rhat[name] > RHAT_THRESHOLD:
            converged = False
            msgs.append(
                f"eval set {name!r}: split R-hat of the mean loss is {rhat[name]:.3f} > {RHAT_THRESHOLD}: "
                "chains disagree or trend; run longer chains / a longer burn-in"
            )
    if few:
        msgs.append(f"fewer than {MIN_DRAWS_FOR_DRIFT} draws per chain: drift could not be assessed")
    return SamplerDiagnostics(
        mean_loss={k: torch.as_tensor(v, dtype=torch.float64) for k, v in mean_loss.items()},
        reference_loss=dict(reference_loss),
        drift=drift,
        drift_z=drift_z,
        rhat=rhat,
        ess=ess,
        plateaued=plateaued,
        converged=converged,
        settings=dict(settings),
        messages=msgs,
    )
