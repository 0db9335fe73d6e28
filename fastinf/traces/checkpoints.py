"""Adapter checkpoints: per-example loss tables and the checkpoints' Gram matrix (for Z0-Inf).

A checkpoint is an adapter state dict (``get_peft_model_state_dict`` keys, or the model's own
parameter names), a directory written by ``save_pretrained`` / the HF Trainer / fastinf's
``CheckpointCallback`` (``adapter_model.safetensors``), or a ``.safetensors`` file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["checkpoint_gram", "load_checkpoint", "loss_table", "swapped_checkpoints"]

Checkpoint = Mapping[str, torch.Tensor] | str | os.PathLike


def _file_of(ck: str | os.PathLike) -> Path:
    p = Path(ck)
    if p.is_dir():
        for name in ("adapter_model.safetensors", "model.safetensors"):
            if (p / name).exists():
                return p / name
        if (p / "adapter_model.bin").exists():
            return p / "adapter_model.bin"
        raise FileNotFoundError(
            f"{p}: no adapter_model.safetensors (or adapter_model.bin) in this checkpoint directory"
        )
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def load_checkpoint(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """A checkpoint as a state dict (tensors on CPU). ``.bin`` files are read with ``weights_only=True``."""
    if isinstance(ck, Mapping):
        return {k: torch.as_tensor(v) for k, v in ck.items()}
    f = _file_of(ck)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(f))
    return torch.load(f, map_location="cpu", weights_only=True)


def _keys_and_reader(ck: Checkpoint) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """Keys of a checkpoint and a function reading one tensor (lazily for safetensors files)."""
    if isinstance(ck, Mapping):
        return sorted(ck), lambda k: torch.as_tensor(ck[k])
    f = _file_of(ck)
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            keys = sorted(h.keys())

        def read(k: str) -> torch.Tensor:
            with safe_open(str(f), framework="pt") as h2:
                return h2.get_tensor(k)

        return keys, read
    sd = load_checkpoint(f)
    return sorted(sd), lambda k: sd[k]


def checkpoint_gram(checkpoints: Sequence[Checkpoint]) -> torch.Tensor:
    """Γ = ΘΘᵀ (T × T, float64) of the checkpoints' flattened parameters, one tensor name at a time
    (memory: T × the largest tensor). All checkpoints must hold the same tensor names and shapes."""
    cks = list(checkpoints)
    if not cks:
        raise ValueError("checkpoint_gram: no checkpoints given")
    readers = [_keys_and_reader(ck) for ck in cks]
    keys = readers[0][0]
    for t, (k, _) in enumerate(readers):
        if k != keys:
            raise ValueError(
                f"checkpoint {t} holds different tensors than checkpoint 0 ({sorted(set(k) ^ set(keys))[:3]}...)"
            )
    T = len(cks)
    G = torch.zeros(T, T, dtype=torch.float64)
    for key in keys:
        rows = [r(key).reshape(-1).to(torch.float64) for _, r in readers]
        if len({x.numel() for x in rows}) != 1:
            raise ValueError(f"tensor {key!r} has different sizes across checkpoints")
        X = torch.stack(rows)
        G += X @ X.T
    return G


def _param_map(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    """checkpoint key -> model parameter, for the model's own names or peft's saved names."""
    params = dict(model.named_parameters())
    if all(k in params for k in sd):
        return {k: params[k] for k in sd}
    # peft's saved layout drops the adapter name: "...lora_A.weight" for "...lora_A.default.weight",
    # "...classifier.dense.weight" for "...classifier.modules_to_save.default.dense.weight"
    adapters = set()
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, Mapping):
        adapters |= set(cfg)
    adapters |= {"default"}
    by_saved: dict[str, str] = {}
    for name in params:
        short = name
        for a in adapters:
            short = short.replace(f".modules_to_save.{a}.", ".").replace(f".{a}.", ".")
        by_saved.setdefault(short, name)
    out, missing = {}, []
    for k in sd:
        cand = [k, k.replace("base_model.model.", "", 1), f"base_model.model.{k}"]
        hit = next((by_saved[c] for c in cand if c in by_saved), None) or next((c for c in cand if c in params), None)
        if hit is None:
            missing.append(k)
        else:
            out[k] = params[hit]
    if missing:
        raise ValueError(f"checkpoint tensors not found in the model: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return out


def loss_table(
    model: nn.Module,
    checkpoints: Sequence[Checkpoint],
    dataloader: Iterable[Mapping[str, Any]],
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Per-example losses of every example of ``dataloader`` under every checkpoint: (T, n) float64.

    Adapter weights are swapped into the model in place (no rebuild per checkpoint) and the
    original weights restored afterwards; forward passes only, in ``eval()`` mode.
    """
    from tqdm.auto import tqdm

    from ..gradients.losses import default_loss_fn

    cks = list(checkpoints)
    if not cks:
        raise ValueError("loss_table: no checkpoints given")
    loss_fn = loss_fn or default_loss_fn(model)
    batches = list(dataloader) if not isinstance(dataloader, Sequence) else dataloader
    if len(batches) == 0:
        raise ValueError("loss_table: the dataloader yielded no batches")
    device = next(model.parameters()).device
    was_training = model.training
    rows = []
    bar = tqdm(total=len(cks) * len(batches), desc="loss table", unit="batch", disable=not progress)
    try:
        model.eval()
        with contextlib.closing(swapped_checkpoints(model, cks)) as swaps, torch.no_grad():
            for _ in swaps:
                out = []
                for b in batches:
                    bb = {kk: (vv.to(device) if isinstance(vv, torch.Tensor) else vv) for kk, vv in b.items()}
                    losses = loss_fn(model, bb)
                    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                        raise ValueError("loss_fn must return per-example losses of shape (N,)")
                    out.append(losses.detach().to("cpu", torch.float64))
                    bar.update(1)
                rows.append(torch.cat(out))
    finally:
        model.train(was_training)
        bar.close()
    return torch.stack(rows)


def swapped_checkpoints(model: nn.Module, checkpoints: Sequence[Checkpoint]) -> Iterator[int]:
    """Swap each checkpoint's adapter weights into ``model`` in place, in order, yielding its index t
    while they are in; the original weights are restored when the iteration ends, fails or is closed
    (use ``contextlib.closing`` when breaking out early). Tensors are checked against checkpoint 0's
    names and the model's shapes, as :func:`loss_table` does.

    Raises:
        ValueError: no checkpoints, a checkpoint with other tensors or shapes than the model.
    """
    cks = list(checkpoints)
    if not cks:
        raise ValueError("swapped_checkpoints: no checkpoints given")
    first = load_checkpoint(cks[0])
    pmap = _param_map(model, first)
    saved = {k: p.detach().clone() for k, p in pmap.items()}
    try:
        for t, ck in enumerate(cks):
            sd = first if t == 0 else load_checkpoint(ck)
            if set(sd) != set(pmap):
                raise ValueError(f"checkpoint {t} holds different tensors than checkpoint 0")
            with torch.no_grad():
                for k, p in pmap.items():
                    v = sd[k]
                    if tuple(v.shape) != tuple(p.shape):
                        raise ValueError(
                            f"checkpoint {t}: {k!r} has shape {tuple(v.shape)}, the model {tuple(p.shape)}"
                        )
                    p.copy_(v.to(device=p.device, dtype=p.dtype))
            yield t
    finally:
        with torch.no_grad():
            for k, p in pmap.items():
                p.copy_(saved[k])
