"""Per-example loss functions ``loss_fn(model, batch) -> Tensor (N,)`` used by gradient capture.

Every function returns one loss per example, so that the gradient of ``losses.sum()`` split by
example is each example's own gradient. Re-exported by ``fastinf.integrations.transformers`` and
``fastinf.integrations.diffusers``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "DenoisingLoss",
    "causal_lm_loss",
    "default_loss_fn",
    "model_kind",
    "sequence_classification_loss",
]

LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]


def _base(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def model_kind(model: torch.nn.Module) -> str:
    """'causal_lm', 'sequence_classification', 'unet' or 'unknown', from the (base) model's class."""
    name = type(_base(model)).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    if name.startswith("UNet2D"):
        return "unet"
    return "unknown"


def _require(batch: Mapping[str, Any], key: str, what: str) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{what}: batches must be dicts of tensors, got {type(batch).__name__}")
    if key not in batch:
        raise ValueError(f"{what}: the batch has no {key!r} (keys: {sorted(batch)}); per-example losses need it")
    return batch[key]


def causal_lm_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's own label tokens (labels == −100 ignored).

    Needs ``input_ids`` and ``labels`` (and honours ``attention_mask``). Position ids are computed
    from the attention mask, so left and right padding give the same per-example loss.
    """
    input_ids = _require(batch, "input_ids", "causal_lm_loss")
    labels = _require(batch, "labels", "causal_lm_loss")
    mask = batch.get("attention_mask")
    kwargs = {"input_ids": input_ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(**kwargs).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    count = (shift_labels != -100).sum(1)
    if bool((count == 0).any()):
        bad = int(torch.nonzero(count == 0)[0, 0])
        raise ValueError(f"causal_lm_loss: example {bad} of the batch has no label tokens (all labels are -100)")
    return tok.sum(1) / count


def sequence_classification_loss(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Cross-entropy per example (mean squared error when the model has one output)."""
    labels = _require(batch, "labels", "sequence_classification_loss")
    inputs = {
        k: v for k, v in batch.items() if k != "labels" and k in ("input_ids", "attention_mask", "token_type_ids")
    }
    logits = model(**inputs).logits
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1).float() - labels.float()).pow(2)
    return F.cross_entropy(logits.float(), labels, reduction="none")


@dataclass
class DenoisingLoss:
    """Per-example denoising loss of a diffusers UNet with fixed, seeded timesteps and noise.

    For the example with global id ``batch["index"][i]``, ``timesteps_per_example`` timesteps and
    their noise are drawn from a generator seeded by (``seed``, ``salt``, id) — or, with
    ``timesteps=(t_1, ..., t_K)``, every example uses that fixed grid (so that train and test
    gradients are compared at the same noise levels, as the DataInf paper does) — so scores are
    deterministic and independent of batching. Give train and test sets different ``salt`` values
    (e.g. "train" / "test") so that they never share noise by index. The loss is the mean over the
    timesteps of the mean squared error of the predicted noise (``prediction_type="epsilon"``) or of
    the velocity (``"v_prediction"``).

    Batch keys: ``pixel_values`` (N, C, H, W) (or ``sample``), ``index`` (N,) and, when the UNet is
    conditional, ``class_labels`` and/or ``encoder_hidden_states``.
    """

    scheduler: Any = None
    timesteps_per_example: int = 1
    seed: int = 0
    salt: str = "train"
    timesteps: tuple[int, ...] | None = None  # a fixed grid shared by every example (overrides the random draw)
    _steps: int = field(default=1000, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.scheduler is None:
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self._steps = int(self.scheduler.config.num_train_timesteps)
        if self.timesteps is not None:
            self.timesteps = tuple(int(t) for t in self.timesteps)
            if not self.timesteps or any(not 0 <= t < self._steps for t in self.timesteps):
                raise ValueError(f"timesteps must be a non-empty sequence in [0, {self._steps}), got {self.timesteps}")
            self.timesteps_per_example = len(self.timesteps)
        if self.timesteps_per_example < 1:
            raise ValueError(f"timesteps_per_example must be >= 1, got {self.timesteps_per_example}")

    def _draw(self, index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        key = zlib.crc32(f"{self.seed}/{self.salt}/{index}".encode())
        g = torch.Generator().manual_seed(key)
        t = torch.randint(0, self._steps, (self.timesteps_per_example,), generator=g)
        if self.timesteps is not None:
            t = torch.tensor(self.timesteps, dtype=torch.long)
        noise = torch.randn((self.timesteps_per_example, *shape), generator=g)
        return t, noise

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        x0 = batch.get("pixel_values", batch.get("sample")) if isinstance(batch, Mapping) else None
        if x0 is None:
            raise ValueError("DenoisingLoss: the batch needs 'pixel_values' (or 'sample') images (N, C, H, W)")
        index = _require(batch, "index", "DenoisingLoss (add each example's global id as 'index')")
        N, K = x0.shape[0], self.timesteps_per_example
        draws = [self._draw(int(i), tuple(x0.shape[1:])) for i in index.tolist()]
        t = torch.stack([d[0] for d in draws]).reshape(N * K).to(x0.device)
        noise = torch.stack([d[1] for d in draws]).reshape(N * K, *x0.shape[1:]).to(x0)
        x0k = x0.repeat_interleave(K, dim=0)  # rows of example i are contiguous: i*K .. i*K + K − 1
        noisy = self.scheduler.add_noise(x0k, noise, t)
        kwargs = {}
        for key in ("class_labels", "encoder_hidden_states"):
            if batch.get(key) is not None:
                kwargs[key] = batch[key].repeat_interleave(K, dim=0)
        pred = model(noisy, t, **kwargs).sample
        if getattr(self.scheduler.config, "prediction_type", "epsilon") == "v_prediction":
            target = self.scheduler.get_velocity(x0k, noise, t)
        else:
            target = noise
        per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return per_row.reshape(N, K).mean(1)


def default_loss_fn(model: torch.nn.Module) -> LossFn:
    """The default per-example loss for a model: causal LM, sequence classification or UNet denoising."""
    kind = model_kind(model)
    if kind == "causal_lm":
        return causal_lm_loss
    if kind == "sequence_classification":
        return sequence_classification_loss
    if kind == "unet":
        return DenoisingLoss()
    raise ValueError(
        f"no default per-example loss for {type(_base(model)).__name__}; pass loss_fn(model, batch) -> Tensor (N,)"
    )
