"""Drop-in replacement for the RRInf repository's engines (``src/influence.py``).

Change the import to ``from fastinf.compat.rrinf import IFEngine`` (or ``IFEngineGeneration``): the
constructor, methods (``preprocess_gradients``, ``compute_IF_baselines``, ``compute_IF_identity``,
``compute_IF_DataInf``, ``compute_IF_LiSSA``, ``compute_IF_accurate``, ``compute_IF_RRInf``) and
outputs (``IF_dict`` numpy arrays / DataFrames with rows = validation ids, columns = training ids,
``time_dict`` in seconds) are the reference's, computed through the estimators' public methods
(``preconditioned_test``, ``Exact.inverse_hvp``, ``RRInf.set_draws`` and ``RRInf.omega``). RRInf's
coordinate (or layer) draws come from the same global RNGs as the reference (``torch.randint`` on the
default CPU generator, one draw per step; ``np.random.shuffle`` of the layer names in layer mode), so
after the same ``torch.manual_seed`` / ``np.random.seed`` the same rows are drawn and the numbers agree
to float32 rounding.

Differences from the reference, on purpose:

* Runs on CUDA when available, else CPU (the reference hard-codes ``'cuda'``): pass ``device=``.
* A zero row of Φ contributes a zero data term while the step's regulariser still applies (METHODS.md §5),
  instead of turning ω into NaN; layer mode averages the row terms over all d_l rows, like the reference.
* ``compute_IF_baselines(compute_accurate=True)`` runs ``compute_IF_accurate`` (the reference calls a
  missing method and raises), and ``accurate`` is the exact damped inverse (no general ``eig``).
* ``compute_IF_LiSSA`` reproduces the reference's flipped-sign recursion while
  ``lissa_reference_compat=True`` (default); ``False`` gives the correct damped LiSSA.
* ``save_result`` writes JSON, not a pickle.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..estimators import DataInf, Exact, HessianFree, LiSSA, RRInf
from ..gradients.gradient_set import GradientSet
from ._common import EngineBase, to_gradient_set

__all__ = ["IFEngine", "IFEngineGeneration"]


class _RRInfEngineBase(EngineBase):
    _generation = False

    def __init__(self, device: str | torch.device | None = None, lissa_reference_compat: bool = True) -> None:
        super().__init__()
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.lissa_reference_compat = lissa_reference_compat

    def _load(self, tr_grad_dict, val_grad_dict) -> None:
        self.tr_grad_dict = tr_grad_dict
        self.val_grad_dict = val_grad_dict
        self.n_train = len(tr_grad_dict)
        self.n_val = len(val_grad_dict)
        self._names = list(val_grad_dict[0].keys())
        train, self._shapes = to_gradient_set(tr_grad_dict, self._names)
        val, _ = to_gradient_set(val_grad_dict, self._names)
        self._train, self._val = train.to(self.device), val.to(self.device)
        self.total_param_size = self._train.dim
        self.S = (self._train.matrix().pow(2).mean(1)).cpu()

    @property
    def Phi(self) -> torch.Tensor:
        """Design matrix Φ (D × n): column i = training example i's flattened gradient."""
        return self._train.matrix().T

    def _queries(self) -> GradientSet:
        return self._val if self._generation else self._val.mean()

    def _store(self, key: str, scores: torch.Tensor) -> None:
        """scores: (m, n) in fastinf's convention (= the reference's −⟨hvp, g⟩)."""
        if self._generation:
            self.IF_dict[key] = pd.DataFrame(scores.double().cpu().numpy(), dtype=float)
        else:
            self.IF_dict[key] = scores[0].double().cpu().numpy()

    def _hvp_out(self, key: str, h: dict[str, torch.Tensor]) -> None:
        shaped = [
            {k: v[j].reshape(self._shapes[k]).cpu() for k, v in h.items()} for j in range(h[self._names[0]].shape[0])
        ]
        self.hvp_dict[key] = {j: d for j, d in enumerate(shaped)} if self._generation else shaped[0]

    # ------------------------------------------------------------------------------ baselines
    def compute_IF_baselines(self, lambda_const_param=10, compute_accurate=True) -> None:
        self.compute_IF_identity()
        self.compute_IF_DataInf(lambda_const_param=lambda_const_param)
        if not self._generation:
            self.compute_IF_LiSSA(lambda_const_param=lambda_const_param)
            if compute_accurate:
                self.compute_IF_accurate(lambda_const_param=lambda_const_param)

    def _run(self, key: str, est, precondition) -> None:
        with self._timed(key):
            est.fit(self._train)
            h = precondition(est, self._queries())
            scores = -sum(h[k] @ self._train[k].T for k in self._names)
            self._store(key, scores)
        self._hvp_out(key, h)

    def compute_IF_identity(self) -> None:
        self._run("identity", HessianFree(), lambda est, q: est.preconditioned_test(q))

    def compute_IF_DataInf(self, lambda_const_param=10) -> None:
        self._run(
            "DataInf", DataInf(damping_factor=1.0 / lambda_const_param), lambda est, q: est.preconditioned_test(q)
        )

    def compute_IF_LiSSA(self, lambda_const_param=10, n_iteration=10, alpha_const=1.0) -> None:
        est = LiSSA(
            damping_factor=1.0 / lambda_const_param,
            depth=n_iteration,
            scale=1.0 / alpha_const,
            reference_compat=self.lissa_reference_compat,
            tol=0.0,
        )
        self._run("LiSSA", est, lambda est, q: est.preconditioned_test(q))

    def compute_IF_accurate(self, lambda_const_param=10) -> None:
        est = Exact(damping_factor=1.0 / lambda_const_param, blockwise=True, dtype=torch.float64)
        self._run("accurate", est, lambda est, q: {k: v.float() for k, v in est.inverse_hvp(q).items()})

    # ------------------------------------------------------------------------------ RRInf
    def compute_IF_RRInf(self, num_iterations=None, learning_rate=0.01, lambda_const_param=10, layer=True) -> None:
        if num_iterations is None:
            num_iterations = 2000 if self._generation else 1000
        with self._timed("RRInf"):
            est = RRInf(
                lr=learning_rate,
                iters=int(num_iterations),
                damping_factor=1.0 / lambda_const_param,
                sampling="layer" if layer else "neuron",
                dtype=torch.float32,
            ).fit(self._train)
            # replay the reference's RNG: global numpy shuffle of the layer names, then one global torch draw per step
            if layer:
                order = list(self._names)
                np.random.shuffle(order)  # noqa: NPY002 (replays the reference global RNG)
                sel = torch.randint(0, len(order), (int(num_iterations),))
                pos = {k: i for i, k in enumerate(self._names)}
                est.set_draws(torch.tensor([pos[order[i]] for i in sel.tolist()], dtype=torch.int64))
            else:
                est.set_draws(torch.randint(0, self.total_param_size, (int(num_iterations),)))
            omega = est.omega(self._queries())  # (n, m)
            if self._generation:
                self.IF_dict["RRInf"] = pd.DataFrame(omega.T.cpu().double().numpy(), dtype=float)
            else:
                self.IF_dict["RRInf"] = omega[:, 0].cpu().numpy().astype(np.float32)
        self.rrinf_estimator_ = est

    def save_result(self, noise_index=None, run_id=0) -> None:
        payload = {"runtime": dict(self.time_dict), "influence": dict(self.IF_dict)}
        if not self._generation:
            payload["noise_index"] = noise_index
        self._write_json(f"./results_{run_id}.json", payload)


class IFEngine(_RRInfEngineBase):
    """Influence on the mean validation loss (the RRInf repository's ``IFEngine``)."""

    def preprocess_gradients(self, tr_grad_dict, val_grad_dict, noise_index=None) -> None:
        self.noise_index = noise_index
        self._load(tr_grad_dict, val_grad_dict)
        self.compute_val_grad_avg()

    def compute_val_grad_avg(self) -> None:
        avg = self._val.mean()
        self.val_grad_avg_dict = {k: avg[k][0].reshape(self._shapes[k]).cpu() for k in self._names}
        self.val_grad_avg = avg.matrix()[0]


class IFEngineGeneration(_RRInfEngineBase):
    """One score per (validation, training) pair (the RRInf repository's ``IFEngineGeneration``)."""

    _generation = True

    def preprocess_gradients(self, tr_grad_dict, val_grad_dict) -> None:
        self._load(tr_grad_dict, val_grad_dict)

    @property
    def val_grad(self) -> torch.Tensor:
        """Validation matrix (D × m)."""
        return self._val.matrix().T
