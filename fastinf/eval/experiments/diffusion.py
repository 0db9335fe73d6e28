"""Diffusion class detection: a class-conditional diffusers ``UNet2DModel`` trained on image arrays,
LoRA-fine-tuned, then influence of training images on test images; classes = image labels."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...integrations.diffusers import DenoisingLoss
from ...utils import timed
from ..checkpoint_influence import collect_with_losses, needs_factors
from ..runner import split_methods
from .class_detection import (
    class_damping_sweep,
    extra_class_rows,
    finish_report,
    score_class_detection,
    z0inf_record,
)
from .common import ExperimentResult, prepare_report_dir, settings_dict

__all__ = ["DiffusionSettings", "diffusion_class_detection_experiment"]


@dataclass
class DiffusionSettings:
    """Sizes and hyper-parameters of a diffusion class-detection run (what the report states)."""

    base_epochs: int = 30
    lora_epochs: int = 10
    batch_size: int = 64
    base_lr: float = 2e-3
    lora_lr: float = 2e-3
    lora_r: int = 4
    timesteps: tuple[int, ...] = (100, 350, 600, 850)  # the fixed grid every train/test image is scored at
    checkpoints: int = 6
    damping: float | str = "auto"
    lissa_depth: int = 100
    rrinf_seeds: tuple[int, ...] = (0, 1, 2)
    damping_multipliers: tuple[float, ...] = (1, 10, 100, 1e3, 1e4, 1e5, 1e6)
    sweeps: bool = True
    baselines: bool = True  # label-free λ rows, and the test-free baselines listed as n/a
    checkpoint_methods: bool = True  # TracIn-CP (η_t = lora_lr, constant) and checkpoint ensembles
    ensemble_methods: tuple[str, ...] = ("datainf", "exact")


def _unet(num_classes: int, channels: int, size: int):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=num_classes,
    )


def _fit(model, params, x, y, epochs, lr, batch_size, seed, loss, on_epoch: Callable[[int], None] | None = None):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            # training noise: a fresh salt per epoch (the capture loss uses its own fixed salts)
            batch = {"pixel_values": x[idx], "class_labels": y[idx], "index": idx + ep * n}
            opt.zero_grad(set_to_none=True)
            loss(model, batch).mean().backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(ep)
    model.eval()


def diffusion_class_detection_experiment(
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int],
    *,
    n_base: int = 1000,
    n_train: int = 200,
    n_test: int = 40,
    methods: Sequence[str] | None = None,
    settings: DiffusionSettings | None = None,
    seed: int = 0,
    report_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """Train a small class-conditional UNet2DModel on ``n_base`` images, LoRA-fine-tune it on
    ``n_train`` other images, and measure class detection on ``n_test`` held-out images: for each
    test image, the training images of its label should get the most negative influence.

    Gradients use ``fastinf.integrations.diffusers.DenoisingLoss`` on the fixed timestep grid
    ``settings.timesteps``, shared by every train and test image, with noise seeded per image (test
    ids are offset so that no test image shares a train image's noise). Methods: every gradient method
    and Z0-Inf by default (the BIF is not offered here). Returns the class-detection records of
    :func:`fastinf.eval.class_detection_experiment`.

    Raises:
        ValueError: bad image/label shapes, too few images, unknown or unsupported methods.
    """
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    s = settings or DiffusionSettings()
    default = [*split_methods(None)[0], "z0inf"]
    grad_methods, trace_methods = split_methods(methods if methods is not None else default)
    if "bif" in trace_methods:
        raise ValueError("the diffusion experiment does not run the BIF (no SGLD sampler for diffusers models yet)")
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.dim() != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"images must be (N, C, H, W) with one label each; got {tuple(x.shape)} and {tuple(y.shape)}")
    if n_base + n_train + n_test > x.shape[0]:
        raise ValueError(f"n_base + n_train + n_test = {n_base + n_train + n_test} exceeds {x.shape[0]} images")
    out_dir = prepare_report_dir(report_dir)
    say = log or (lambda _m: None)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    b_idx, tr_idx, te_idx = perm[:n_base], perm[n_base : n_base + n_train], perm[n_base + n_train :][:n_test]
    ncls = int(y.max()) + 1
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    unet = _unet(ncls, x.shape[1], x.shape[-1])
    train_loss = DenoisingLoss(timesteps_per_example=1, seed=seed, salt="fit")
    say(f"base UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, {s.base_epochs} epochs on {n_base}")
    t0 = time.perf_counter()
    _fit(unet, list(unet.parameters()), x[b_idx], y[b_idx], s.base_epochs, s.base_lr, s.batch_size, seed, train_loss)
    base_sec = time.perf_counter() - t0
    for p in unet.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=s.lora_r, lora_alpha=s.lora_r, target_modules=["to_q", "to_k", "to_v", "conv1", "conv2"])
    unet = inject_adapter_in_model(cfg, unet)
    lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    checkpoints: list[dict] = []
    every = max(1, s.lora_epochs // max(1, s.checkpoints - 1))

    def snap(ep: int) -> None:
        if ep % every == every - 1 or ep == s.lora_epochs - 1:
            checkpoints.append({k: v.clone() for k, v in get_peft_model_state_dict(unet).items()})

    checkpoints.append({k: v.clone() for k, v in get_peft_model_state_dict(unet).items()})
    say(f"LoRA fine-tuning: {n_train} images, {s.lora_epochs} epochs, r={s.lora_r}")
    t0 = time.perf_counter()
    _fit(unet, lora_params, x[tr_idx], y[tr_idx], s.lora_epochs, s.lora_lr, s.batch_size, seed + 1, train_loss, snap)
    lora_sec = time.perf_counter() - t0

    def loader(idx, salt_ids):
        return [
            {"pixel_values": x[idx[i : i + 32]], "class_labels": y[idx[i : i + 32]], "index": salt_ids[i : i + 32]}
            for i in range(0, len(idx), 32)
        ]

    tr_loader = loader(tr_idx, torch.arange(len(tr_idx)))
    te_loader = loader(te_idx, torch.arange(len(te_idx)) + 10**6)  # test ids never coincide with train ids
    cap_loss = DenoisingLoss(timesteps=s.timesteps, seed=seed, salt="influence")
    say(f"capturing per-example gradients at timesteps {list(s.timesteps)} (noise seeded per image)")
    ((gtr, gte), _), grad_sec, _ = timed(
        lambda: collect_with_losses(
            unet,
            [tr_loader, te_loader],
            loss_fn=cap_loss,
            factors=needs_factors(grad_methods),
            progress=progress,
        )
    )
    ytr, yte = y[tr_idx].numpy(), y[te_idx].numpy()
    out, exact = score_class_detection(gtr, gte, grad_methods, ytr, yte, s, progress)
    if s.checkpoint_methods:
        say(f"label-free λ, TracIn-CP and checkpoint ensembles: captures at {len(checkpoints)} checkpoints")
    extra, tables = extra_class_rows(
        unet,
        checkpoints,
        [s.lora_lr] * len(checkpoints),  # AdamW at a constant learning rate
        tr_loader,
        te_loader,
        gtr,
        gte,
        ytr,
        yte,
        exact,
        s,
        grad_methods,
        progress,
        loss_fn=cap_loss,
    )
    out.update(extra)
    if "z0inf" in trace_methods:
        say(f"Z0-Inf: losses at {len(checkpoints)} checkpoints")
        out["z0inf"] = z0inf_record(
            unet, checkpoints, tr_loader, te_loader, ytr, yte, exact, progress, cap_loss, tables=tables
        )
    out.sweeps = class_damping_sweep(gtr, gte, ytr, yte, s, grad_methods, progress)
    out.meta = {
        "task": "diffusion class detection",
        "dataset": "digits",
        "model": "UNet2DModel (class-conditional, 8×8)",
        "n_base": n_base,
        "n_train": n_train,
        "n_test": n_test,
        "classes": ncls,
        "grad_field": "denoising loss",
        "settings": settings_dict(s),
        "D": gtr.dim,
        "blocks": len(gtr.names),
        "base_seconds": base_sec,
        "lora_seconds": lora_sec,
        "grad_seconds": grad_sec,
        "checkpoints": len(checkpoints),
        "total_seconds": time.perf_counter() - t_start,
        "seed": seed,
    }
    return finish_report(out, out_dir)
