"""Backend-independent glue of the kernels (imports neither triton nor the CUDA extension, nor ``fastinf.ops``).

The Triton (``fastinf.kernels``) and CUDA (``fastinf._ext.ops``) implementations share the orchestration
around their kernels, so that both compute exactly the same function: input checks that decide whether a
kernel can take the inputs (``supports_*``: the dispatch table in ``fastinf.ops._dispatch`` names them;
``auto`` then moves on to the next backend), dtype unification, DataInf's two passes over row chunks of G
(with the per-row power-of-two scale of C and the 1/(n λ) epilogue factors), LoRA's operands (u and v scaled per
example by a power of two before rounding, the sum of v's pieces, the split of S that fills the GPU, the final
sums of split partials), and the chunked top-k merge of ``trace_cov_topk``. The PyTorch
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
def supports_lora(x, dy, A, B, scale=1.0, mask=None, *, u=None, **_) -> str | None:
    return _dtype_reason(x, dy, A, B, u) or _device_reason(x, dy, A, B, mask, u)


def pow2_normalise(v: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` (N, ...) float32 as ``(v · 2^−e_i)`` rounded to ``dt``, and the (N,) float32 factors ``2^e_i``.

    e_i is the exponent of example i's largest |v| (so its largest entry lands in [0.5, 1)): multiplying by a
    power of two is exact, and 16-bit operands then never fall into the subnormal range because of their
    overall size (fp16 dy ≈ 1e-6 gives v = Bᵀdy ≈ 1e-5, below fp16's smallest normal 6.1e-5). float32: no
    scaling (factors 1).
    """
    N = v.shape[0]
    if dt == torch.float32 or v.numel() == 0:
        return v.to(dt), torch.ones(N, dtype=torch.float32, device=v.device)
    amax = v.abs().reshape(N, -1).amax(1)
    e = torch.frexp(amax)[1].to(torch.int32)  # amax = f · 2^e, f ∈ [0.5, 1); e = 0 for amax = 0
    shape = (N,) + (1,) * (v.dim() - 1)
    return torch.ldexp(v, (-e).reshape(shape).to(v.dtype)).to(dt), torch.ldexp(torch.ones_like(amax), e.float())


def lora_prepare(x, dy, A, B, scale, mask, u):
    """The kernels' operands: ``(x, dy, B, u_op, eu, w)`` with x, dy, B in the common dtype, the (N, S) float32
    row weights ``w = scale · mask`` (None when there is no mask and scale is folded into ``eu``), and
    ``u_op = w·u / 2^eu`` rounded to that dtype (:func:`pow2_normalise`). ``u`` = x Aᵀ (N, S, r) as the capture
    hook recorded it; None computes it here with one torch GEMM (an extra read of x)."""
    dt = compute_dtype(x, dy)
    x, dy, B = x.to(dt), dy.to(dt), B.to(dt)
    if u is None:
        u = torch.matmul(x, A.to(device=x.device, dtype=dt).T)
    uf = u.float()
    w = None
    if mask is not None:
        w = mask.to(device=x.device, dtype=torch.float32) * float(scale)
        uf = uf * w.unsqueeze(-1)
    elif float(scale) != 1.0:
        uf = uf * float(scale)
    u_op, eu = pow2_normalise(uf, dt)
    return x, dy, B, u_op.contiguous(), eu, w


def lora_v_operand(vp: torch.Tensor, w: torch.Tensor | None, scale: float, dt: torch.dtype):
    """v = Bᵀdy from its (N, T, S, r) float32 per-d_out-tile pieces (summed in a fixed order: deterministic),
    times the row weights, as ``(v_op, ev)`` (:func:`pow2_normalise`)."""
    v = vp[:, 0] if vp.shape[1] == 1 else vp.sum(1)
    if w is not None:
        v = v * w.unsqueeze(-1)
    elif float(scale) != 1.0:
        v = v * float(scale)
    v_op, ev = pow2_normalise(v, dt)
    return v_op.contiguous(), ev


def lora_v_pieces(r: int, tile: int, esize: int) -> bool:
    """Whether the dy pass should also write v = dy B as per-d_out-tile float32 pieces (r/tile · 8 bytes per dy
    element, written and read) rather than leave v to a pass of its own (one more read of dy, ``esize`` bytes per
    element): the cheaper of the two."""
    return 8 * r < tile * esize


def lora_splits(N: int, S: int, tiles: int, block_s: int, sms: int) -> tuple[int, int]:
    """(splits of S, rows per split) so that N · tiles · splits programs give about two waves on ``sms``
    multiprocessors. Each split is a multiple of ``block_s`` rows; the (N, splits, …) gradient partials are
    summed afterwards (deterministic). The split count depends on N and the tiles, never grows with S."""
    if S == 0:
        return 1, block_s
    want = _cdiv(2 * sms, max(1, N * tiles))
    p = max(1, min(want, _cdiv(S, block_s)))
    per = _cdiv(_cdiv(S, p), block_s) * block_s
    return _cdiv(S, per), per


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lora_finish(pA: torch.Tensor, pB: torch.Tensor, return_sq_norms: bool):
    """Sum the (N, P, ...) split partials into (gA, gB) (+ squared norms)."""
    gA = pA[:, 0] if pA.shape[1] == 1 else pA.sum(1)
    gB = pB[:, 0] if pB.shape[1] == 1 else pB.sum(1)
    if return_sq_norms:
        return gA, gB, gA.pow(2).sum((1, 2)) + gB.pow(2).sum((1, 2))
    return gA, gB


# ---------------------------------------------------------------------------------------------- DataInf
def supports_datainf(G, T, lam, *, sq_norms=None, chunk_size=None, **_) -> str | None:
    why = _dtype_reason(G, T) or _device_reason(G, T, sq_norms)
    if why is None and max(G.shape[0], T.shape[0]) >= 1 << 31:
        why = f"the kernels take m, n < 2**31, got n = {G.shape[0]}, m = {T.shape[0]}"
    return why


def datainf_row_scales(P: torch.Tensor, cinv: torch.Tensor) -> torch.Tensor:
    """Per test row j the power of two 2^−e_j that brings max_i |P_ji cinv_i| into [0.5, 1) (1 for a zero row).

    The apply kernels form C = P·cinv·2^−e_j in float32 and, for 16-bit inputs, split it into hi + lo parts in
    the input dtype (two tensor-core products): about 16 (bf16) / 22 (fp16) significant bits instead of the 8 /
    11 one rounding keeps, and no fp16 subnormals. The factor is undone exactly in the epilogue together with
    1/n and 1/λ (never folded into C)."""
    amax = (P.abs() * cinv.abs()).amax(1) if P.shape[1] else P.new_zeros(P.shape[0])
    e = torch.frexp(amax)[1].float()
    return torch.ldexp(torch.ones_like(amax), -e)


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
    ``apply(g, T, P, cinv, rscale, out_scale, H, inv_lam, accumulate)`` forms C_ji = P_ji · cinv_i · rscale_j
    (cinv_i = 1/(λ + ‖g_i‖²), float32; rscale from :func:`datainf_row_scales`) and writes
    H_j = T_j·inv_lam − (C g)_j·out_scale_j with out_scale_j = 1/(rscale_j n λ), or subtracts
    (C g)_j·out_scale_j from H when ``accumulate``. 1/n and 1/λ are applied in that float32 epilogue.
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
        cinv = (nsq.double() + float(lam)).reciprocal().float()
        P = P.contiguous()
        rscale = datainf_row_scales(P, cinv)
        out_scale = (rscale.double() * (n * float(lam))).reciprocal().float()
        apply(g, T, P, cinv.contiguous(), rscale.contiguous(), out_scale.contiguous(), H, 1.0 / float(lam), s > 0)
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
