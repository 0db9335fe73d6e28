"""Per-example gradients of LoRA adapters in ordinary training-sized batches.

Forward hooks on every tracked ``lora_A`` / ``lora_B`` module record the adapter input x (after
LoRA dropout) and the adapter path's intermediate A x; one ``torch.autograd.grad`` of the summed
per-example losses with respect to the ``lora_B`` outputs gives dy. The per-example gradients
follow from those by ``fastinf.ops.lora_per_sample_grads`` (scale 1, since the hook sits before the
LoRA scaling): never a loop over examples, and no parameter ``.grad`` is ever written. Only the
tracked adapter weights require grad during capture (their flags are restored afterwards).

The model is switched to ``eval()`` during capture (LoRA dropout and every other dropout off) and
its train/eval state restored afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import lora_per_sample_grads
from . import factors as kf
from .gradient_set import GradientSet
from .losses import default_loss_fn

log = logging.getLogger("fastinf")

__all__ = ["LoRAGradientCollector", "random_projection"]


def random_projection(name: str, d: int, k: int, seed: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The (d, k) Gaussian projection of block ``name``: entries N(0, 1/k), seeded by (seed, name).

    For any u, v: E[⟨uP, vP⟩] = ⟨u, v⟩, and with probability ≥ 1 − δ every pairwise inner product
    among N vectors is preserved to ± ε‖u‖‖v‖ when k ≳ 8 log(N/δ)/ε² (Johnson–Lindenstrauss).
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return (torch.randn(d, k, generator=g, dtype=torch.float32) / k**0.5).to(dtype=dtype, device=device)


@dataclass
class _Site:
    """One tracked adapter: a LoRA pair, or a plain Linear inside ``modules_to_save``."""

    kind: str  # "lora" | "linear"
    a: nn.Module | None  # lora_A (for "lora")
    b: nn.Module  # lora_B, or the Linear itself
    names: dict[str, str]  # role -> parameter name ("A", "B", "B_bias") or ("W", "bias")


def _is_lora_layer(m: nn.Module) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "lora_B") and isinstance(m.lora_A, nn.ModuleDict)


class LoRAGradientCollector:
    """Per-example gradients of a peft LoRA model's adapter weights.

    Args:
        model: a peft-wrapped transformers model (``get_peft_model``) or a model with injected LoRA
            layers (``inject_adapter_in_model``, diffusers ``add_adapter``). Supports LoRA on
            ``nn.Linear`` (including GPT-2 ``Conv1D`` targets with ``fan_in_fan_out=True``) and
            ``nn.Conv2d`` (groups = 1) base layers; DoRA and other variants are rejected.
        loss_fn: ``loss_fn(model, batch) -> Tensor (N,)`` per-example losses; defaults to
            :func:`fastinf.gradients.losses.default_loss_fn` (causal LM, sequence classification,
            UNet denoising with seeded noise).
        modules: only LoRA layers whose module name contains one of these substrings (default: all).
        include_modules_to_save: also capture the trainable ``nn.Linear`` copies in peft's
            ``modules_to_save`` (e.g. a classification head): weight and bias blocks.
        dtype: dtype of the returned gradients (default float32).
        projection: project every block to this many dimensions with a seeded Gaussian random
            matrix (see :func:`random_projection`); ``None`` keeps full gradients.
        projection_seed: seed of the projections.

    Blocks are named after ``model.named_parameters()``; each row is that parameter's gradient for
    one example, flattened row-major.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        modules: Sequence[str] | None = None,
        include_modules_to_save: bool = False,
        dtype: torch.dtype | None = None,
        projection: int | None = None,
        projection_seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if projection is not None and (not isinstance(projection, int) or projection < 1):
            raise ValueError(f"projection must be a positive int or None, got {projection!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be floating, got {dtype}")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else default_loss_fn(model)
        self.modules = list(modules) if modules is not None else None
        self.dtype = dtype or torch.float32
        self.projection = projection
        self.projection_seed = projection_seed
        self.sites = self._find_sites(include_modules_to_save)
        self._proj_cache: dict[str, torch.Tensor] = {}
        self._factors = False  # set by collect(factors=True): the fingerprint and the store fill read it

    # ------------------------------------------------------------------------------ discovery
    def _find_sites(self, include_modules_to_save: bool) -> list[_Site]:
        pname = {id(p): n for n, p in self.model.named_parameters()}
        sites: list[_Site] = []
        for mname, m in self.model.named_modules():
            if self.modules is not None and not any(s in mname for s in self.modules):
                continue
            if _is_lora_layer(m):
                for adapter in getattr(m, "active_adapters", ["default"]):
                    if adapter not in m.lora_A:
                        continue
                    if adapter in getattr(m, "lora_variant", {}):
                        raise ValueError(
                            f"{mname}: LoRA variant {type(m.lora_variant[adapter]).__name__} (e.g. DoRA) is not "
                            "supported by the per-example capture; use vanilla LoRA"
                        )
                    a, b = m.lora_A[adapter], m.lora_B[adapter]
                    if not (isinstance(a, (nn.Linear, nn.Conv2d)) and type(a) is type(b)):
                        raise ValueError(
                            f"{mname}: unsupported LoRA module types {type(a).__name__}/{type(b).__name__}"
                        )
                    if isinstance(a, nn.Conv2d) and (a.groups != 1 or b.groups != 1):
                        raise ValueError(f"{mname}: grouped convolution LoRA is not supported")
                    if a.bias is not None:
                        raise ValueError(f"{mname}: lora_A with a bias is not supported")
                    names = {"A": pname[id(a.weight)], "B": pname[id(b.weight)]}
                    if b.bias is not None:
                        names["B_bias"] = pname[id(b.bias)]
                    sites.append(_Site("lora", a, b, names))
            elif (
                include_modules_to_save
                and hasattr(m, "modules_to_save")
                and isinstance(m.modules_to_save, nn.ModuleDict)
            ):
                for adapter, sub in m.modules_to_save.items():
                    if adapter not in getattr(m, "active_adapters", [adapter]):
                        continue
                    for sname, lin in sub.named_modules():
                        if isinstance(lin, nn.Linear):
                            names = {"W": pname[id(lin.weight)]}
                            if lin.bias is not None:
                                names["bias"] = pname[id(lin.bias)]
                            sites.append(_Site("linear", None, lin, names))
                        elif sname and any(True for _ in lin.parameters(recurse=False)):
                            raise ValueError(
                                f"{mname}.modules_to_save.{adapter}.{sname}: only nn.Linear modules can be captured "
                                f"per example, got {type(lin).__name__}"
                            )
        if not sites:
            raise ValueError(
                "the model has no LoRA adapters to capture"
                + (f" matching modules={self.modules}" if self.modules else "")
                + " (wrap it with peft.get_peft_model / inject_adapter_in_model first)"
            )
        return sites

    @property
    def block_names(self) -> list[str]:
        order = {n: i for i, (n, _) in enumerate(self.model.named_parameters())}
        names = [n for s in self.sites for n in s.names.values()]
        return sorted(names, key=lambda n: order[n])

    @property
    def block_dims(self) -> dict[str, int]:
        params = dict(self.model.named_parameters())
        return {n: (self.projection or params[n].numel()) for n in self.block_names}

    # ------------------------------------------------------------------------------ one batch
    def batch_gradients(self, batch: Mapping[str, Any], *, factors: bool = False) -> Any:
        """Per-example gradients of one batch: block name -> (N, d) in ``self.dtype``.

        ``factors=True`` returns ``(gradients, sums)`` with ``sums`` the batch's Kronecker-factor sums per
        block (``{"xx", "dd", "tokens"}``, float64 CPU; see :mod:`fastinf.gradients.factors`), from the
        same hooks (no extra forward or backward), over the tokens the batch's ``attention_mask`` keeps.

        Raises:
            ValueError: ``factors=True`` with a projection (the factors are of the full blocks).
        """
        if factors and self.projection is not None:
            raise ValueError("Kronecker factors need full gradients: use projection=None with factors=True")
        model = self.model
        device = next(model.parameters()).device
        if isinstance(batch, Mapping):
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        records: dict[int, list[dict[str, torch.Tensor]]] = {i: [] for i in range(len(self.sites))}
        handles = []
        tracked = [p for s in self.sites for p in ([s.a.weight] if s.a is not None else []) + list(s.b.parameters())]
        flags = {p: p.requires_grad for p in model.parameters()}
        was_training = {m: m.training for m in model.modules()}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in tracked:
                p.requires_grad_(True)
            for i, site in enumerate(self.sites):
                if site.kind == "lora":
                    handles.append(site.a.register_forward_hook(self._hook_a(records[i])))
                handles.append(site.b.register_forward_hook(self._hook_b(records[i], site.kind == "linear")))
            model.eval()
            with torch.enable_grad():
                losses = self.loss_fn(model, batch)
                if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                    raise ValueError(
                        f"loss_fn must return per-example losses of shape (N,), got "
                        f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}"
                    )
                if not bool(torch.isfinite(losses).all()):
                    bad = int(torch.nonzero(~torch.isfinite(losses))[0, 0])
                    raise ValueError(f"loss_fn returned a non-finite loss for example {bad} of the batch")
                outs = [r["out"] for i in records for r in records[i]]
                if not outs:
                    raise RuntimeError("no tracked LoRA layer was called in the forward pass")
                grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for p, f in flags.items():
                p.requires_grad_(f)
            for m, t in was_training.items():
                m.train(t)
        it = iter(grads)
        for i in records:
            for r in records[i]:
                g = next(it)
                r["dy"] = torch.zeros_like(r["out"]) if g is None else g
        N = losses.shape[0]
        out: dict[str, torch.Tensor] = {}
        sums: dict[str, dict[str, torch.Tensor]] | None = {} if factors else None
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) and factors else None
        self._xx_cache: dict = {}
        try:
            for i, site in enumerate(self.sites):
                out.update(self._site_grads(site, records[i], N, sums, mask))
        finally:
            self._xx_cache = {}
        grads = {n: out[n] for n in self.block_names}
        if sums is None:
            return grads
        return grads, self._complete_sums(sums)

    def _complete_sums(self, sums: dict) -> dict:
        """Zero sums for blocks never called in the batch, in block order."""
        params = dict(self.model.named_parameters())
        for s in self.sites:
            for role, name in s.names.items():
                if name not in sums:
                    p = params[name]
                    d_out = p.shape[0]
                    d_in = 1 if role in ("B_bias", "bias") else p.numel() // d_out
                    z = torch.zeros
                    sums[name] = {
                        "xx": z(d_in, d_in, dtype=torch.float64),
                        "dd": z(d_out, d_out, dtype=torch.float64),
                        "tokens": z(1, 1, dtype=torch.float64),
                    }
        return {n: sums[n] for n in self.block_names}

    @staticmethod
    def _hook_a(rec: list):
        def hook(mod, inputs, output):
            rec.append({"x": inputs[0].detach(), "u": output.detach()})

        return hook

    @staticmethod
    def _hook_b(rec: list, standalone: bool):
        def hook(mod, inputs, output):
            if standalone:
                rec.append({"x": inputs[0].detach(), "out": output})
            else:
                # pair with the latest lora_A call of this site (lora_B(lora_A(x)) is called right after)
                rec[-1]["out"] = output

        return hook

    @staticmethod
    def _rows(t: torch.Tensor, N: int, what: str) -> torch.Tensor:
        """(R, ..., d) -> (N, S, d) with the R = N·K rows of example i contiguous."""
        R = t.shape[0]
        if R % N:
            raise ValueError(f"a captured {what} has {R} rows for {N} examples; rows must be a multiple of N")
        return t.reshape(N, -1, t.shape[-1])

    def _site_grads(
        self, site: _Site, recs: list[dict], N: int, sums: dict | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        acc: dict[str, torch.Tensor] = {}

        def add(role: str, g: torch.Tensor) -> None:
            g = g.reshape(N, -1)
            acc[role] = g if role not in acc else acc[role] + g

        for r in recs:
            if "out" not in r:  # lora_A called without lora_B (should not happen with vanilla LoRA)
                continue
            dy = r["dy"]
            if site.kind == "linear":
                x = self._rows(r["x"], N, "input")
                d = self._rows(dy, N, "output gradient")
                dt = torch.promote_types(d.dtype, torch.float32)
                add("W", torch.bmm(d.transpose(1, 2).to(dt), x.to(dt)))
                if "bias" in site.names:
                    add("bias", d.to(dt).sum(1))
                if sums is not None:
                    xr, dr = kf.token_rows(x, mask), kf.token_rows(d, mask)
                    part = kf.block_sums(xr, dr, xr.shape[0])
                    kf.accumulate(sums, site.names["W"], part)
                    if "bias" in site.names:
                        kf.accumulate(sums, site.names["bias"], kf.block_sums(None, dr, xr.shape[0], dd=part["dd"]))
                continue
            a, b = site.a, site.b
            u = None  # lora_A's output A·x, recorded by _hook_a: the kernel reuses it instead of recomputing it
            if isinstance(a, nn.Conv2d):
                x4 = r["x"]
                xu = F.unfold(x4, a.kernel_size, dilation=a.dilation, padding=a.padding, stride=a.stride)
                x = xu.transpose(1, 2).reshape(N, -1, xu.shape[1])  # (N, K·L, C·kh·kw)
                d = dy.flatten(2).transpose(1, 2).reshape(N, -1, dy.shape[1])  # (N, K·L, d_out)
                A = a.weight.reshape(a.weight.shape[0], -1)
                B = b.weight.reshape(b.weight.shape[0], -1)
            else:
                x = self._rows(r["x"], N, "LoRA input")
                d = self._rows(dy, N, "LoRA output gradient")
                A, B = a.weight, b.weight
                if "u" in r:  # absent for a standalone lora_B
                    u = self._rows(r["u"], N, "LoRA intermediate")
            gA, gB = lora_per_sample_grads(x, d, A.detach(), B.detach(), 1.0, u=u)
            add("A", gA)
            add("B", gB)
            if "B_bias" in site.names:
                add("B_bias", d.to(gB.dtype).sum(1))
            if sums is not None:  # A block: input x, δ = Bᵀ dy; B block: input u = A x, δ = dy (METHODS.md §11)
                xr, dr = kf.token_rows(x, mask), kf.token_rows(d, mask)
                dt = torch.promote_types(xr.dtype, torch.float32)
                vr = dr.to(dt) @ B.detach().to(dt)
                # u = A x: the hooked one where there is one (not recomputed), its masked token rows like x's
                ur = kf.token_rows(u, mask).to(dt) if u is not None else xr.to(dt) @ A.detach().to(dt).T
                # LoRA layers fed the same input (q and v of one attention) share Σxxᵀ: computed once per batch
                key = (r["x"].data_ptr(), tuple(r["x"].shape), r["x"].dtype) if not isinstance(a, nn.Conv2d) else None
                xx = self._xx_cache.get(key) if key is not None else None
                if xx is None:
                    xx = kf.cov(xr)
                    if key is not None:
                        self._xx_cache[key] = xx
                kf.accumulate(sums, site.names["A"], kf.block_sums(xr, vr, xr.shape[0], xx=xx))
                part = kf.block_sums(ur, dr, xr.shape[0])
                kf.accumulate(sums, site.names["B"], part)
                if "B_bias" in site.names:
                    kf.accumulate(sums, site.names["B_bias"], kf.block_sums(None, dr, xr.shape[0], dd=part["dd"]))
        out = {}
        params = dict(self.model.named_parameters())
        for role, name in site.names.items():
            g = acc.get(role)
            if g is None:
                g = torch.zeros(N, params[name].numel(), device=params[name].device)
            out[name] = self._finish(name, g)
        return out

    def _finish(self, name: str, g: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            P = self._proj_cache.get(name)
            if P is None:
                P = random_projection(name, g.shape[1], self.projection, self.projection_seed, device=g.device)
                self._proj_cache[name] = P
            g = g.float() @ P
        return g.to(self.dtype)

    # ------------------------------------------------------------------------------ whole loader
    def collect(
        self,
        dataloader: Iterable[Mapping[str, Any]],
        *,
        store: Any = None,
        progress: bool = True,
        overwrite: bool = False,
        store_dtype: torch.dtype | None = None,
        shard_bytes: int | None = None,
        factors: bool = False,
    ) -> GradientSet:
        """Per-example gradients of every example of ``dataloader`` (in order): a GradientSet.

        ``factors=True`` also accumulates every block's Kronecker factors (A, S) of METHODS.md §11 in the
        same hooks (no extra forward or backward; padding excluded by the batches' ``attention_mask``):
        the returned GradientSet's :attr:`~GradientSet.factors`, or stored in every shard of ``store``
        (the store's fingerprint then records ``factors``), for :class:`fastinf.KFAC` / ``EKFAC``.

        With ``store`` (a directory path or a :class:`~fastinf.gradients.store.GradientStore`), each
        batch is appended to the on-disk store (atomic shards, each recording a digest of its batch);
        an interrupted capture resumes from the last complete shard (the dataloader must yield the
        same batches in the same order), a complete store of the same capture and data is reused
        without recomputing anything, damaged shards are recomputed and rewritten (with a warning),
        and the store is returned, opened lazily. ``overwrite=True`` replaces whatever the directory
        holds. Batches are buffered into shards of ``shard_bytes`` (default 256 MiB; a crash loses at
        most the unwritten buffer) stored in ``store_dtype`` (``torch.bfloat16``, ``torch.float16`` or
        ``torch.float32``; default: ``dtype``, the gradients' own; part of the store's fingerprint).

        Inside an initialised ``torch.distributed`` process group call it on every rank with the same
        dataloader and ``store``: each rank captures its contiguous share of the batches into the
        same store, rank 0 merges the records, and every rank returns the finished store, equal to a
        one-process capture (see :meth:`GradientStore.fill`). Without ``store`` every rank computes
        every batch.

        Raises:
            StoreError: (with ``store``, unless ``overwrite``) the directory holds a capture with other
                arguments, a model with other adapter weights, or other data (other content, fewer or
                more rows: see :meth:`GradientStore.fill`); messages end in "pass overwrite=True".
            ValueError: the dataloader yields no batches; a loss that is not (N,) or not finite;
                ``shard_bytes`` < 1, or ``store_dtype``/``shard_bytes`` without ``store``; ``factors=True``
                with a projection.
            TypeError: ``store_dtype`` is not one of the storage dtypes.
        """
        if factors and self.projection is not None:
            raise ValueError("Kronecker factors need full gradients: use projection=None with factors=True")
        self._factors = bool(factors)
        try:
            return self._collect(dataloader, store, progress, overwrite, store_dtype, shard_bytes)
        finally:
            self._factors = False

    def _collect(self, dataloader, store, progress, overwrite, store_dtype, shard_bytes) -> GradientSet:
        if store is not None:
            from .store import GradientStore

            if isinstance(store, GradientStore):
                st = store
                if store_dtype is not None and str(store_dtype).replace("torch.", "") != st.manifest["dtype"]:
                    raise ValueError(f"store_dtype={store_dtype} but the given store holds {st.manifest['dtype']}")
                if shard_bytes is not None:
                    st.shard_bytes = int(shard_bytes)
            else:
                st = GradientStore._create_for_capture(
                    store, self, overwrite=overwrite, store_dtype=store_dtype, shard_bytes=shard_bytes
                )
            return st.fill(self, dataloader, progress=progress)
        if store_dtype is not None or shard_bytes is not None:
            raise ValueError("store_dtype and shard_bytes apply to a capture into a store (pass store=path)")
        from tqdm.auto import tqdm

        parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.block_names}
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        sums = None
        for batch in tqdm(dataloader, total=total, desc="per-example gradients", unit="batch", disable=not progress):
            if self._factors:
                grads, bs = self.batch_gradients(batch, factors=True)
                sums = kf.add_sums(sums, bs)
            else:
                grads = self.batch_gradients(batch)
            for n, g in grads.items():
                parts[n].append(g.cpu())
        if not parts[self.block_names[0]]:
            raise ValueError("the dataloader yielded no batches: nothing to capture")
        blocks = {n: torch.cat(v) for n, v in parts.items()}
        n = next(iter(blocks.values())).shape[0]
        return GradientSet(blocks, factors=kf.normalise(sums, n) if sums is not None else None)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies a capture: model class, adapter config, adapter weights (SHA-256 of every
        LoRA / ``modules_to_save`` weight, and the sum of |weights| of the captured blocks), loss
        function, block names and dims, dtype, projection. A store records it in its manifest;
        :func:`~fastinf.gradients.store.check_same_model` compares two of them."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        cfg = getattr(self.model, "peft_config", None)
        adapter = {}
        if isinstance(cfg, Mapping):
            for k, v in cfg.items():
                d = v.to_dict() if hasattr(v, "to_dict") else {}
                adapter[k] = {kk: (sorted(vv) if isinstance(vv, set) else vv) for kk, vv in d.items()}
        params = dict(self.model.named_parameters())
        wsum = 0.0
        for n in self.block_names:
            wsum += float(params[n].detach().double().abs().sum())
        # every adapter weight (also of LoRA layers not captured: they change the gradients too) and
        # every captured block, by name, dtype, shape and bytes
        h = hashlib.sha256()
        tracked = set(self.block_names)
        for n, p in params.items():
            if n in tracked or "lora_" in n or "modules_to_save" in n:
                t = p.detach().to("cpu").contiguous().reshape(-1)
                h.update(f"{n}|{str(t.dtype).replace('torch.', '')}|{tuple(p.shape)}:".encode())
                h.update(memoryview(t.view(torch.uint8).numpy()))
        return {
            "model_class": type(base).__name__,
            "name_or_path": str(getattr(getattr(base, "config", None), "_name_or_path", "")),
            "adapter_config": adapter,
            "adapter_weight_abs_sum": wsum,
            "adapter_sha256": h.hexdigest(),
            "loss_fn": getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__name__),
            "blocks": self.block_dims,
            "dtype": str(self.dtype).replace("torch.", ""),
            "projection": self.projection,
            "projection_seed": self.projection_seed if self.projection is not None else None,
            **({"factors": True} if getattr(self, "_factors", False) else {}),
        }
