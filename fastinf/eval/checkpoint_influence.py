"""Influence over training checkpoints (METHODS.md §9 baselines): TracIn-CP and checkpoint-ensembled
estimators, from per-example gradients captured at every adapter checkpoint.

* :func:`collect_with_losses`: one capture that also returns the per-example losses it took the
  gradients of (eval mode, the collector's loss), so a loss table comes free with the gradients.
* :func:`checkpoint_influence`: swap each checkpoint's adapter weights into the model in place
  (:func:`fastinf.traces.checkpoints.swapped_checkpoints`, as ``loss_table`` does), capture the train
  and test gradients there, and accumulate

  - TracIn-CP (Pruthi et al. 2020): I(i, test) = −Σ_t η_t ⟨g_t(i), g_t(test)⟩ (positive = harmful:
    a training step on i *raises* the test loss to first order), with η_t the learning rate of
    checkpoint t (:class:`fastinf.eval.hf.Checkpoints`); and its self-influence Σ_t η_t ‖g_t(i)‖²
    (high = suspicious, no test set);
  - checkpoint ensembles of preconditioned methods: the mean over checkpoints of a method's scores
    (fit and score at each checkpoint, the same options as the final-model run).

  Gradients are held one checkpoint at a time: memory O((n + m) · D), not O(T · (n + m) · D).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..estimators import KFAC, get_estimator, method_info
from ..gradients import LoRAGradientCollector
from ..gradients.losses import default_loss_fn
from ..traces.checkpoints import swapped_checkpoints
from .runner import MethodRun, error_text, method_options

__all__ = [
    "CheckpointInfluence",
    "checkpoint_influence",
    "collect_with_losses",
    "collector_capture_options",
    "ensemble_key",
    "needs_factors",
    "tracin_scores",
]


class _RecordingLoss:
    """``loss_fn`` that keeps a detached copy of every per-example loss it returns."""

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.loss_fn, self.parts = loss_fn, []

    def __call__(self, model: Any, batch: Any) -> torch.Tensor:
        out = self.loss_fn(model, batch)
        if isinstance(out, torch.Tensor):
            self.parts.append(out.detach().to("cpu", torch.float64))
        return out

    def take(self) -> torch.Tensor:
        out = torch.cat(self.parts) if self.parts else torch.zeros(0, dtype=torch.float64)
        self.parts = []
        return out


def collector_capture_options(collector: Any, factors: bool = True) -> dict[str, Any]:
    """``collect`` keyword arguments for a capture the K-FAC estimators can use: ``factors=True``
    where the collector supports it and captures full gradients (nothing otherwise: Kronecker factors
    describe unprojected blocks)."""
    params = inspect.signature(collector.collect).parameters
    full = getattr(collector, "projection", None) is None
    return {"factors": True} if factors and full and "factors" in params else {}


def needs_factors(methods: Sequence[str]) -> bool:
    """Whether any of ``methods`` preconditions with the capture's Kronecker factors (K-FAC, EK-FAC)."""
    return any(issubclass(method_info(m).cls, KFAC) for m in methods)


def collect_with_losses(
    model: Any,
    loaders: Sequence[Any],
    *,
    loss_fn: Callable | None = None,
    factors: bool = True,
    progress: bool = True,
    **collector_options: Any,
) -> tuple[list[Any], list[torch.Tensor]]:
    """Per-example gradients of every loader's examples and the losses they are the gradients of:
    ``([GradientSet per loader], [(n_k,) float64 losses per loader])``. ``collector_options`` go to
    :class:`~fastinf.gradients.LoRAGradientCollector` (e.g. ``include_modules_to_save=True``);
    ``factors=True`` also captures K-FAC factors, for the first loader only (the training set: the only one
    a K-FAC estimator fits on) and only where the collector offers them (full gradients).

    Raises:
        ValueError: the loss function recorded a number of losses other than one per example of a loader.
    """
    rec = _RecordingLoss(loss_fn or default_loss_fn(model))
    col = LoRAGradientCollector(model, loss_fn=rec, **collector_options)
    opts = collector_capture_options(col, factors)
    grads, losses = [], []
    for k, loader in enumerate(loaders):
        grads.append(col.collect(loader, progress=progress, **(opts if k == 0 else {})))
        losses.append(rec.take())
        if losses[-1].numel() != grads[-1].n:
            raise ValueError(
                f"loader {k}: the loss function gave {losses[-1].numel()} per-example losses for "
                f"{grads[-1].n} examples (it must return one loss per example, once per batch)"
            )
    return grads, losses


def _block_dots(train: Any, test: Any, reduce: str | None, scale: Mapping[str, float] | None = None) -> torch.Tensor:
    """Σ_blocks w_l ⟨g_l(i), g_l(test)⟩ in float64 (w_l = ``scale[l]``, default 1): (n,) against the mean test
    gradient, or (m, n)."""
    total = None
    for name in train.names:
        x = train[name].to(torch.float64)
        t = test[name].to(torch.float64)
        part = x @ t.mean(0) if reduce == "mean" else t @ x.T
        w = float((scale or {}).get(name, 1.0))
        part = part if w == 1.0 else part * w
        total = part if total is None else total + part
    return total


def tracin_scores(
    train_sets: Sequence[Any],
    test_sets: Sequence[Any],
    learning_rates: Sequence[float],
    reduce: str | None = "mean",
    block_lr_scale: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """TracIn-CP from gradients already captured at T checkpoints: −Σ_t η_t ⟨g_t(i), g_t(test)⟩ (float64;
    (n,) against the mean test gradient with ``reduce="mean"``, (m, n) with ``reduce=None``).
    ``block_lr_scale``: block → its learning rate as a multiple of η_t (a parameter group trained at another
    rate under the same schedule, e.g. a classifier head); the other blocks use η_t.

    Raises:
        ValueError: lengths differ, no checkpoints, or ``reduce`` not "mean"/None.
    """
    if not (len(train_sets) == len(test_sets) == len(learning_rates)) or not train_sets:
        raise ValueError(
            f"tracin_scores needs one train set, test set and learning rate per checkpoint; got "
            f"{len(train_sets)}, {len(test_sets)}, {len(learning_rates)}"
        )
    if reduce not in ("mean", None):
        raise ValueError(f"reduce must be 'mean' or None, got {reduce!r}")
    out = None
    for tr, te, lr in zip(train_sets, test_sets, learning_rates, strict=True):
        part = -float(lr) * _block_dots(tr, te, reduce, block_lr_scale)
        out = part if out is None else out + part
    return out


def ensemble_key(method: str) -> str:
    """Result key of ``method``'s checkpoint ensemble (``"datainf_ckpt_ensemble"``)."""
    return f"{method}_ckpt_ensemble"


@dataclass
class CheckpointInfluence:
    """What :func:`checkpoint_influence` returns.

    ``runs``: ``tracin_cp``, ``tracin_cp_self`` and ``<method>_ckpt_ensemble`` records; ``train_losses``
    (T, n) and ``test_losses`` (T, m): the per-example losses at each checkpoint (a Z0-Inf loss table);
    ``capture_seconds``: the per-checkpoint captures together; ``per_checkpoint``: with
    ``keep_per_checkpoint=True``, ``{method: [scores at each checkpoint used]}``."""

    runs: dict[str, MethodRun]
    train_losses: torch.Tensor
    test_losses: torch.Tensor
    capture_seconds: float
    per_checkpoint: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def checkpoint_influence(
    model: Any,
    checkpoints: Sequence[Any],
    train_loader: Any,
    test_loader: Any,
    *,
    learning_rates: Sequence[float],
    methods: Sequence[str] = ("datainf", "exact"),
    reduce: str | None = "mean",
    damping: float | str = "auto",
    loss_fn: Callable | None = None,
    collector_options: Mapping[str, Any] | None = None,
    block_lr_scale: Mapping[str, float] | None = None,
    skip_initial: bool = True,
    keep_per_checkpoint: bool = False,
    progress: bool = True,
) -> CheckpointInfluence:
    """TracIn-CP, its self-influence and the checkpoint ensembles of ``methods`` (module docstring).

    At each checkpoint the adapter is swapped into ``model`` in place (restored afterwards), the
    train and test gradients captured (``collector_options`` for the collector), TracIn accumulates
    −η_t ⟨g_t(i), g_t(test)⟩ and each method in ``methods`` fits and scores there (damping
    ``damping``). ``skip_initial``: the ensembles leave out checkpoint 0 when it is the untrained
    adapter (LoRA B = 0 makes every LoRA-A gradient zero, which a per-block λ cannot precondition);
    TracIn keeps every checkpoint. ``block_lr_scale``: see :func:`tracin_scores`. The TracIn rows'
    seconds are the captures plus their products; an ensemble's, its fits and scores (the captures are
    shared and reported as ``capture_seconds``).

    Raises:
        ValueError: no checkpoints, one learning rate per checkpoint missing, a trace method in
            ``methods``, ``reduce`` not "mean"/None.
    """
    cks = list(checkpoints)
    lrs = [float(x) for x in learning_rates]
    if not cks:
        raise ValueError("checkpoint_influence: no checkpoints given")
    if len(lrs) != len(cks):
        raise ValueError(f"{len(cks)} checkpoints but {len(lrs)} learning rates")
    if reduce not in ("mean", None):
        raise ValueError(f"reduce must be 'mean' or None, got {reduce!r}")
    wrong = [m for m in methods if method_info(m).input_kind != "gradients"]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} take loss traces, not gradients")
    first_ens = 1 if skip_initial and len(cks) > 1 else 0
    tracin = MethodRun("tracin_cp")
    tracin_self = MethodRun("tracin_cp_self")
    ens = {m: MethodRun(ensemble_key(m)) for m in methods}
    acc: dict[str, torch.Tensor | None] = {"tracin": None, "self": None, **{m: None for m in methods}}
    sec: dict[str, float] = {"capture": 0.0, "tracin": 0.0, **{m: 0.0 for m in methods}}
    per_ck: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    ltr, lte = [], []
    with contextlib.closing(swapped_checkpoints(model, cks)) as swaps:
        for t in tqdm(swaps, total=len(cks), desc="checkpoint captures", unit="ckpt", disable=not progress):
            t0 = time.perf_counter()
            (gtr, gte), (l_tr, l_te) = collect_with_losses(
                model,
                [train_loader, test_loader],
                loss_fn=loss_fn,
                factors=needs_factors(methods),
                progress=False,
                **dict(collector_options or {}),
            )
            sec["capture"] += time.perf_counter() - t0
            ltr.append(l_tr)
            lte.append(l_te)
            t0 = time.perf_counter()
            part = tracin_scores([gtr], [gte], [lrs[t]], reduce, block_lr_scale)
            w = block_lr_scale or {}
            sq = sum(v.to(torch.float64) * float(w.get(k, 1.0)) for k, v in gtr.sq_norms(torch.float64).items())
            sq = sq * lrs[t]
            acc["tracin"] = part if acc["tracin"] is None else acc["tracin"] + part
            acc["self"] = sq if acc["self"] is None else acc["self"] + sq
            sec["tracin"] += time.perf_counter() - t0
            if t < first_ens:
                continue
            for m in methods:
                if ens[m].error:
                    continue
                t0 = time.perf_counter()
                try:
                    est = get_estimator(m, **method_options(m, damping=damping))
                    sc = est.fit(gtr).score(gte, reduce=reduce).detach().cpu().double()
                    if not bool(torch.isfinite(sc).all()):
                        raise ValueError(f"non-finite scores at checkpoint {t}")
                except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
                    ens[m].error = f"checkpoint {t}: {error_text(e)}"
                    continue
                sec[m] += time.perf_counter() - t0
                acc[m] = sc if acc[m] is None else acc[m] + sc
                if keep_per_checkpoint:
                    per_ck[m].append(sc)
            del gtr, gte
    used = len(cks) - first_ens
    tracin.scores, tracin.seconds = [acc["tracin"]], [sec["capture"] + sec["tracin"]]
    scaled = f", {len(block_lr_scale)} block(s) at their own multiple of it" if block_lr_scale else ""
    tracin.info["note"] = f"T={len(cks)} checkpoints, η_t = the LoRA learning rate at t{scaled}"
    tracin_self.scores, tracin_self.seconds = [acc["self"]], list(tracin.seconds)
    tracin_self.info["note"] = "Σ_t η_t‖g_t(i)‖² (no test set)"
    for m, run in ens.items():
        if run.error is None and acc[m] is not None:
            run.scores, run.seconds = [acc[m] / used], [sec[m]]
            run.info["note"] = f"mean over {used} checkpoints" + (" (initial one left out)" if first_ens else "")
        elif run.error is None:
            run.error = "no checkpoint scored"
    runs = {"tracin_cp": tracin, "tracin_cp_self": tracin_self, **{ensemble_key(m): r for m, r in ens.items()}}
    return CheckpointInfluence(
        runs=runs,
        train_losses=torch.stack(ltr),
        test_losses=torch.stack(lte),
        capture_seconds=sec["capture"],
        per_checkpoint=per_ck if keep_per_checkpoint else {},
    )
