import pytest
import torch

from fastinf import GradientSet


def test_basic_properties_and_matrix_order():
    a, b = torch.randn(4, 3), torch.randn(4, 2, 5)
    gs = GradientSet({"b": b, "a": a})
    assert gs.n == 4 and gs.names == ["b", "a"] and gs.dims == {"b": 10, "a": 3} and gs.dim == 13
    assert torch.equal(gs.matrix(), torch.cat([b.reshape(4, 10), a], 1))  # row-major flattening
    assert torch.equal(gs["a"], a)
    with pytest.raises(KeyError, match="no block"):
        gs["c"]


def test_from_dicts_flattens_row_major_and_orders_ids():
    rows = [{"A": torch.arange(6.0).reshape(2, 3) + 10 * i, "B": torch.tensor([float(i)])} for i in range(3)]
    as_map = {2: rows[2], 0: rows[0], 1: rows[1]}  # the reference repos' {example_id: dict} layout
    for src in (rows, as_map):
        gs = GradientSet.from_dicts(src)
        assert gs.names == ["A", "B"] and gs.n == 3
        assert torch.equal(gs["A"][1], torch.arange(6.0) + 10)
        assert torch.equal(gs["B"][:, 0], torch.tensor([0.0, 1.0, 2.0]))
    back = gs.to_dicts(shapes={"A": (2, 3)})
    assert torch.equal(back[2]["A"], rows[2]["A"])


def test_from_dicts_rejects_inconsistent_examples():
    with pytest.raises(ValueError, match="example 1"):
        GradientSet.from_dicts([{"A": torch.ones(2)}, {"B": torch.ones(2)}])
    with pytest.raises(ValueError, match="shape"):
        GradientSet.from_dicts([{"A": torch.ones(2)}, {"A": torch.ones(3)}])
    with pytest.raises(ValueError, match="no examples"):
        GradientSet.from_dicts([])


def test_subset_to_and_mean():
    gs = GradientSet({"a": torch.randn(6, 3, dtype=torch.float64), "b": torch.randn(6, 2, dtype=torch.float64)})
    s = gs.subset([4, 1])
    assert torch.equal(s["a"], gs["a"][[4, 1]])
    assert gs.subset(slice(1, 3)).n == 2
    assert gs.subset(torch.tensor([True, False, True, False, False, False])).n == 2
    assert gs.subset(2).n == 1
    f = gs.to(dtype=torch.float32)
    assert f.dtype == torch.float32 and f.names == gs.names
    assert torch.allclose(gs.mean()["b"][0], gs["b"].mean(0))
    with pytest.raises(TypeError):
        gs.to(dtype=torch.int64)
    with pytest.raises(TypeError):
        gs.subset(torch.tensor([0.5]))


def test_from_matrix():
    x = torch.randn(5, 7)
    gs = GradientSet.from_matrix(x, name="g")
    assert gs.names == ["g"] and torch.equal(gs.matrix(), x)
    with pytest.raises(ValueError):
        GradientSet.from_matrix(torch.randn(5))
