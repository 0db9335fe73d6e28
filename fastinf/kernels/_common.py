"""Backend-independent glue of the kernels (imports neither triton nor the CUDA extension, nor ``fastinf.ops``).

The Triton (``fastinf.kernels``) and CUDA (``fastinf._ext.ops``) implementations share the orchestration
around their kernels, so that both compute exactly the same function: input checks that decide whether a
kernel can take the inputs (``supports_*``: the dispatch table in ``fastinf.ops._dispatch`` names them;
``auto`` then moves on to the next backend), dtype unification, DataInf's two passes over row chunks of G,
the final sums of LoRA chunk partials, and the chunked top-k merge of ``trace_cov_topk``. The PyTorch
references in ``fastinf.ops`` use the shape checks and the top-k merge from here too, so that a kernel
called directly raises the reference's errors. Plus the launch-time facts every Triton launcher asks:
:func:`interpreting`, :func:`sm_count`, :func:`interp_upcast`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------- launch
def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (Triton runs the kernels in Python, on CPU tensors too)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 off CUDA: the interpreter's stand-in)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def interp_upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, upcast to float32 under the interpreter if any is bfloat16 (it computes bf16 wrongly)."""
    if interpreting() and any(t.dtype == torch.bfloat16 for t in tensors):
        return tuple(t.float() for t in tensors)
    return tensors


def _dtype_reason(*tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in KERNEL_DTYPES:
            return (
                f"the kernels take float16/bfloat16/float32 inputs, got {t.dtype} "
                "(float64 runs on the PyTorch reference: backend='torch')"
            )
    return None


def _device_reason(ref: torch.Tensor, *tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device != ref.device:
            return f"all tensors must be on {ref.device}, got one on {t.device}"
    return None


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The element type the kernels read: the common dtype if all agree, else float32."""
    dts = {t.dtype for t in tensors}
    return dts.pop() if len(dts) == 1 else torch.float32


# ------------------------------------------------------------------------------------------------- LoRA
def supports_lora(x, dy, A, B, scale=1.0, mask=None, **_) -> str | None:
    return _dtype_reason(x, dy, A, B) or _device_reason(x, dy, A, B, mask)


def lora_inputs(x, dy, A, B):
    """x, dy in their common dtype (float32 if they differ); A, B cast to it (they are small)."""
    dt = compute_dtype(x, dy)
    return x.to(dt), dy.to(dt), A.to(dt), B.to(dt)


def lora_finish(pA: torch.Tensor, pB: torch.Tensor, return_sq_norms: bool):
    """Sum the (N, C, ...) chunk partials into (gA, gB) (+ squared norms)."""
    gA = pA[:, 0] if pA.shape[1] == 1 else pA.sum(1)
    gB = pB[:, 0] if pB.shape[1] == 1 else pB.sum(1)
    if pA.shape[1] == 0:  # S = 0
        gA, gB = pA.new_zeros(pA.shape[0], *pA.shape[2:]), pB.new_zeros(pB.shape[0], *pB.shape[2:])
    if return_sq_norms:
        return gA, gB, gA.pow(2).sum((1, 2)) + gB.pow(2).sum((1, 2))
    return gA, gB


# ---------------------------------------------------------------------------------------------- DataInf
def supports_datainf(G, T, lam, *, sq_norms=None, chunk_size=None, **_) -> str | None:
    return _dtype_reason(G, T) or _device_reason(G, T, sq_norms)


def datainf_run(
    G: torch.Tensor,
    T: torch.Tensor,
    lam: float,
    sq_norms: torch.Tensor | None,
    chunk_size: int | None,
    coef: Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]],
    apply: Callable[..., None],
) -> torch.Tensor:
    """H = (T − C G / n) / λ by the kernels' two passes, over row chunks of G of at most ``chunk_size`` rows.

    ``coef(g, T, need_nsq) -> (P = T gᵀ (m, c) float32, ‖g_i‖² (c,) float32 or None)``;
    ``apply(g, T, P, cinv, H, inv_lam, accumulate)`` writes H = (T − (P·cinv) g)·inv_lam, or subtracts
    (P·cinv) g·inv_lam from H when ``accumulate``.
    """
    n, d = G.shape
    m = T.shape[0]
    dt = compute_dtype(G, T)
    G, T = G.to(dt), T.to(dt)
    H = torch.empty(m, d, dtype=torch.float32, device=G.device)
    if m == 0:
        return H
    step = n if chunk_size is None else max(1, int(chunk_size))
    for s in range(0, n, step):
        g = G[s : s + step]
        P, nsq = coef(g, T, sq_norms is None)
        if sq_norms is not None:
            nsq = sq_norms[s : s + step].to(device=G.device, dtype=torch.float32)
        cinv = ((nsq.double() + float(lam)) * n).reciprocal().float()
        apply(g, T, P.contiguous(), cinv.contiguous(), H, 1.0 / float(lam), s > 0)
    return H


# ------------------------------------------------------------------------------------------------ RRInf
def supports_rrinf(rows, targets, omega, lr, reg, batch_size=1, **_) -> str | None:
    return _dtype_reason(rows, targets, omega) or _device_reason(
        omega, rows, targets, lr if isinstance(lr, torch.Tensor) else None
    )


def rrinf_inputs(rows, targets, omega, lr, batch_size):
    """rows, targets in a common dtype; Ω as a fresh float32 (n, m) tensor; lr as a (steps,) float32 tensor."""
    steps = rows.shape[0] // batch_size
    if isinstance(lr, torch.Tensor):
        lr_t = lr.to(device=omega.device, dtype=torch.float32).reshape(-1)
        if lr_t.numel() != steps:
            raise ValueError(f"rrinf_row_updates: lr has {lr_t.numel()} entries for {steps} steps")
    else:
        lr_t = torch.full((steps,), float(lr), dtype=torch.float32, device=omega.device)
    dt = compute_dtype(rows, targets)
    out = omega.to(dtype=torch.float32, copy=True).contiguous()
    return rows.to(dt).contiguous(), targets.to(dt).contiguous(), out, lr_t.contiguous()


# ------------------------------------------------------------------------------------- trace covariance
def check_traces(X: torch.Tensor, Y: torch.Tensor) -> None:
    """trace_cov's input contract: X (N, n) and Y (N, m), the same N ≥ 2 draws."""
    if X.dim() != 2 or Y.dim() != 2:
        raise ValueError(f"trace_cov: X (N, n) and Y (N, m) must be 2-D, got {tuple(X.shape)}, {tuple(Y.shape)}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"trace_cov: X has {X.shape[0]} draws but Y has {Y.shape[0]}")
    if X.shape[0] < 2:
        raise ValueError("trace_cov: need at least 2 draws")


def check_k(k, n: int) -> None:
    """trace_cov_topk's k: an int in [1, n]."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"trace_cov_topk: k must be an int in [1, n={n}], got {k!r}")


def check_variances(sx: torch.Tensor, sy: torch.Tensor) -> None:
    """normalize=True: ValueError naming the first train (then query) example whose trace has zero spread."""
    if bool((sx == 0).any()) or bool((sy == 0).any()):
        which = "train" if bool((sx == 0).any()) else "query"
        idx = int(torch.nonzero(sx == 0)[0, 0]) if which == "train" else int(torch.nonzero(sy == 0)[0, 0])
        raise ValueError(
            f"normalize=True: the {which} trace of example {idx} has zero variance (correlation undefined)"
        )


def chunked_topk(
    n: int,
    m: int,
    k: int,
    scores: Callable[[int, int], torch.Tensor],
    *,
    largest: bool,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k of an (m, n) score matrix that is never held whole: ``scores(start, stop)`` gives columns
    [start, stop) as (m, stop − start); chunks of ``chunk_size`` columns (default: about 2²⁴ scores per chunk,
    at least k columns) are reduced with ``torch.topk`` and merged. Returns (values (m, k), indices (m, k))."""
    step = max(1, int(chunk_size)) if chunk_size is not None else max(k, (1 << 24) // max(m, 1))
    vals = idx = None
    for s in range(0, n, step):
        e = min(s + step, n)
        v, i = torch.topk(scores(s, e), min(k, e - s), dim=1, largest=largest)
        i = i + s
        if vals is None:
            vals, idx = v, i
        else:
            vals, sel = torch.topk(torch.cat([vals, v], 1), min(k, vals.shape[1] + v.shape[1]), 1, largest=largest)
            idx = torch.gather(torch.cat([idx, i], 1), 1, sel)
    return vals, idx
