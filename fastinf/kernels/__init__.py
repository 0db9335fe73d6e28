"""Triton kernels of the numeric ops: ``<op>.py`` holds ``_<op>_kernel`` and its launcher ``<op>_triton``.

Importing this package does not import triton; :func:`register_all` (called by the dispatcher on the first
op on a CUDA tensor) imports the kernel modules and registers them. Under ``TRITON_INTERPRET=1`` the
launchers also run on CPU tensors (the tier-(b) tests call them directly).
"""

from __future__ import annotations

import importlib

OPS = ("lora_per_sample_grads", "datainf_inverse_sum", "rrinf_row_updates", "trace_cov", "trace_cov_topk")
_MODULES = {"trace_cov_topk": "trace_cov"}  # ops whose kernel lives in another op's module


def register_all() -> None:
    """Import the Triton kernel modules and register them with the dispatcher."""
    from ..ops._dispatch import register
    from . import _common

    supports = {
        "lora_per_sample_grads": _common.supports_lora,
        "datainf_inverse_sum": _common.supports_datainf,
        "rrinf_row_updates": None,  # the module adds its own size limit
        "trace_cov": None,  # the module's supports_<op>
        "trace_cov_topk": None,
    }
    for op in OPS:
        mod = importlib.import_module(f"{__name__}.{_MODULES.get(op, op)}")
        check = getattr(mod, f"supports_{op}", None) or getattr(mod, "supports", None) or supports[op]
        register(op, "triton", getattr(mod, f"{op}_triton"), check)
