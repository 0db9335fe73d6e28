"""SGLD loss traces from the localised tempered posterior around the trained weights (METHODS.md §8).

``sample_posterior_traces`` samples

    p(w) ∝ exp(−nβ L_n(w) − (γ/2) ‖w − w*‖²),   L_n = mean training loss,

over the adapter parameters only (by default: the parameters that currently require grad, e.g. the
LoRA weights of a peft model), with C chains started at w* and the SGLD step

    w ← w − (ε/2) P [nβ ∇L_B(w) + γ (w − w*)] + √(ε P) ξ,   ξ ~ N(0, I),

where ∇L_B is the gradient of the mean loss of the current minibatch (batches cycle through
``train_loader``) and P = I, or with ``preconditioner="rmsprop"`` the diagonal RMSProp
preconditioner P = diag(1 / (√V̂ + 0.1)) (see :func:`sample_posterior_traces` for exactly what is
accumulated). After ``burnin`` steps, every ``thin``-th step is a draw: the loss of every example of
every eval set is recorded (forward passes only). The result is one :class:`LossTrace` per eval set,
ready for :class:`fastinf.BIF`, plus stationarity diagnostics (:class:`SamplerDiagnostics`).

The model's weights, ``requires_grad`` flags, train/eval modes and the global CPU RNG state are
restored exactly afterwards, also when sampling raises (including ``KeyboardInterrupt``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .diagnostics import (
    SamplerDiagnostics,
    compute_diagnostics,
    effective_sample_size,
    split_rhat,
)
from .loss_trace import LossTrace

__all__ = [
    "PosteriorTraces",
    "SamplerDiagnostics",
    "SamplingDivergedError",
    "effective_sample_size",
    "sample_posterior_traces",
    "split_rhat",
]

RMSPROP_ALPHA = 0.99  # V ← α V + (1 − α) g²
RMSPROP_EPS = 0.1  # P = 1 / (√V̂ + eps)
_RESERVED = "diagnostics"


class SamplingDivergedError(RuntimeError):
    """A loss became NaN/inf during SGLD sampling (the step size is too large for the posterior)."""


class PosteriorTraces(dict):
    """``{eval set name: LossTrace}`` with the run's :class:`SamplerDiagnostics` in ``.diagnostics``.

    ``traces["diagnostics"]`` also returns the diagnostics (it is not a key: iterating, ``keys()``,
    ``items()`` and ``len`` see the eval sets only, so every value is a LossTrace).
    """

    def __init__(self, traces: Mapping[str, LossTrace], diagnostics: SamplerDiagnostics) -> None:
        super().__init__(traces)
        self.diagnostics = diagnostics

    def __missing__(self, key: Any) -> Any:
        if key == _RESERVED:
            return self.diagnostics
        raise KeyError(key)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {v!r}" for k, v in self.items())
        return f"PosteriorTraces({{{inner}}}, plateaued={self.diagnostics.plateaued})"


# ----------------------------------------------------------------------------------- helpers
def _positive(name: str, v: Any, hint: str = "") -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}{hint}")
    return v


def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _chain_seed(seed: int, chain: int, stream: int = 0) -> int:
    """Seed of chain ``chain``'s generator (stream 0: SGLD noise; 1: the global CPU RNG that drives
    shuffling train loaders)."""
    s = np.random.SeedSequence([seed, chain, stream]).generate_state(2, np.uint32)
    return (int(s[0]) << 31 | int(s[1]) >> 1) & ((1 << 63) - 1)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _select_params(model: torch.nn.Module, params: Any) -> list[tuple[str, torch.nn.Parameter]]:
    named = list(model.named_parameters())
    if params is None:
        sel = [(n, p) for n, p in named if p.requires_grad]
        if not sel:
            raise ValueError(
                "the model has no parameters that require grad, so there is nothing to sample: attach the "
                "trained adapter as trainable (e.g. PeftModel.from_pretrained(..., is_trainable=True)) or pass "
                "params=[parameter names]"
            )
        return sel
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    sel, seen = [], set()
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"params: the model has no parameter named {item!r}")
            name = item
        elif isinstance(item, torch.Tensor):
            name = by_id.get(id(item))
            if name is None:
                raise ValueError("params: a tensor in params is not a parameter of the model")
        else:
            raise TypeError(f"params must be parameter names or parameters, got {type(item).__name__}")
        if name not in seen:
            seen.add(name)
            sel.append((name, by_name[name]))
    if not sel:
        raise ValueError("params is empty: nothing to sample")
    for name, p in sel:
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating parameters can be sampled")
    return sel


def _check_losses(out: Any, where: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{where}: loss_fn(model, batch) must return one loss per example, shape (N,), got {shape}")
    return out


def _is_shuffled(loader: Any) -> bool:
    return isinstance(getattr(loader, "sampler", None), torch.utils.data.RandomSampler)


# ----------------------------------------------------------------------------------- sampler
def sample_posterior_traces(
    model: torch.nn.Module,
    train_loader: Iterable[Any],
    eval_sets: Mapping[str, Iterable[Any]],
    *,
    n_beta: float,
    localization: float,
    step_size: float,
    chains: int = 4,
    draws: int = 200,
    burnin: int = 0,
    thin: int = 1,
    preconditioner: str | None = None,
    seed: int = 0,
    progress: bool = True,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    params: Iterable[str | torch.Tensor] | None = None,
    callback: Callable[[int, int, dict[str, torch.Tensor]], Any] | None = None,
) -> PosteriorTraces:
    """Loss traces of every eval example along SGLD draws from the local tempered posterior.

    Args:
        model: the trained model (e.g. a peft model); sampled in place, restored exactly afterwards.
        train_loader: batches of the training set; the SGLD gradient is that of the mean loss of
            one batch, ``loss_fn(model, batch).mean()``; batches cycle (a fresh iterator per chain,
            re-created when exhausted). A full-batch loader gives full-gradient Langevin dynamics.
        eval_sets: ``{name: loader}`` whose every example's loss is recorded at every draw, e.g.
            ``{"train": train_eval_loader, "test": test_loader}``. Loaders must yield the same
            examples in the same order on every pass (a shuffling DataLoader is rejected).
            ``"diagnostics"`` is reserved.
        n_beta: nβ, the inverse temperature times n (> 0). devinterp's convention: m / ln m for
            batch size m; larger = tighter posterior.
        localization: γ > 0, strength of the pull towards w* (the localised posterior needs it).
        step_size: ε > 0. Plain SGLD is stable for ε·(largest curvature of nβ L_n + γ) ≲ 1 and has
            O(ε) bias; for a Gaussian posterior with precision A the draws' covariance is
            (A − εA²/4)⁻¹.
        chains, draws, burnin, thin: C chains, each ``burnin + draws·thin`` steps; after the
            burn-in, every ``thin``-th step is a draw (so the first draw follows step burnin + thin).
        preconditioner: None, or ``"rmsprop"``: per coordinate, with g the minibatch gradient of
            the mean loss ∇L_B(w) (not scaled by nβ, without the localization term; devinterp's
            choice), V ← 0.99 V + 0.01 g² (V = 0 at the start of every chain),
            V̂ = V / (1 − 0.99ᵗ) (Adam-style bias correction, t = step within the chain) and
            P = 1 / (√V̂ + 0.1); both the drift and the noise are scaled: step ε P, noise √(ε P) ξ.
            For slowly varying P the draws target the same posterior up to O(εP) bias (the
            ∇·P correction term of exact preconditioned Langevin dynamics is omitted, as in devinterp).
        seed: chain c's noise comes from a ``torch.Generator`` seeded from (seed, c); the global CPU
            RNG (which drives shuffling train loaders that have no generator of their own) is reseeded
            from (seed, c) at the start of each chain and restored afterwards. So a run is
            deterministic for a fixed seed (on a given device).
        progress: tqdm bar over SGLD steps.
        loss_fn: ``loss_fn(model, batch) -> Tensor (N,)``; default
            :func:`fastinf.gradients.losses.default_loss_fn` (causal LM / classification / UNet).
        params: the parameters to sample (names or parameter tensors of ``model``); default: those
            that currently require grad. All others are held fixed.
        callback: optional ``callback(chain, draw, {name: tensor})`` after each draw is recorded,
            with the current (sampled) parameter values (live tensors: clone what you keep).

    The model runs in eval mode throughout (dropout off: the posterior is that of the deterministic
    loss, the same loss the traces record); forward passes for the traces run under
    ``torch.no_grad``. Weights, ``requires_grad`` flags, train/eval modes and the global CPU RNG
    state are restored afterwards, also on errors. Parameters in half precision are updated through a
    float32 master copy.

    Returns:
        :class:`PosteriorTraces`: ``{name: LossTrace(losses (chains·draws, n_name),
        chains=(chains·draws,) chain id of each row, reference=(n_name,) losses at w*)}``, rows ordered
        chain by chain, with ``.diagnostics`` (also ``traces["diagnostics"]``), a
        :class:`SamplerDiagnostics`. Warns (``RuntimeWarning``) when chains have not plateaued or
        R-hat > 1.1.

    Raises:
        ValueError / TypeError: bad settings (γ = 0 included), empty loaders or eval sets, no
            parameters to sample, a loss_fn that does not return (N,) losses, non-finite losses at w*.
        SamplingDivergedError: a NaN/inf loss during sampling (with the chain and step; use a
            smaller step size, a larger localization, or rmsprop).
    """
    n_beta = _positive("n_beta", n_beta)
    if isinstance(localization, numbers.Real) and not isinstance(localization, bool) and localization == 0:
        raise ValueError(
            "localization (γ) must be set to a value > 0: the BIF posterior is localised around the trained "
            "weights by (γ/2)‖w − w*‖² (devinterp's default γ = 0 is not a local posterior); values used in "
            "practice are of order 1e2–1e3 for LLM fine-tunes"
        )
    localization = _positive("localization", localization)
    step_size = _positive("step_size", step_size)
    chains = _int("chains", chains, 1)
    draws = _int("draws", draws, 2)
    burnin = _int("burnin", burnin, 0)
    thin = _int("thin", thin, 1)
    seed = _int("seed", seed, 0)
    if preconditioner not in (None, "rmsprop"):
        raise ValueError(f"preconditioner must be None or 'rmsprop', got {preconditioner!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable(chain, draw, params)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(eval_sets, Mapping):
        raise TypeError(
            "eval_sets must be a mapping {name: DataLoader}, e.g. {'train': train_eval_loader, 'test': test_loader}; "
            f"got {type(eval_sets).__name__}"
        )
    if not eval_sets:
        raise ValueError("eval_sets is empty: give at least one {name: DataLoader} whose losses to record")
    for name, loader in eval_sets.items():
        if not isinstance(name, str):
            raise TypeError(f"eval set names must be strings, got {name!r}")
        if name == _RESERVED:
            raise ValueError(f"{_RESERVED!r} is reserved for the sampler diagnostics; rename that eval set")
        if _is_shuffled(loader):
            raise ValueError(
                f"eval set {name!r}: the DataLoader shuffles; the traces need the same examples in the same order "
                "at every draw (use shuffle=False)"
            )
    if loss_fn is None:
        from ..gradients.losses import default_loss_fn

        loss_fn = default_loss_fn(model)
    sel = _select_params(model, params)
    names = [n for n, _ in sel]
    ps = [p for _, p in sel]
    device = next(model.parameters()).device
    rmsprop = preconditioner == "rmsprop"
    steps_per_chain = burnin + draws * thin

    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    saved = [p.detach().clone() for p in ps]  # w*, also the restore point
    low = [p.dtype not in (torch.float32, torch.float64) for p in ps]
    anchors = [s.float() if lo else s for s, lo in zip(saved, low, strict=True)]

    def eval_pass(name: str, loader: Iterable[Any]) -> torch.Tensor:
        parts = []
        with torch.no_grad():
            for batch in loader:
                out = _check_losses(loss_fn(model, _to_device(batch, device)), f"eval set {name!r}")
                parts.append(out.detach().to("cpu", torch.promote_types(out.dtype, torch.float32)))
        if not parts:
            raise ValueError(f"eval set {name!r} yielded no batches")
        return torch.cat(parts)

    from tqdm.auto import tqdm

    bar = None
    try:
        with torch.random.fork_rng(devices=[]):
            for p, _ in flags:
                p.requires_grad_(False)
            for p in ps:
                p.requires_grad_(True)
            model.eval()

            reference: dict[str, torch.Tensor] = {}
            for name, loader in eval_sets.items():
                ref = eval_pass(name, loader)
                bad = ~torch.isfinite(ref)
                if bool(bad.any()):
                    i = int(torch.nonzero(bad)[0, 0])
                    raise ValueError(f"eval set {name!r}: the loss of example {i} at the trained weights is {ref[i]}")
                reference[name] = ref
            rows = chains * draws
            out = {k: torch.empty(rows, r.numel(), dtype=r.dtype) for k, r in reference.items()}

            bar = tqdm(total=chains * steps_per_chain, desc="SGLD", unit="step", disable=not progress)
            unused_warned = False
            for c in range(chains):
                with torch.no_grad():
                    for p, s in zip(ps, saved, strict=True):
                        p.copy_(s)
                masters = [p.detach().float().clone() if lo else p.data for p, lo in zip(ps, low, strict=True)]
                gens: dict[torch.device, torch.Generator] = {}
                for p in ps:
                    if p.device not in gens:
                        gens[p.device] = torch.Generator(device=p.device).manual_seed(_chain_seed(seed, c, 0))
                torch.default_generator.manual_seed(_chain_seed(seed, c, 1))
                V = [torch.zeros_like(w) for w in masters] if rmsprop else None
                it = iter(train_loader)
                d = 0
                for step in range(1, steps_per_chain + 1):
                    try:
                        batch = next(it)
                    except StopIteration:
                        it = iter(train_loader)
                        try:
                            batch = next(it)
                        except StopIteration:
                            raise ValueError("train_loader yielded no batches") from None
                    with torch.enable_grad():
                        losses = _check_losses(loss_fn(model, _to_device(batch, device)), "train_loader batch")
                        L = losses.to(torch.promote_types(losses.dtype, torch.float32)).mean()
                    if not bool(torch.isfinite(L)):
                        raise SamplingDivergedError(
                            f"SGLD diverged: the minibatch loss is {float(L)} at chain {c}, step {step} "
                            f"(step_size={step_size:g}); use a smaller step_size (or a larger localization, "
                            "or preconditioner='rmsprop')"
                        )
                    if not L.requires_grad:
                        raise ValueError(
                            "the training loss does not depend on the sampled parameters (no gradient); "
                            f"sampled: {names[:5]}{'…' if len(names) > 5 else ''}"
                        )
                    grads = torch.autograd.grad(L, ps, allow_unused=True)
                    if not unused_warned and any(g is None for g in grads):
                        unused_warned = True
                        miss = [n for n, g in zip(names, grads, strict=True) if g is None]
                        warnings.warn(
                            f"{len(miss)} sampled parameter(s) get no gradient from the loss (e.g. {miss[0]!r}); "
                            "they only diffuse under the localization term",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    with torch.no_grad():
                        for k, (w, w0, g) in enumerate(zip(masters, anchors, grads, strict=True)):
                            g = torch.zeros_like(w) if g is None else g.to(w.dtype)
                            drift = (w - w0).mul_(localization).add_(g, alpha=n_beta)
                            noise = torch.randn(w.shape, generator=gens[w.device], device=w.device, dtype=w.dtype)
                            if rmsprop:
                                V[k].mul_(RMSPROP_ALPHA).addcmul_(g, g, value=1 - RMSPROP_ALPHA)
                                vhat = V[k] / (1 - RMSPROP_ALPHA**step)
                                P = 1.0 / (vhat.sqrt_() + RMSPROP_EPS)
                                w.addcmul_(P, drift, value=-step_size / 2)
                                w.addcmul_(P.sqrt_(), noise, value=math.sqrt(step_size))
                            else:
                                w.add_(drift, alpha=-step_size / 2)
                                w.add_(noise, alpha=math.sqrt(step_size))
                            if low[k]:
                                ps[k].copy_(w)
                    bar.update(1)
                    if step <= burnin or (step - burnin) % thin:
                        continue
                    row = c * draws + d
                    for name, loader in eval_sets.items():
                        vals = eval_pass(name, loader)
                        if vals.numel() != out[name].shape[1]:
                            raise ValueError(
                                f"eval set {name!r} yielded {vals.numel()} losses at chain {c}, draw {d} but "
                                f"{out[name].shape[1]} at w*: its loader must yield the same examples on every pass"
                            )
                        bad = ~torch.isfinite(vals)
                        if bool(bad.any()):
                            i = int(torch.nonzero(bad)[0, 0])
                            raise SamplingDivergedError(
                                f"SGLD diverged: eval set {name!r}, example {i} has loss {float(vals[i])} at chain "
                                f"{c}, step {step} (draw {d}; step_size={step_size:g}); use a smaller step_size (or a "
                                "larger localization, or preconditioner='rmsprop')"
                            )
                        out[name][row] = vals
                    if callback is not None:
                        callback(c, d, {n: p.detach() for n, p in sel})
                    d += 1
                    if progress:
                        first = next(iter(out))
                        bar.set_postfix(chain=c, loss=f"{float(out[first][row].mean()):.4g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        with torch.no_grad():
            for p, s in zip(ps, saved, strict=True):
                p.copy_(s)
        for p, f in flags:
            p.requires_grad_(f)
        for m, mode in modes:
            m.training = mode

    chain_ids = torch.arange(chains).repeat_interleave(draws)
    traces = {
        name: LossTrace(out[name], chains=chain_ids, reference=reference[name].to(out[name].dtype)) for name in out
    }
    settings = {
        "n_beta": n_beta,
        "localization": localization,
        "step_size": step_size,
        "chains": chains,
        "draws": draws,
        "burnin": burnin,
        "thin": thin,
        "preconditioner": preconditioner,
        "seed": seed,
        "params": names,
    }
    diag = compute_diagnostics(
        {k: v.to(torch.float64).mean(1).reshape(chains, draws) for k, v in out.items()},
        {k: float(v.to(torch.float64).mean()) for k, v in reference.items()},
        settings,
    )
    for msg in diag.messages:
        warnings.warn(f"sample_posterior_traces: {msg}", RuntimeWarning, stacklevel=2)
    return PosteriorTraces(traces, diag)
