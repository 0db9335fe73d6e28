"""Drop-in replacement for the DataInf repository's engines (``src/influence.py``).

Change ``from influence import IFEngine`` to ``from fastinf.compat.datainf import IFEngine``: the
constructor, method names, attributes (``hvp_dict``, ``IF_dict``, ``time_dict``,
``val_grad_avg_dict``, ``n_train``, ``n_val``) and output types (numpy (n,) arrays; DataFrames with
rows = validation ids, columns = training ids) are those of the reference, computed by fastinf's
vectorised estimators instead of Python loops over examples.

Both engines return −⟨h, g⟩ (positive = harmful), as the reference does (its generation engine has had
the minus sign since commit c685ca2, "add negative sign for influence values from IFEngineGeneration").
The preconditioned vectors come from the estimators' public ``preconditioned_test`` (``Exact.inverse_hvp``).

Differences from the reference, on purpose:

* ``compute_hvp_LiSSA`` reproduces the reference's flipped-sign recursion (METHODS.md §4) because
  ``lissa_reference_compat=True`` by default here; pass ``False`` for the correct damped LiSSA.
* ``compute_hvp_accurate`` computes the exact damped inverse (a symmetric solve). The reference uses
  the general ``eig`` of a rank-deficient matrix, which is wrong when d_l > n; not reproduced.
* ``save_result`` writes JSON (``results_{run_id}.json``) instead of a pickle.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..estimators import DataInf, Exact, LiSSA
from ..gradients.gradient_set import GradientSet
from ._common import EngineBase, to_gradient_set

__all__ = ["IFEngine", "IFEngineGeneration"]


def _unflatten(vecs: dict[str, torch.Tensor], shapes: dict[str, tuple], row: int = 0) -> dict[str, torch.Tensor]:
    return {k: v[row].reshape(shapes[k]) for k, v in vecs.items()}


class IFEngine(EngineBase):
    """Influence on the mean validation loss (the DataInf repository's ``IFEngine``)."""

    def __init__(self, lissa_reference_compat: bool = True) -> None:
        super().__init__()
        self.lissa_reference_compat = lissa_reference_compat

    def preprocess_gradients(self, tr_grad_dict, val_grad_dict, noise_index=None) -> None:
        self.tr_grad_dict = tr_grad_dict
        self.val_grad_dict = val_grad_dict
        self.noise_index = noise_index
        self.n_train = len(tr_grad_dict)
        self.n_val = len(val_grad_dict)
        names = list(val_grad_dict[0].keys())
        self._train, self._shapes = to_gradient_set(tr_grad_dict, names)
        self._val, _ = to_gradient_set(val_grad_dict, names)
        self.compute_val_grad_avg()

    def compute_val_grad_avg(self) -> None:
        self._val_avg = self._val.mean()
        self.val_grad_avg_dict = _unflatten(self._val_avg.blocks(), self._shapes)

    # ------------------------------------------------------------------------------ hvps
    def compute_hvps(self, lambda_const_param=10, compute_accurate=True) -> None:
        self.compute_hvp_identity()
        self.compute_hvp_proposed(lambda_const_param=lambda_const_param)
        self.compute_hvp_LiSSA(lambda_const_param=lambda_const_param)
        if compute_accurate:
            self.compute_hvp_accurate(lambda_const_param=lambda_const_param)

    def compute_hvp_identity(self) -> None:
        with self._timed("identity"):
            self.hvp_dict["identity"] = self.val_grad_avg_dict.copy()

    def compute_hvp_proposed(self, lambda_const_param=10) -> None:
        with self._timed("proposed"):
            est = DataInf(damping_factor=1.0 / lambda_const_param).fit(self._train)
            self.hvp_dict["proposed"] = _unflatten(est.preconditioned_test(self._val_avg), self._shapes)

    def compute_hvp_LiSSA(self, lambda_const_param=10, n_iteration=10, alpha_const=1.0) -> None:
        with self._timed("LiSSA"):
            est = LiSSA(
                damping_factor=1.0 / lambda_const_param,
                depth=n_iteration,
                scale=1.0 / alpha_const,
                reference_compat=self.lissa_reference_compat,
                tol=0.0,
            ).fit(self._train)
            self.hvp_dict["LiSSA"] = _unflatten(est.preconditioned_test(self._val_avg), self._shapes)

    def compute_hvp_accurate(self, lambda_const_param=10) -> None:
        with self._timed("accurate"):
            est = Exact(damping_factor=1.0 / lambda_const_param, blockwise=True, dtype=torch.float64).fit(self._train)
            h = est.inverse_hvp(self._val_avg)
            self.hvp_dict["accurate"] = {k: v.float() for k, v in _unflatten(h, self._shapes).items()}

    # ------------------------------------------------------------------------------ scores
    def compute_IF(self) -> None:
        X = self._train
        for method, hvp in self.hvp_dict.items():
            acc = torch.zeros(X.n, dtype=torch.float64)
            for k in X.names:
                acc += (X[k] @ hvp[k].reshape(-1).to(X[k].dtype)).double()
            self.IF_dict[method] = (-acc).numpy().astype(np.float64)

    def save_result(self, noise_index=None, run_id=0) -> None:
        self._write_json(
            f"./results_{run_id}.json",
            {"runtime": dict(self.time_dict), "noise_index": noise_index, "influence": dict(self.IF_dict)},
        )


class IFEngineGeneration(EngineBase):
    """One score per (validation, training) pair (the DataInf repository's ``IFEngineGeneration``)."""

    def preprocess_gradients(self, tr_grad_dict, val_grad_dict) -> None:
        self.tr_grad_dict = tr_grad_dict
        self.val_grad_dict = val_grad_dict
        self.n_train = len(tr_grad_dict)
        self.n_val = len(val_grad_dict)
        names = list(val_grad_dict[0].keys())
        self._train, self._shapes = to_gradient_set(tr_grad_dict, names)
        self._val, _ = to_gradient_set(val_grad_dict, names)

    def compute_hvps(self, lambda_const_param=10) -> None:
        self.compute_hvp_identity()
        self.compute_hvp_proposed(lambda_const_param=lambda_const_param)

    def compute_hvp_identity(self) -> None:
        with self._timed("identity"):
            self.hvp_dict["identity"] = self.val_grad_dict.copy()
            self._precond = {"identity": self._val}

    def compute_hvp_proposed(self, lambda_const_param=10) -> None:
        with self._timed("proposed"):
            est = DataInf(damping_factor=1.0 / lambda_const_param).fit(self._train)
            h = est.preconditioned_test(self._val)
            self._precond = getattr(self, "_precond", {})
            self._precond["proposed"] = GradientSet(h, validate=False)
            self.hvp_dict["proposed"] = {j: _unflatten(h, self._shapes, j) for j in range(self.n_val)}

    def compute_IF(self) -> None:
        X = self._train
        for method, H in self._precond.items():
            S = -sum(H[k].double() @ X[k].double().T for k in X.names)  # (m, n)
            self.IF_dict[method] = pd.DataFrame(S.numpy(), dtype=float)

    def save_result(self, run_id=0) -> None:
        self._write_json(f"./results_{run_id}.json", {"runtime": dict(self.time_dict), "influence": dict(self.IF_dict)})
