"""GradientStore: round trip, crash + resume (bit-identical), checksums, argument mismatch."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("safetensors")

from test_collector import _llama  # noqa: E402

import fastinf  # noqa: E402
from fastinf.gradients import store as store_mod  # noqa: E402
from fastinf.gradients.store import GradientStore, StoreError  # noqa: E402


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_round_trip_and_lazy_reading(setup, tmp_path):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    mem = col.collect(loader, progress=False)
    st = col.collect(loader, store=tmp_path / "s", progress=False)
    assert isinstance(st, GradientStore) and isinstance(st, fastinf.GradientSet)
    assert st.n == 10 and st.names == mem.names and st.dims == mem.dims
    for n in mem.names:
        assert torch.equal(st[n], mem[n])
    assert torch.equal(st.subset(slice(2, 8)).matrix(), mem.subset(slice(2, 8)).matrix())
    assert torch.equal(st.subset([9, 0, 4]).matrix(), mem.subset([9, 0, 4]).matrix())
    assert torch.equal(st.load().matrix(), mem.matrix())
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["n"] == 10 and man["complete"] and len(man["shards"]) == 1  # 4 batches buffered into one shard
    assert [b["n"] for b in man["shards"][0]["batches"]] == [3, 3, 3, 1] and man["shard_bytes"] == 256 << 20
    assert man["fingerprint"]["model_class"] == "LlamaForCausalLM" and man["dtype"] == "float32"
    assert all(len(s["sha256"]) == 64 for s in man["shards"])
    one = col.collect(loader, store=tmp_path / "one", progress=False, shard_bytes=1)  # one shard per batch
    assert len(one.manifest["shards"]) == 4 and torch.equal(one.load().matrix(), mem.matrix())
    assert not list((tmp_path / "s").glob("*.pkl"))
    assert man["fastinf_version"] == fastinf.__version__
    assert not list((tmp_path / "s").glob(".*")), "a temporary file was left behind"
    # estimators read the store lazily and give the same scores
    test = mem.subset(slice(0, 2))
    torch.testing.assert_close(fastinf.DataInf().fit(st).score(test), fastinf.DataInf().fit(mem).score(test))
    torch.testing.assert_close(fastinf.Exact().fit(st).self_influence(), fastinf.Exact().fit(mem).self_influence())


class Crash(Exception):
    pass


def _rows_bytes(loader, rows):
    return rows * fastinf.LoRAGradientCollector(_llama(torch.float32)).collect(loader[:1], progress=False).dim * 4


@pytest.mark.parametrize("per_shard", [1, 2])  # batches per shard (shard_bytes = the bytes of 6 rows: 2 batches)
def test_resume_after_crash_between_shards_is_bit_identical(setup, tmp_path, monkeypatch, per_shard):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    sb = 1 if per_shard == 1 else _rows_bytes(loader, 6)
    col.collect(loader, store=tmp_path / "ref", progress=False, shard_bytes=sb)
    assert len(GradientStore.open(tmp_path / "ref").manifest["shards"]) == (4 if per_shard == 1 else 2)
    real_append, calls = GradientStore.append, {"n": 0}

    def crashing_append(self, blocks, **kw):
        if calls["n"] == 2:
            raise Crash()
        calls["n"] += 1
        return real_append(self, blocks, **kw)

    monkeypatch.setattr(GradientStore, "append", crashing_append)
    with pytest.raises(Crash):
        col.collect(loader, store=tmp_path / "run", progress=False, shard_bytes=sb)
    monkeypatch.setattr(GradientStore, "append", real_append)
    with pytest.raises(StoreError, match="incomplete: 6 rows"):
        GradientStore.open(tmp_path / "run")
    partial = GradientStore.open(tmp_path / "run", allow_incomplete=True)
    assert partial.n == 6
    computed = []
    real_bg = fastinf.LoRAGradientCollector.batch_gradients
    monkeypatch.setattr(
        fastinf.LoRAGradientCollector, "batch_gradients", lambda self, b: computed.append(1) or real_bg(self, b)
    )
    col.collect(loader, store=tmp_path / "run", progress=False)  # the store remembers its shard size
    assert len(computed) == 2  # only the two missing batches were recomputed
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


@pytest.mark.parametrize("per_shard", [1, 2])
def test_resume_after_crash_inside_a_shard_write(setup, tmp_path, monkeypatch, per_shard):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    sb = 1 if per_shard == 1 else _rows_bytes(loader, 6)
    col.collect(loader, store=tmp_path / "ref", progress=False, shard_bytes=sb)
    real = store_mod.atomic_write
    state = {"shards": 0}

    def dying_write(path, data, *, durable=False):
        assert durable, "the store's writes must be fsynced"
        if path.name.startswith("shard-"):
            state["shards"] += 1
            if state["shards"] == (3 if per_shard == 1 else 2):  # killed halfway through writing a shard
                tmp = path.with_name(f".{path.name}.tmp-1")
                tmp.write_bytes(data[: len(data) // 2])
                raise Crash()
        return real(path, data, durable=durable)

    monkeypatch.setattr(store_mod, "atomic_write", dying_write)
    with pytest.raises(Crash):
        col.collect(loader, store=tmp_path / "run", progress=False, shard_bytes=sb)
    monkeypatch.setattr(store_mod, "atomic_write", real)
    col.collect(loader, store=tmp_path / "run", progress=False, shard_bytes=sb)
    files = {k: v for k, v in _files(tmp_path / "run").items() if not k.startswith(".")}
    assert files == _files(tmp_path / "ref")


def test_corruption_and_truncation_are_detected(setup, tmp_path):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    col.collect(loader, store=tmp_path / "s", progress=False, shard_bytes=1)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    st = GradientStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="shard-00001.*checksum"):
        st[st.names[0]]
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(StoreError, match="shard-00001.*truncated"):
        GradientStore.open(tmp_path / "s").verify()
    shard.unlink()
    with pytest.raises(StoreError, match="shard-00001.*missing"):
        GradientStore.open(tmp_path / "s").load()


def test_different_arguments_refuse_to_mix(setup, tmp_path):
    model, loader = setup
    fastinf.LoRAGradientCollector(model).collect(loader[:1], store=tmp_path / "s", progress=False)
    other = fastinf.LoRAGradientCollector(model, projection=16)
    with pytest.raises(StoreError, match="different arguments"):
        other.collect(loader, store=tmp_path / "s", progress=False)
    st = other.collect(loader, store=tmp_path / "s", progress=False, overwrite=True)
    assert all(d == 16 for d in st.dims.values()) and st.n == 10
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not a gradient store"):
        fastinf.LoRAGradientCollector(model).collect(loader, store=tmp_path / "junk", progress=False)
    with pytest.raises(StoreError, match="no manifest"):
        GradientStore.open(tmp_path / "junk")


def test_a_format_1_store_is_read_but_not_resumed(setup, tmp_path):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    col.collect(loader, store=tmp_path / "s", progress=False, shard_bytes=1)
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    man["format_version"] = 1  # as written before shards recorded their data
    for e in man["shards"]:
        del e["batches"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    assert GradientStore.open(tmp_path / "s").n == 10  # still readable
    with pytest.raises(StoreError, match="older fastinf.*pass overwrite=True"):
        col.collect(loader, store=tmp_path / "s", progress=False)
    assert col.collect(loader, store=tmp_path / "s", progress=False, overwrite=True).n == 10


def test_a_format_2_store_is_reused_and_resumed(setup, tmp_path, monkeypatch):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    col.collect(loader, store=tmp_path / "s", progress=False, shard_bytes=1)
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    man["format_version"] = 2  # one shard per batch, its digest in the shard's entry
    del man["shard_bytes"]
    for e in man["shards"]:
        e["data_sha256"] = e.pop("batches")[0]["data_sha256"]
    man["shards"] = man["shards"][:2]
    man["n"], man["complete"] = 6, False
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    computed = []
    real_bg = fastinf.LoRAGradientCollector.batch_gradients
    monkeypatch.setattr(
        fastinf.LoRAGradientCollector, "batch_gradients", lambda self, b: computed.append(1) or real_bg(self, b)
    )
    st = col.collect(loader, store=tmp_path / "s", progress=False)
    assert len(computed) == 2 and st.n == 10 and st.manifest["format_version"] == 3
    assert torch.equal(st.load().matrix(), col.collect(loader, progress=False).matrix())
    with pytest.raises(StoreError, match="shard 1 holds other data than batch 1"):
        col.collect([loader[0], loader[2], loader[1], loader[3]], store=tmp_path / "s", progress=False)
