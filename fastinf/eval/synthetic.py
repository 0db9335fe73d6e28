"""A small, real, end-to-end synthetic influence task that runs on a CPU in about a second.

The task (METHODS.md §9, mislabelled-data detection):

* data: a binary Gaussian mixture in ``dim`` dimensions, each class a mixture of ``clusters``
  unit-variance blobs whose centres lie at distance ``separation`` from the origin;
  ``flip`` of the training labels (exactly round(flip·n) of them) are flipped; test labels are clean;
* model: a frozen random two-layer tanh network ("the pretrained base") with a LoRA adapter on each
  layer, ``W x + B A x``. Only the adapters train, so the gradients have the LoRA block structure
  of METHODS.md §0: ``hidden.lora_A`` (r × dim), ``hidden.lora_B`` (hidden × r), ``out.lora_A``
  (r × hidden), ``out.lora_B`` (2 × r). B starts at zero, as in LoRA;
* training: ``steps`` of full-batch gradient descent on the mean cross-entropy (+ L2 weight decay on
  the adapters) over the noisy training labels;
* gradients: per-example gradients of the cross-entropy loss at the trained adapters, for the
  training examples (noisy labels) and the test examples, with ``torch.func.vmap(grad(...))`` —
  one vectorised call, no loop over examples.

Everything is drawn from one ``torch.Generator`` seeded with ``seed``: the same arguments give the
same gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, vmap

from ..gradients.gradient_set import GradientSet

__all__ = ["SyntheticTask", "mislabel_task"]


@dataclass
class SyntheticTask:
    """Gradients and labels of the synthetic mislabel task. Unpacks as ``train, test, is_flipped``."""

    train: GradientSet  # (n, D) per-example gradients of the training loss (noisy labels)
    test: GradientSet  # (m, D) per-example gradients of the test loss (clean labels)
    is_flipped: torch.Tensor  # (n,) bool: the training label was flipped
    train_labels: torch.Tensor  # (n,) the (noisy) labels the model was trained on
    true_train_labels: torch.Tensor  # (n,) the labels before flipping
    test_labels: torch.Tensor  # (m,)
    x_train: torch.Tensor  # (n, dim) inputs
    x_test: torch.Tensor  # (m, dim)
    params: dict[str, torch.Tensor]  # trained adapter weights, by block name (shapes as in the model)
    loss_fn: Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]
    # loss_fn(params, x (k, dim), y (k,)) -> (k,) per-example cross-entropy; ``train`` holds its gradients
    info: dict[str, Any] = field(default_factory=dict)  # model, training and accuracy summary

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.test, self.is_flipped))


def _check_positive(**kw: Any) -> None:
    for k, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{k} must be a positive number, got {v!r}")


def mislabel_task(
    n_train: int = 400,
    n_test: int = 100,
    *,
    flip: float = 0.2,
    seed: int = 0,
    dim: int = 16,
    hidden: int = 32,
    rank: int = 4,
    clusters: int = 2,
    separation: float = 3.5,
    steps: int = 300,
    lr: float = 0.3,
    weight_decay: float = 1e-2,
    dtype: torch.dtype = torch.float32,
) -> SyntheticTask:
    """Train the synthetic LoRA model on noisy labels and return per-example gradients.

    Returns a :class:`SyntheticTask`; ``train, test, is_flipped = mislabel_task(...)`` also works.
    Training and test gradients are ``GradientSet`` s with the four LoRA blocks, of total width
    D = rank · (dim + 2 · hidden + 2) (328 with the defaults).
    """
    for k, v in {"n_train": n_train, "n_test": n_test, "dim": dim, "hidden": hidden, "rank": rank}.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters must be a positive int, got {clusters!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    _check_positive(separation=separation, lr=lr)
    if not 0 < flip < 1:
        raise ValueError(f"flip must be in (0, 1), got {flip!r}")
    n_flip = round(flip * n_train)
    if not 1 <= n_flip < n_train:
        raise ValueError(
            f"flip={flip} of n_train={n_train} flips {n_flip} labels; need at least one flipped and one clean"
        )
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")

    gen = torch.Generator().manual_seed(int(seed))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    # --- data: 2·clusters blobs, blob c belongs to class c % 2
    n_blobs = 2 * clusters
    centres = randn(n_blobs, dim)
    centres = centres / centres.norm(dim=1, keepdim=True) * separation
    blob_class = torch.arange(n_blobs) % 2

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        blob = torch.randint(n_blobs, (n,), generator=gen)
        return centres[blob] + randn(n, dim), blob_class[blob]

    x_train, y_true = sample(n_train)
    x_test, y_test = sample(n_test)
    is_flipped = torch.zeros(n_train, dtype=torch.bool)
    is_flipped[torch.randperm(n_train, generator=gen)[:n_flip]] = True
    y_train = torch.where(is_flipped, 1 - y_true, y_true)

    # --- frozen base and LoRA adapters (B = 0 at the start, as in LoRA)
    W1, b1 = randn(hidden, dim) / math.sqrt(dim), randn(hidden) * 0.1
    W2 = randn(2, hidden) / math.sqrt(hidden) * 0.1
    params = {
        "hidden.lora_A": randn(rank, dim) / math.sqrt(dim),
        "hidden.lora_B": torch.zeros(hidden, rank, dtype=dtype),
        "out.lora_A": randn(rank, hidden) / math.sqrt(hidden),
        "out.lora_B": torch.zeros(2, rank, dtype=dtype),
    }

    def logits(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ W1.T + b1 + (x @ p["hidden.lora_A"].T) @ p["hidden.lora_B"].T)
        return h @ W2.T + (h @ p["out.lora_A"].T) @ p["out.lora_B"].T

    def losses(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits(p, x), y, reduction="none")

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return losses(p, x, y).mean()

    # --- full-batch gradient descent on the adapters
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    for _ in range(steps):
        g = torch.autograd.grad(loss(p, x_train, y_train), list(p.values()))
        with torch.no_grad():
            for v, gv in zip(p.values(), g, strict=True):
                v.sub_(lr * (gv + weight_decay * v))
    p = {k: v.detach() for k, v in p.items()}

    # --- per-example gradients of the loss at the trained adapters, vectorised over examples
    def example_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(p, x.unsqueeze(0), y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def kronecker_factors(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """K-FAC factors (METHODS.md §11) of each block, one token per example: A = Σ xxᵀ/n, S = Σ δδᵀ/n
        with x the block's input and δ the loss gradient at its output (the row is δ xᵀ)."""
        u1 = (x @ p["hidden.lora_A"].T).requires_grad_(True)
        z1 = (x @ W1.T + b1 + u1 @ p["hidden.lora_B"].T).requires_grad_(True)
        h = torch.tanh(z1)
        u2 = (h @ p["out.lora_A"].T).requires_grad_(True)
        z2 = (h @ W2.T + u2 @ p["out.lora_B"].T).requires_grad_(True)
        per = torch.nn.functional.cross_entropy(z2, y, reduction="none")
        d_u1, d_z1, d_u2, d_z2 = torch.autograd.grad(per.sum(), [u1, z1, u2, z2])
        pairs = {
            "hidden.lora_A": (x, d_u1),
            "hidden.lora_B": (u1.detach(), d_z1),
            "out.lora_A": (h.detach(), d_u2),
            "out.lora_B": (u2.detach(), d_z2),
        }
        n = x.shape[0]
        return {k: ((a.T @ a).double() / n, (d.T @ d).double() / n) for k, (a, d) in pairs.items()}

    train = GradientSet(per_example(p, x_train, y_train), factors=kronecker_factors(x_train, y_train))
    test = GradientSet(per_example(p, x_test, y_test))

    with torch.no_grad():
        pred_train = logits(p, x_train).argmax(1)
        pred_test = logits(p, x_test).argmax(1)
        final_loss = float(loss(p, x_train, y_train))
    info = {
        "model": f"frozen 2-layer tanh MLP {dim}-{hidden}-2 with rank-{rank} LoRA adapters on both layers",
        "n_train": n_train,
        "n_test": n_test,
        "n_flipped": n_flip,
        "D": train.dim,
        "blocks": train.dims,
        "steps": steps,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": int(seed),
        "final_train_loss": final_loss,
        "train_acc_noisy_labels": float((pred_train == y_train).float().mean()),
        "train_acc_true_labels": float((pred_train == y_true).float().mean()),
        "test_acc": float((pred_test == y_test).float().mean()),
    }
    return SyntheticTask(
        train=train,
        test=test,
        is_flipped=is_flipped,
        train_labels=y_train,
        true_train_labels=y_true,
        test_labels=y_test,
        x_train=x_train,
        x_test=x_test,
        params=p,
        loss_fn=losses,
        info=info,
    )
