"""Run several estimators on the same gradients / traces and time them (used by every experiment)."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MethodRun", "PeakRSS", "method_options", "run_gradient_methods", "timed"]

GRADIENT_METHODS = ["hessian_free", "diagonal_fisher", "datainf", "lissa", "rrinf", "rrinf_fixed_point", "exact"]


class PeakRSS:
    """Peak growth of the process's resident memory (MB) while the block runs, sampled every 5 ms
    (CPU); on CUDA, the peak of ``torch.cuda.max_memory_allocated``."""

    def __init__(self) -> None:
        self.peak_mb = 0.0

    def _rss(self) -> float:
        try:
            import psutil

            return psutil.Process().memory_info().rss / 2**20
        except Exception:  # pragma: no cover - psutil missing
            return 0.0

    def __enter__(self) -> PeakRSS:
        self._base = self._rss()
        self._peak = self._base
        self._stop = threading.Event()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mb = self._peak - self._base
        if torch.cuda.is_available():
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated() / 2**20)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MB) of ``fn()``."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t0
    return out, sec, mem.peak_mb


@dataclass
class MethodRun:
    """Scores of one method (one entry per seed for stochastic methods), with time and memory."""

    name: str
    scores: list[torch.Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def method_options(name: str, *, damping: float | str = "auto", damping_factor: float = 0.1, seed: int = 0) -> dict:
    """Options used by the experiments (paper settings; LiSSA with a depth that fits a demo)."""
    opts: dict[str, Any] = {}
    if name not in ("hessian_free",):
        opts["damping"] = damping
        opts["damping_factor"] = damping_factor
    if name == "rrinf":
        opts["seed"] = seed
    if name == "lissa":
        opts["depth"] = 100
    return opts


def run_gradient_methods(
    train: Any,
    test: Any,
    methods: Sequence[str],
    *,
    reduce: str | None = "mean",
    rrinf_seeds: Sequence[int] = (0, 1, 2),
    damping: float | str = "auto",
    progress: bool = True,
) -> dict[str, MethodRun]:
    """Fit + score every gradient method on (train, test); RRInf once per seed. Scores are (n,) with
    ``reduce="mean"`` or (m, n) with ``reduce=None``. A failing method records its error."""
    from tqdm.auto import tqdm

    import fastinf

    runs: dict[str, MethodRun] = {}
    for name in tqdm(list(methods), desc="influence methods", unit="method", disable=not progress):
        run = MethodRun(name)
        seeds = list(rrinf_seeds) if name == "rrinf" else [0]
        try:
            peak = 0.0
            for s in seeds:
                est = fastinf.get_estimator(name, **method_options(name, damping=damping, seed=s))
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="LiSSA did not reach", category=RuntimeWarning)
                    scores, sec, mb = timed(lambda est=est: est.fit(train).score(test, reduce=reduce))
                if not bool(torch.isfinite(scores).all()):
                    raise ValueError("non-finite scores")
                run.scores.append(scores.detach().cpu().double())
                run.seconds.append(sec)
                peak = max(peak, mb)
            run.peak_mb = peak
            if hasattr(est, "converged_"):
                run.info["converged"] = bool(est.converged_)
            lams = getattr(est, "lambdas_", None)
            if name != "hessian_free" and lams:
                vals = list(lams.values())
                run.info["lambda"] = vals[0] if len(set(vals)) == 1 else [min(vals), max(vals)]
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            run.error = f"{type(e).__name__}: {' '.join(str(e).split())}"
        runs[name] = run
    return runs
