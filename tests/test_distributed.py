"""fastinf.distributed on 2 gloo CPU processes: row split, all-reduce, gather, broadcast."""

import pytest
import torch

from fastinf import distributed as fd
from fastinf.testing import run_distributed


def test_split_range_covers_every_row_once():
    for n in (0, 1, 5, 7, 100):
        for p in (1, 2, 3, 8):
            ranges = [fd.split_range(n, r, p) for r in range(p)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="split_range"):
        fd.split_range(5, 2, 2)


def test_single_process_is_rank_zero_of_one():
    assert (fd.rank(), fd.world_size(), fd.is_main(), fd.is_distributed()) == (0, 1, True, False)
    t = torch.arange(3.0)
    assert fd.all_reduce_sum(t) is t and fd.gather_cat(t) is t and fd.all_gather_objects(1) == [1]
    assert fd.split_range(10) == (0, 10) and fd.init_from_env() is False


def _collectives():
    r = fd.rank()
    a, b = fd.split_range(7)
    x = torch.full((2,), float(r + 1))
    s = fd.all_reduce_sum(x)
    assert torch.equal(x, torch.full((2,), float(r + 1)))  # input untouched
    g = fd.gather_cat(torch.arange(a, b))
    return fd.world_size(), (a, b), s.tolist(), g.tolist(), fd.broadcast_object({"from": r}), fd.all_gather_objects(r)


def test_collectives_on_two_gloo_processes():
    out = run_distributed(_collectives, world_size=2)
    assert [o[1] for o in out] == [(0, 4), (4, 7)]
    for world, _, s, g, b, objs in out:
        assert world == 2 and s == [3.0, 3.0] and g == list(range(7)) and b == {"from": 0} and objs == [0, 1]
