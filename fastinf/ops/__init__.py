"""Numeric ops. Each has ``<op>_reference`` (pure PyTorch: CPU path and test oracle) and ``<op>``
(dispatcher: ``backend="auto"`` follows the static table ``_dispatch.DISPATCH_TABLE``, per op and shape class
in the order a GPU measurement supports, the PyTorch reference where nothing has been measured yet; see
:func:`backends`)."""

from ._dispatch import backends
from .datainf_inverse_sum import datainf_inverse_sum, datainf_inverse_sum_reference
from .lora_per_sample_grads import lora_per_sample_grads, lora_per_sample_grads_reference
from .rrinf_row_updates import rrinf_row_updates, rrinf_row_updates_reference
from .trace_cov import CoMoments, trace_cov, trace_cov_reference, trace_cov_topk, trace_cov_topk_reference

__all__ = [
    "backends",
    "datainf_inverse_sum",
    "datainf_inverse_sum_reference",
    "lora_per_sample_grads",
    "lora_per_sample_grads_reference",
    "rrinf_row_updates",
    "rrinf_row_updates_reference",
    "trace_cov",
    "trace_cov_reference",
    "trace_cov_topk",
    "trace_cov_topk_reference",
    "CoMoments",
]
