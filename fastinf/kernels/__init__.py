"""Triton kernels of the numeric ops: ``<op>.py`` holds ``_<op>_kernel`` and its launcher ``<op>_triton``.

Importing this package does not import triton (only the ``<op>`` modules do). Nothing here registers with
or imports ``fastinf.ops``: the dispatcher's static table (``fastinf.ops._dispatch.DISPATCH_TABLE``) names
each launcher and its input check by module path, and imports them on the first op on a CUDA tensor.
``_common`` holds the glue shared with the CUDA backend (``fastinf._ext``) and the PyTorch references.
Under ``TRITON_INTERPRET=1`` the launchers also run on CPU tensors (the tier-(b) tests call them directly).
"""
