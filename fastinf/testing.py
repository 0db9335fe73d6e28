"""Tiny models and one tolerance rule, shared by ``tests/`` and ``bench/`` (not by the package itself).

Models are built from configs with random weights (nothing is downloaded; ``HF_HUB_OFFLINE=1`` holds):

* :func:`llama_config` / :func:`tiny_llama` / :func:`tiny_lora_llama`: Llama-style causal LMs in three
  sizes (:data:`LLAMA_SIZES`: ``tiny`` for tests, ``small`` and ``bench`` for benchmarks), GQA included;
* :func:`tiny_lora_roberta`: a RoBERTa sequence classifier with LoRA on query/value (the head is a
  ``modules_to_save`` block); :func:`tiny_bert`: a one-layer BERT classifier without adapters;
* :func:`tiny_unet2d`: a diffusers ``UNet2DModel`` (class-conditional) or ``UNet2DConditionModel``
  (cross-attention) on 8 × 8 images;
* :func:`lora_config`, :func:`add_lora`: a peft ``LoraConfig`` with random (non-zero) adapter weights,
  so that every adapter gradient is non-trivial;
* :func:`lm_batches`, :func:`random_lm_batches`, :func:`perturbed_adapter_states`: batches and
  checkpoints for them.

Tolerances for low-precision kernels (ARCHITECTURE.md): a result computed from float16 / bfloat16 /
float32 inputs is judged against the error that the PyTorch reference itself makes in that precision,
not a hand-picked tolerance: :func:`rel_err`, :func:`reference_tolerance`,
:func:`assert_within_reference_error`; on a GPU :func:`poison_cuda_cache` makes unwritten output
elements show up as NaN and :func:`require_backend` skips a test whose backend cannot run.

torch, transformers, peft, diffusers and pytest are imported inside the functions that need them, so
this module imports with the standard library alone. No module of the ``fastinf`` package imports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BERT_TINY",
    "LLAMA_SIZES",
    "ROBERTA_TINY",
    "add_lora",
    "assert_within_reference_error",
    "llama_config",
    "lm_batches",
    "lora_config",
    "perturbed_adapter_states",
    "poison_cuda_cache",
    "random_lm_batches",
    "reference_tolerance",
    "rel_err",
    "require_backend",
    "run_distributed",
    "tiny_bert",
    "tiny_llama",
    "tiny_lora_llama",
    "tiny_lora_roberta",
    "tiny_unet2d",
]

# ------------------------------------------------------------------------------------ model configs
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
#: Llama-style sizes (GQA: half as many key/value heads as query heads). ``tiny``: 22k parameters, the
#: tests' model. ``small``: 0.9M, ``bench_capture --quick``. ``bench``: 7M, the capture and loss-table
#: benchmarks.
LLAMA_SIZES: dict[str, dict[str, int]] = {
    name: dict(zip(_LLAMA_FIELDS, values, strict=True))
    for name, values in {
        "tiny": (97, 32, 48, 2, 4, 2, 64),
        "small": (2000, 128, 344, 2, 4, 2, 256),
        "bench": (8000, 256, 688, 4, 8, 4, 512),
    }.items()
}

#: The tests' RoBERTa classifier (pad token 1, as in RoBERTa's tokenizer; ids from 3 up are ordinary).
ROBERTA_TINY: dict[str, int] = dict(
    vocab_size=60,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=40,
    pad_token_id=1,
)


#: A one-layer BERT classifier (the experiment tests pair it with the bundled MiniLM tokenizer's vocabulary).
BERT_TINY: dict[str, int] = dict(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
)


def _place(model: Any, dtype: Any = None, device: Any = None) -> Any:
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model


def llama_config(size: str = "tiny", **overrides: Any) -> Any:
    """A ``transformers.LlamaConfig`` of one of :data:`LLAMA_SIZES`, with ``overrides`` applied."""
    import transformers

    if size not in LLAMA_SIZES:
        raise ValueError(f"size must be one of {sorted(LLAMA_SIZES)}, got {size!r}")
    return transformers.LlamaConfig(**{**LLAMA_SIZES[size], **overrides})


def tiny_llama(size: str = "tiny", *, seed: int = 0, dtype: Any = None, device: Any = None, **overrides: Any) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` (``torch.manual_seed(seed)`` first), moved to dtype/device."""
    import torch
    import transformers

    cfg = llama_config(size, **overrides)
    torch.manual_seed(seed)
    return _place(transformers.LlamaForCausalLM(cfg), dtype, device)


def lora_config(
    target_modules: Sequence[str],
    *,
    r: int = 4,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    task_type: str | None = None,
    **kw: Any,
) -> Any:
    """``peft.LoraConfig`` with random adapter weights (``init_lora_weights=False``: lora_B is not zero).

    ``lora_alpha=None`` keeps peft's default (8).
    """
    from peft import LoraConfig

    opts: dict[str, Any] = dict(r=r, target_modules=list(target_modules), init_lora_weights=False)
    opts["lora_dropout"] = lora_dropout
    if lora_alpha is not None:
        opts["lora_alpha"] = lora_alpha
    if task_type is not None:
        opts["task_type"] = task_type
    return LoraConfig(**opts, **kw)


def add_lora(model: Any, target_modules: Sequence[str], **lora: Any) -> Any:
    """``peft.get_peft_model(model, lora_config(target_modules, **lora))`` (adapter weights drawn from torch's
    global generator, so seed before the base model is built for a reproducible pair)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(target_modules, **lora))


def tiny_lora_llama(
    size: str = "tiny",
    *,
    seed: int = 0,
    dtype: Any = None,
    device: Any = None,
    r: int = 4,
    lora_alpha: int | None = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    lora_dropout: float = 0.0,
    **overrides: Any,
) -> Any:
    """:func:`tiny_llama` with LoRA (``task_type="CAUSAL_LM"``) on ``target_modules``; a peft model."""
    base = tiny_llama(size, seed=seed, dtype=dtype, device=device, **overrides)
    return add_lora(base, target_modules, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM")


def tiny_lora_roberta(
    *,
    seed: int = 0,
    num_labels: int = 2,
    dtype: Any = None,
    r: int = 2,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ("query", "value"),
    **overrides: Any,
) -> Any:
    """A ``RobertaForSequenceClassification`` of :data:`ROBERTA_TINY` with LoRA (``task_type="SEQ_CLS"``:
    the classifier head is trained in full, as a ``modules_to_save`` copy)."""
    import torch
    import transformers

    cfg = transformers.RobertaConfig(**{**ROBERTA_TINY, "num_labels": num_labels, **overrides})
    torch.manual_seed(seed)
    base = _place(transformers.RobertaForSequenceClassification(cfg), dtype)
    return add_lora(base, target_modules, r=r, lora_dropout=lora_dropout, task_type="SEQ_CLS")


def tiny_bert(*, seed: int = 0, num_labels: int = 2, dtype: Any = None, **overrides: Any) -> Any:
    """A randomly initialised ``BertForSequenceClassification`` of :data:`BERT_TINY` (no adapter; e.g.
    ``tiny_bert(vocab_size=tokenizer.vocab_size)``)."""
    import torch
    import transformers

    cfg = transformers.BertConfig(**{**BERT_TINY, "num_labels": num_labels, **overrides})
    torch.manual_seed(seed)
    return _place(transformers.BertForSequenceClassification(cfg), dtype)


def tiny_unet2d(*, seed: int = 0, dtype: Any = None, cross_attention_dim: int | None = None, **overrides: Any) -> Any:
    """A diffusers UNet on 8 × 8 images with two resolution levels (8 and 16 channels) and attention.

    Default: ``UNet2DModel``, 1 channel, class-conditional (``num_class_embeds=10``; pass ``class_labels``).
    ``cross_attention_dim=k``: ``UNet2DConditionModel`` with cross-attention blocks (2 channels; pass
    ``encoder_hidden_states`` of width k). No adapter: add one with peft's ``inject_adapter_in_model`` or the
    model's ``add_adapter``.
    """
    import diffusers
    import torch

    common: dict[str, Any] = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    if cross_attention_dim is None:
        cls = diffusers.UNet2DModel
        kw: dict[str, Any] = dict(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            num_class_embeds=10,
        )
    else:
        cls = diffusers.UNet2DConditionModel
        kw = dict(
            in_channels=2,
            out_channels=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=4,
        )
    torch.manual_seed(seed)
    return _place(cls(**{**common, **kw, **overrides}), dtype)


# ------------------------------------------------------------------------------------ data
def lm_batches(ids: Any, batch_size: int, *, labels: Any = None, mask: bool = True) -> list[dict[str, Any]]:
    """Split token ids (N, L) into causal-LM batches ``{input_ids, labels[, attention_mask]}`` of
    ``batch_size`` rows (the last one may be shorter); ``labels`` defaults to the ids themselves."""
    import torch

    labels = ids if labels is None else labels
    out = []
    for i in range(0, ids.shape[0], batch_size):
        b = {"input_ids": ids[i : i + batch_size], "labels": labels[i : i + batch_size]}
        if mask:
            b["attention_mask"] = torch.ones_like(b["input_ids"])
        out.append(b)
    return out


def random_lm_batches(
    vocab_size: int,
    *,
    n: int,
    seq: int,
    batch_size: int,
    seed: int = 0,
    low: int = 0,
    mask: bool = True,
    device: Any = None,
) -> list[dict[str, Any]]:
    """:func:`lm_batches` of ``n`` uniformly random sequences of ``seq`` tokens in ``[low, vocab_size)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (n, seq), generator=g)
    if device is not None:
        ids = ids.to(device)
    return lm_batches(ids, batch_size, mask=mask)


def perturbed_adapter_states(
    model: Any, count: int, *, scale: float, seed: int = 0, growing: bool = False
) -> list[dict[str, Any]]:
    """``count`` adapter state dicts near the model's: θ + s_t ξ_t with ξ_t standard normal (seeded) and
    s_t = ``scale`` (``growing``: ``scale`` × (t + 1), so later checkpoints drift further)."""
    import torch
    from peft import get_peft_model_state_dict

    base = get_peft_model_state_dict(model)
    g = torch.Generator().manual_seed(seed)
    return [
        {k: v + scale * (t + 1 if growing else 1) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        for t in range(count)
    ]


# ------------------------------------------------------------------------------------ tolerances
def rel_err(got: Any, ref: Any) -> float:
    """‖got − ref‖ / ‖ref‖ (Frobenius, in float64)."""
    a, b = got.double(), ref.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def reference_tolerance(reference_error: float, *, factor: float = 2.0, floor: float = 0.0) -> float:
    """The allowed error of a low-precision result: ``factor`` × the error the PyTorch reference itself makes
    in that precision (against an exact float64 evaluation), plus a small ``floor``."""
    return factor * float(reference_error) + floor


def assert_within_reference_error(
    got: Any,
    exact: Any,
    reference: Any,
    *,
    factor: float = 2.0,
    floor: float = 0.0,
    what: str = "result",
    seed: int | None = None,
) -> float:
    """Assert that ``got`` (same shape as ``exact``, all finite) is within :func:`reference_tolerance` of
    ``exact`` in :func:`rel_err`.

    ``reference``: the PyTorch reference evaluated in the low precision (a tensor: its :func:`rel_err` to
    ``exact`` is the reference error) or that error itself (a float). ``seed`` goes into the failure
    message, so that a failure on fresh random inputs can be reproduced. Returns the error of ``got``.
    """
    import torch

    at = f"; seed {seed}" if seed is not None else ""
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}{at}"
    assert torch.isfinite(got).all(), f"{what}: non-finite (unwritten?) elements{at}"
    ref_err = rel_err(reference, exact) if isinstance(reference, torch.Tensor) else float(reference)
    err = rel_err(got, exact)
    tol = reference_tolerance(ref_err, factor=factor, floor=floor)
    assert err <= tol, f"{what}: rel. error {err:.3g} > {tol:.3g} (reference's own error {ref_err:.3g}){at}"
    return err


def poison_cuda_cache(mib: int = 256) -> None:
    """Leave NaN in the CUDA caching allocator's free blocks, so that an output element a kernel does not
    write shows up as NaN (call between building the inputs and running the kernel)."""
    import torch

    junk = torch.full((mib << 18,), float("nan"), device="cuda")
    del junk


def require_backend(name: str) -> str:
    """``name`` if that ``fastinf.ops`` backend can run kernels on this machine's GPU, else skip the test
    (Triton under ``TRITON_INTERPRET=1`` runs in the CPU interpreter, tier b, so it is skipped here too)."""
    import pytest

    from fastinf import ops

    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: Triton runs in the interpreter (tier b), not on the GPU")
    state = ops.backends()[name]
    if state != "available":
        pytest.skip(f"{name}: {state}")
    return name


# ------------------------------------------------------------------------------------ distributed
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, fn: Any, args: tuple, queue: Any) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        import traceback

        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(fn: Any, *args: Any, world_size: int = 2, timeout: float = 300.0) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` spawned processes of one gloo process group (CPU) and return
    their results in rank order; an exception on any rank is raised here with its traceback.

    ``fn`` and ``args`` must be picklable (a module-level function of an importable module).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(results) < world_size:
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise TimeoutError(f"run_distributed: {world_size - len(results)} rank(s) did not finish in {timeout} s")
        if queue.empty():
            if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                for p in procs:
                    p.kill()
                raise RuntimeError(f"run_distributed: a rank died (exit codes {[p.exitcode for p in procs]})")
            time.sleep(0.05)
            continue
        r, status, value = queue.get()
        if status == "error":
            for p in procs:
                p.kill()
            raise RuntimeError(f"rank {r} failed: {value}")
        results[r] = value
    for p in procs:
        p.join(timeout=30)
    return [results[r] for r in range(world_size)]
