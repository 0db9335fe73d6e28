"""torch.distributed in one place: who am I, which rows are mine, and the few collectives fastinf uses.

Every function works without a process group (then this process is rank 0 of 1 and the collectives
return their input), so library code calls them unconditionally. Launch with ``torchrun
--nproc_per_node=P ...`` (gloo on CPU, NCCL on GPU) and initialise the group yourself, or let the CLI do
it (:func:`init_from_env`). A leaf module: it imports only torch.

Row split: the ``n`` training rows are cut into ``world_size`` contiguous ranges that differ in size
by at most one (:func:`split_range`); rank r owns the r-th. Results combine by sums (all-reduce) and
by concatenation in rank order (gather), so a P-process run equals a one-process run up to float
summation order.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_cat",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "split_range",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that prints and writes results (rank 0)."""
    return rank() == 0


def split_range(n: int, r: int | None = None, p: int | None = None) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``r`` among ``p`` (default: this process): contiguous ranges in
    rank order whose sizes differ by at most one (the first ``n % p`` ranks get one more)."""
    r = rank() if r is None else r
    p = world_size() if p is None else p
    if n < 0 or p < 1 or not 0 <= r < p:
        raise ValueError(f"split_range needs n >= 0 and 0 <= rank < world size, got n={n}, rank={r}, world={p}")
    base, extra = divmod(n, p)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def _backend_device(t: torch.Tensor) -> torch.device:
    # gloo reduces CPU tensors; NCCL needs CUDA tensors
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``t`` over all ranks (``t`` itself without a process group). Returns a new
    tensor on ``t``'s device and dtype; ``t`` is not modified."""
    if not is_distributed():
        return t
    dev = _backend_device(t)
    buf = t.detach().to(dev, copy=True).contiguous()
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Tensors of all ranks concatenated along ``dim`` in rank order, on every rank (sizes along
    ``dim`` may differ). Meant for small results (top-k candidates, per-rank rows on request)."""
    if not is_distributed():
        return t
    parts = all_gather_objects(t.detach().cpu())
    return torch.cat(parts, dim=dim).to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        torch.distributed.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1), with
    gloo on CPU or NCCL when CUDA is available (``backend`` overrides). Returns True when a group of
    more than one process is (now) initialised; does nothing outside torchrun."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)
    return is_distributed()
