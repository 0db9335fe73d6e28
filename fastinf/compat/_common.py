"""Shared pieces of the drop-in engines: dict layouts <-> GradientSet, timing."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager

import torch

from ..gradients.gradient_set import GradientSet


def to_gradient_set(grad_dict: Mapping, names: list[str] | None = None) -> tuple[GradientSet, dict[str, tuple]]:
    """``{example_id: {param_name: tensor}}`` (ids 0..n−1) -> (GradientSet, original shapes per block)."""
    if not isinstance(grad_dict, Mapping) or len(grad_dict) == 0:
        raise ValueError("expected a non-empty dict {example_id: {param_name: tensor}}")
    ids = sorted(grad_dict.keys())
    if ids != list(range(len(ids))):
        raise ValueError("example ids must be exactly 0..n-1 (as in the reference engines)")
    first = grad_dict[ids[0]]
    names = list(first.keys()) if names is None else names
    shapes = {k: tuple(first[k].shape) for k in names}
    ordered = [{k: grad_dict[i][k] for k in names} for i in ids]
    gs = GradientSet.from_dicts(ordered, dtype=torch.float32)
    return gs, shapes


class EngineBase:
    """Attributes shared by the reference engines: ``time_dict``, ``hvp_dict``, ``IF_dict``."""

    def __init__(self) -> None:
        self.time_dict = defaultdict(list)
        self.hvp_dict = defaultdict(list)
        self.IF_dict = defaultdict(list)

    @contextmanager
    def _timed(self, key: str):
        start = time.time()
        yield
        self.time_dict[key] = time.time() - start

    def _write_json(self, path: str, payload: dict) -> None:
        def conv(x):
            if hasattr(x, "tolist"):
                return x.tolist()
            if hasattr(x, "to_dict"):
                return x.to_dict(orient="split")
            return x

        with open(path, "w") as f:
            json.dump(
                {k: {m: conv(v) for m, v in d.items()} if isinstance(d, dict) else conv(d) for k, d in payload.items()},
                f,
            )
