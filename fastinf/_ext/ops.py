"""The CUDA backend: the ops on top of the compiled extension (``csrc/``), same contracts as the references.

Importing this module builds nothing. The dispatcher's static table (``fastinf.ops._dispatch.DISPATCH_TABLE``)
names these functions (and their input checks in ``fastinf.kernels._common``); before the first op on a CUDA
tensor it calls :func:`fastinf._ext.build.load`, which loads or JIT-builds the extension.
"""

from __future__ import annotations

from ..kernels import _common as K
from . import build


def _ext():
    return build.load()


def lora_per_sample_grads_cuda(x, dy, A, B, scale=1.0, mask=None, *, u=None, return_sq_norms=False):
    """CUDA version of :func:`fastinf.ops.lora_per_sample_grads_reference` (the plan of
    ``csrc/lora_per_sample_grads.cu``: dy read once for gB and v = dy B, then x once for gA)."""
    C = _ext()
    x, dy, B, u_op, eu, w = K.lora_prepare(x, dy, A, B, scale, mask, u)
    N, S, din = x.shape
    dout = dy.shape[2]
    sms = K.sm_count(x.device)
    tile_y, tile_x = C.lora_tiles(x)
    splits, per = K.lora_splits(N, S, -(-dout // tile_y), 32, sms)
    pB, vp = C.lora_dy(dy, u_op, B, eu, splits, per)
    v_op, ev = K.lora_v_operand(vp, w, scale, x.dtype)
    splits, per = K.lora_splits(N, S, -(-din // tile_x), 32, sms)
    pA = C.lora_x(x, v_op, ev, splits, per)
    return K.lora_finish(pA, pB, return_sq_norms)


def datainf_inverse_sum_cuda(G, T, lam, *, sq_norms=None, chunk_size=None):
    """CUDA version of :func:`fastinf.ops.datainf_inverse_sum_reference`."""
    C = _ext()

    def coef(g, t, need_nsq):
        P, nsq = C.datainf_coef(g, t, need_nsq)
        return P, (nsq if need_nsq else None)

    def apply(g, t, P, cinv, rscale, out_scale, H, inv_lam, accumulate):
        C.datainf_apply(g, t, P, cinv, rscale, out_scale, H, inv_lam, accumulate)

    return K.datainf_run(G, T, lam, sq_norms, chunk_size, coef, apply)


def rrinf_row_updates_cuda(rows, targets, omega, lr, reg, batch_size=1):
    """CUDA version of :func:`fastinf.ops.rrinf_row_updates_reference` (all steps in one launch)."""
    rows, targets, out, lr_t = K.rrinf_inputs(rows, targets, omega, lr, batch_size)
    _ext().rrinf_updates(rows, targets, lr_t, out, float(reg), int(batch_size))
    return out
