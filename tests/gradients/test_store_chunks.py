"""Row-range streaming: GradientSet.iter_chunks and GradientStore.iter_chunks (same rows, same dtype,
only the overlapping shards read)."""

import pytest
import torch

pytest.importorskip("safetensors")

from fastinf.gradients import GradientSet, GradientStore  # noqa: E402
from fastinf.gradients import store as store_mod  # noqa: E402


def _blocks(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(n, 3, generator=g).to(dtype), "b": torch.randn(n, 5, generator=g).to(dtype)}


def _store(path, sizes, dtype=torch.float32, **kw):
    fp = {"blocks": {"a": 3, "b": 5}, "dtype": str(dtype).replace("torch.", "")}
    st = GradientStore.create(path, fp, shard_bytes=1, **kw)  # one shard per append
    parts = [_blocks(k, seed=i, dtype=dtype) for i, k in enumerate(sizes)]
    for p in parts:
        st.append(p)
    st.mark_complete()
    mem = GradientSet({k: torch.cat([p[k] for p in parts]) for k in ("a", "b")})
    return GradientStore.open(path), mem


@pytest.mark.parametrize("size", [1, 3, 4, 7, 100])
@pytest.mark.parametrize("rng", [(0, None), (2, 9), (5, 5), (4, 12), (11, 12)])
def test_store_and_set_chunks_agree(tmp_path, size, rng):
    st, mem = _store(tmp_path / "s", [4, 4, 3, 1])
    start, stop = rng
    got = list(st.iter_chunks(size, start=start, stop=stop))
    ref = list(mem.iter_chunks(size, start=start, stop=stop))
    stop = 12 if stop is None else stop
    assert [o for o, _ in got] == [o for o, _ in ref] == list(range(start, stop, size))
    for (_, c), (_, r) in zip(got, ref, strict=True):
        assert c.names == r.names
        for k in r.names:
            assert torch.equal(c[k], r[k])
    assert sum(c.n for _, c in got) == stop - start


def test_chunk_arguments_are_checked(tmp_path):
    st, mem = _store(tmp_path / "s", [4])
    for x in (st, mem):
        with pytest.raises(ValueError, match="size must be a positive int"):
            next(x.iter_chunks(0))
        with pytest.raises(ValueError, match="0 <= start <= stop <= n = 4"):
            next(x.iter_chunks(2, start=3, stop=5))
        with pytest.raises(ValueError, match="0 <= start <= stop <= n = 4"):
            next(x.iter_chunks(2, start=3, stop=2))


def test_chunks_keep_the_stored_dtype_unless_viewed(tmp_path):
    st, mem = _store(tmp_path / "s", [3, 3], dtype=torch.bfloat16)
    (_, c), *_ = st.iter_chunks(4)
    assert c.dtype == torch.bfloat16 and torch.equal(c["a"], mem["a"][:4])
    (_, c), *_ = st.to(dtype=torch.float32).iter_chunks(4)
    assert c.dtype == torch.float32 and torch.equal(c["a"], mem["a"][:4].float())


def test_chunks_open_only_overlapping_shards_once(tmp_path, monkeypatch):
    st, _ = _store(tmp_path / "s", [4, 4, 4, 4])
    import safetensors

    opened = []
    real = safetensors.safe_open

    def spy(path, *a, **kw):
        opened.append(path.rsplit("/", 1)[-1])
        return real(path, *a, **kw)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    chunks = list(st.iter_chunks(3, start=5, stop=11))  # rows 5..8 (shard 1) and 8..11 (shard 2)
    assert [o for o, _ in chunks] == [5, 8]
    assert opened == ["shard-00001.safetensors", "shard-00002.safetensors"]
    assert store_mod  # the module is importable on its own


def test_checksums_off_still_catches_missing_and_truncated_shards(tmp_path):
    st, mem = _store(tmp_path / "s", [4, 4])
    f = tmp_path / "s" / "shard-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # a bit flip: only the SHA-256 sees it
    f.write_bytes(bytes(data))
    fast = GradientStore.open(tmp_path / "s", checksums=False)
    assert [c.n for _, c in fast.iter_chunks(3)] == [3, 3, 2]
    with pytest.raises(Exception, match=r"shard-00001.*checksum"):
        fast.verify()
    with pytest.raises(Exception, match=r"shard-00001.*checksum"):
        list(GradientStore.open(tmp_path / "s").to(dtype=torch.float64).iter_chunks(3))
    f.write_bytes(bytes(data[:-8]))
    with pytest.raises(Exception, match=r"shard-00001.*truncated"):
        list(GradientStore.open(tmp_path / "s", checksums=False).iter_chunks(3))
