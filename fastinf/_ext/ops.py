"""The CUDA backend: the ops on top of the compiled extension (``csrc/``), same contracts as the references.

Importing this module builds nothing; :func:`register_all` (called by the dispatcher on the first op on a
CUDA tensor) loads or JIT-builds the extension and registers the three ops.
"""

from __future__ import annotations

import torch

from ..kernels import _common as K
from ..ops._dispatch import register
from . import build


def _ext():
    return build.load()


def lora_per_sample_grads_cuda(x, dy, A, B, scale=1.0, mask=None, *, return_sq_norms=False):
    """CUDA version of :func:`fastinf.ops.lora_per_sample_grads_reference`."""
    x, dy, A, B = K.lora_inputs(x, dy, A, B)
    pA, pB = _ext().lora_partials(x, dy, A, B, float(scale), mask)
    return K.lora_finish(pA, pB, return_sq_norms)


def datainf_inverse_sum_cuda(G, T, lam, *, sq_norms=None, chunk_size=None):
    """CUDA version of :func:`fastinf.ops.datainf_inverse_sum_reference`."""
    C = _ext()

    def coef(g, t, need_nsq):
        P, nsq = C.datainf_coef(g, t, need_nsq)
        return P, (nsq if need_nsq else None)

    def apply(g, t, P, cinv, H, inv_lam, accumulate):
        C.datainf_apply(g, t, P, cinv, H, inv_lam, accumulate)

    return K.datainf_run(G, T, lam, sq_norms, chunk_size, coef, apply)


def rrinf_row_updates_cuda(rows, targets, omega, lr, reg, batch_size=1):
    """CUDA version of :func:`fastinf.ops.rrinf_row_updates_reference` (all steps in one launch)."""
    rows, targets, out, lr_t = K.rrinf_inputs(rows, targets, omega, lr, batch_size)
    _ext().rrinf_updates(rows, targets, lr_t, out, float(reg), int(batch_size))
    return out


def register_all() -> None:
    """Load (or build) the extension and register the CUDA implementations with the dispatcher."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible to torch")
    _ext()
    register("lora_per_sample_grads", "cuda", lora_per_sample_grads_cuda, K.supports_lora)
    register("datainf_inverse_sum", "cuda", datainf_inverse_sum_cuda, K.supports_datainf)
    register("rrinf_row_updates", "cuda", rrinf_row_updates_cuda, K.supports_rrinf)
