"""The per-block sums of squares a GradientStore records per shard (``sq_sums``) and adds up in
``block_sq_sums()``: exact float64 sums of the rows as stored, independent of the shard size, None where the
store cannot tell (older stores, narrowing views)."""

import json
import math

import pytest
import torch
from conftest import make_blocks

from fastinf.gradients import store as store_mod
from fastinf.gradients import store_format
from fastinf.gradients.store import GradientStore

DIMS = {"a.lora_A": 7, "a.lora_B": 5, "head": 3}
SIZES = [4, 1, 6, 3, 5, 2, 7]  # appends of different sizes: 28 rows


def _write(path, gs, *, dtype="float32", shard_bytes=None):
    st = GradientStore.create(path, {"blocks": gs.dims, "dtype": "float64"}, store_dtype=dtype, shard_bytes=shard_bytes)
    s = 0
    for c in SIZES:
        st.append({k: gs[k][s : s + c] for k in gs.names})
        s += c
    st.mark_complete()
    return GradientStore.open(path)


def _exact(st):
    """Σ‖g‖² per block recomputed from the stored rows in float64 (math.fsum of the squares: correctly rounded)."""
    rows = st.to(dtype=torch.float64).load()
    return {k: math.fsum(float(v) for v in rows[k].reshape(-1).square()) for k in st.names}


def _assert_rel(a, b, rel=1e-12):
    assert set(a) == set(b)
    for k in a:
        assert abs(a[k] - b[k]) <= rel * abs(b[k]), (k, a[k], b[k])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_recorded_sums_equal_the_stored_rows_squared(tmp_path, dtype):
    gs = make_blocks(sum(SIZES), DIMS, seed=3)
    st = _write(tmp_path / "s", gs, dtype=dtype, shard_bytes=200)  # several shards of a few appends each
    assert len(st.manifest["shards"]) > 2
    assert all(set(e["sq_sums"]) == set(DIMS) for e in st.manifest["shards"])
    got = st.block_sq_sums()
    _assert_rel(got, _exact(st))  # the rows as stored (after conversion), not the float64 input
    if dtype != "float64":
        assert got != {k: float(gs[k].square().sum()) for k in DIMS}


def test_sums_do_not_depend_on_the_shard_size(tmp_path):
    gs = make_blocks(sum(SIZES), DIMS, seed=4)
    sums = []
    for i, sb in enumerate([1, 150, 400, None]):  # one shard per append ... one shard for everything
        st = _write(tmp_path / f"s{i}", gs, dtype="bfloat16", shard_bytes=sb)
        sums.append((len(st.manifest["shards"]), st.block_sq_sums()))
    assert [n for n, _ in sums][0] == len(SIZES) and len({n for n, _ in sums}) == 4  # 4 different shardings
    for _, s in sums[1:]:
        _assert_rel(s, sums[0][1])


def test_sums_are_computed_a_few_rows_at_a_time(tmp_path, monkeypatch):
    """No float64 copy of a whole shard: at most _SQ_ELEMS elements are widened at a time."""
    monkeypatch.setattr(store_format, "_SQ_ELEMS", 8)  # one row of a 7-wide block at a time
    widened = []
    real = store_mod._sq_sum

    def spy(pieces):
        widened.extend(t.shape[0] for t in pieces)
        return real(pieces)

    monkeypatch.setattr(store_mod, "_sq_sum", spy)
    gs = make_blocks(sum(SIZES), DIMS, seed=5)
    st = _write(tmp_path / "s", gs, dtype="float32", shard_bytes=1 << 20)
    assert max(widened) <= max(SIZES)  # per buffered append, never the concatenated shard
    _assert_rel(st.block_sq_sums(), _exact(st))


def test_views_and_older_stores(tmp_path):
    gs = make_blocks(sum(SIZES), DIMS, seed=6)
    st = _write(tmp_path / "s", gs, dtype="float32", shard_bytes=200)
    sums = st.block_sq_sums()
    assert st.to(dtype=torch.float64).block_sq_sums() == sums  # widening view: the same values
    assert st.to(device="cpu").block_sq_sums() == sums
    assert st.to(dtype=torch.bfloat16).block_sq_sums() is None  # narrowing view: other values
    assert GradientStore.open(tmp_path / "s", checksums=False).block_sq_sums() == sums
    # a view of some rows only (a store object whose n is not the rows its shards hold) cannot tell
    monkey = GradientStore.open(tmp_path / "s")
    monkey.manifest = dict(monkey.manifest, n=monkey.n - 1)
    assert monkey.block_sq_sums() is None
    # an older store: shards without the field (the format version is unchanged: the field is optional)
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["format_version"] == store_format.FORMAT_VERSION == 3
    del man["shards"][1]["sq_sums"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    old = GradientStore.open(tmp_path / "s")
    assert old.block_sq_sums() is None
    torch.testing.assert_close(old.load().matrix(), st.load().matrix(), rtol=0, atol=0)


def test_incomplete_store_sums_its_stored_rows(tmp_path):
    gs = make_blocks(sum(SIZES), DIMS, seed=7)
    st = GradientStore.create(tmp_path / "s", {"blocks": gs.dims, "dtype": "float64"}, shard_bytes=1)
    st.append({k: gs[k][:4] for k in gs.names})
    st.append({k: gs[k][4:9] for k in gs.names})
    part = GradientStore.open(tmp_path / "s", allow_incomplete=True)
    assert part.n == 9
    _assert_rel(part.block_sq_sums(), _exact(part))


class _Collector:
    """A stand-in collector: batch i's gradients are rows ``index`` of a fixed GradientSet."""

    def __init__(self, gs):
        self.gs, self.calls = gs, 0

    def fingerprint(self):
        return {"blocks": self.gs.dims, "dtype": "float64"}

    def batch_gradients(self, batch):
        self.calls += 1
        return {k: self.gs[k][batch["index"]] for k in self.gs.names}


def test_a_repaired_shard_keeps_its_sums(tmp_path):
    gs = make_blocks(sum(SIZES), DIMS, seed=8)
    bounds = [0, *torch.tensor(SIZES).cumsum(0).tolist()]
    loader = [{"index": torch.arange(a, b)} for a, b in zip(bounds, bounds[1:], strict=False)]
    col = _Collector(gs)
    st = GradientStore.create(tmp_path / "s", col, store_dtype="bfloat16", shard_bytes=200).fill(
        col, loader, progress=False
    )
    sums = st.block_sq_sums()
    _assert_rel(sums, _exact(st))
    e = st.manifest["shards"][1]
    p = tmp_path / "s" / e["file"]
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF  # corrupt a stored value
    p.write_bytes(bytes(data))
    calls = col.calls
    again = GradientStore.create(tmp_path / "s", col, store_dtype="bfloat16").fill(col, loader, progress=False)
    assert col.calls > calls  # the damaged shard was recomputed from its batches
    assert again.block_sq_sums() == sums and again.manifest["shards"][1]["sq_sums"] == e["sq_sums"]


def test_sums_do_not_depend_on_how_rows_are_grouped():
    """A shard rewritten from one tensor records the same bits as the same rows written from many appends
    (a resume that repairs a shard must leave the manifest byte-identical)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(301, 37, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 37, dtype=torch.float64)
    x0 = x.clone()
    whole = store_format._sq_sum([x])
    assert torch.equal(x, x0), "the rows were modified (a float64 block is a view, not a copy)"
    for cuts in ([1, 300], [150, 151], [7] * 43):
        parts = list(torch.split(x, cuts))
        assert store_format._sq_sum(parts) == whole, cuts
    assert whole == pytest.approx(float((x * x).sum()), rel=1e-14)
