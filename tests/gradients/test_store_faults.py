"""Store sizing, storage dtype and faults: shards sized in bytes, store_dtype, an OSError while writing
(disk full), missing shards, mixing captures with other projection seeds."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("safetensors")

from test_store import _files  # noqa: E402

import fastinf  # noqa: E402
from fastinf.gradients import store as store_mod  # noqa: E402
from fastinf.gradients.store import GradientStore, StoreError, check_same_model  # noqa: E402


def test_shards_are_sized_in_bytes_and_the_manifest_is_written_once_per_shard(tmp_path, monkeypatch):
    fp = {"blocks": {"a": 4, "b": 4}, "dtype": "bfloat16"}
    st = GradientStore.create(tmp_path / "s", fp, shard_bytes=10 * 8 * 2)  # 10 rows of 8 bf16 values
    writes = []
    real = store_mod.atomic_write
    monkeypatch.setattr(store_mod, "atomic_write", lambda p, d, **kw: writes.append(p.name) or real(p, d, **kw))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(3, 8, generator=g, dtype=torch.float32).to(torch.bfloat16) for _ in range(9)]
    for r in rows:  # 27 rows: shards of 12 (the append that reaches 10 rows closes a shard), 12, then 3
        st.append({"a": r[:, :4], "b": r[:, 4:]})
    assert [e["n"] for e in st.manifest["shards"]] == [12, 12] and st.n_stored == 24
    st.mark_complete()
    shards = [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert writes == [w for s in shards for w in (s, "manifest.json")] + ["manifest.json"]  # + complete
    got = GradientStore.open(tmp_path / "s")
    assert got.dtype == torch.bfloat16 and [e["n"] for e in got.manifest["shards"]] == [12, 12, 3]
    assert torch.equal(got.load().matrix(), torch.cat(rows))
    assert [[b["n"] for b in e["batches"]] for e in got.manifest["shards"]] == [[3] * 4, [3] * 4, [3]]
    with pytest.raises(ValueError, match="shard_bytes must be a positive int"):
        GradientStore.create(tmp_path / "t", fp, shard_bytes=0)


def test_store_dtype_is_recorded_and_part_of_the_fingerprint(setup, tmp_path):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    mem = col.collect(loader, progress=False)
    st = col.collect(loader, store=tmp_path / "s", progress=False, store_dtype=torch.bfloat16)
    assert st.dtype == torch.bfloat16 and st.manifest["dtype"] == "bfloat16"
    assert st.manifest["fingerprint"]["store_dtype"] == "bfloat16" and st.manifest["fingerprint"]["dtype"] == "float32"
    assert torch.equal(st.load().matrix(), mem.matrix().to(torch.bfloat16))
    assert st.to(dtype=torch.float32).load().dtype == torch.float32
    assert col.collect(loader, store=tmp_path / "s", progress=False, store_dtype=torch.bfloat16).n == 10  # reused
    with pytest.raises(StoreError, match=r"different arguments \(differs in \['store_dtype'\]\)"):
        col.collect(loader, store=tmp_path / "s", progress=False)
    st = col.collect(loader, store=tmp_path / "s", progress=False, store_dtype=torch.float16, overwrite=True)
    assert st.dtype == torch.float16 and torch.equal(st.load().matrix(), mem.matrix().half())
    check_same_model(st, col.collect(loader, store=tmp_path / "f32", progress=False))  # same model: fine
    # the default is the gradients' dtype: the same fingerprint as a store made without store_dtype
    assert col.collect(loader, store=tmp_path / "f32", progress=False, store_dtype=torch.float32).n == 10
    with pytest.raises(TypeError, match="store_dtype must be"):
        col.collect(loader, store=tmp_path / "x", progress=False, store_dtype=torch.int8)
    with pytest.raises(ValueError, match="pass store=path"):
        col.collect(loader, progress=False, store_dtype=torch.bfloat16)


def test_float16_overflow_is_refused(tmp_path):
    st = GradientStore.create(tmp_path / "s", {"blocks": {"a": 2}, "dtype": "float32", "store_dtype": "float16"})
    with pytest.raises(ValueError, match=r"example 1 of the capture overflows the storage dtype torch.float16"):
        st.append({"a": torch.tensor([[1.0, 2.0], [1e6, 0.0]])})


@pytest.mark.parametrize("target", ["shard", "manifest"])
def test_disk_full_while_writing_leaves_a_consistent_store_that_resumes(setup, tmp_path, monkeypatch, target):
    model, loader = setup
    col = fastinf.LoRAGradientCollector(model)
    col.collect(loader, store=tmp_path / "ref", progress=False, shard_bytes=1)
    real = store_mod.atomic_write
    state = {"n": 0}

    def full_disk(path, data, *, durable=False):
        if path.name.startswith("shard-" if target == "shard" else "manifest"):
            state["n"] += 1
            if state["n"] == (2 if target == "shard" else 3):  # the second shard, or the manifest listing it
                raise OSError(28, "No space left on device")
        return real(path, data, durable=durable)

    monkeypatch.setattr(store_mod, "atomic_write", full_disk)
    want = (
        r"shard-00001\.safetensors: could not write shard 1 \(3 rows\): \[Errno 28\] No space left on device"
        if target == "shard"
        else r"manifest\.json: could not record shard 1 \(shard-00001\.safetensors, 3 rows\) in the manifest: "
        r"\[Errno 28\] No space left on device"
    )
    with pytest.raises(StoreError, match=want + r"; the store is consistent .*1 complete shards, 3 rows.*re-run"):
        col.collect(loader, store=tmp_path / "run", progress=False, shard_bytes=1)
    monkeypatch.setattr(store_mod, "atomic_write", real)
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [e["file"] for e in man["shards"]] == ["shard-00000.safetensors"] and man["n"] == 3
    assert GradientStore.open(tmp_path / "run", allow_incomplete=True).n == 3
    assert not list((tmp_path / "run").glob(".*")), "a temporary file was left behind"
    col.collect(loader, store=tmp_path / "run", progress=False)  # the rerun resumes
    assert _files(tmp_path / "run") == _files(tmp_path / "ref")


def test_a_missing_shard_is_named(setup, tmp_path):
    model, loader = setup
    fastinf.LoRAGradientCollector(model).collect(loader, store=tmp_path / "s", progress=False, shard_bytes=1)
    (tmp_path / "s" / "shard-00002.safetensors").unlink()
    st = GradientStore.open(tmp_path / "s")
    assert st.subset(slice(0, 6)).n == 6  # the rows before it still read
    with pytest.raises(StoreError, match=r"shard-00002\.safetensors: shard listed in the manifest is missing"):
        list(st.iter_chunks(4))


def test_stores_with_other_projection_seeds_do_not_mix(setup, tmp_path):
    model, loader = setup
    a = fastinf.LoRAGradientCollector(model, projection=8, projection_seed=0)
    b = fastinf.LoRAGradientCollector(model, projection=8, projection_seed=1)
    sa = a.collect(loader, store=tmp_path / "a", progress=False)
    with pytest.raises(StoreError, match=r"differs in \['projection_seed'\].*overwrite=True"):
        b.collect(loader, store=tmp_path / "a", progress=False)
    sb = b.collect(loader, store=tmp_path / "b", progress=False)
    with pytest.raises(StoreError, match="projection seed 0 vs 1"):
        check_same_model(sa, sb)
    # a shard of the other store copied in: named as foreign, with both fingerprints
    (tmp_path / "a" / "shard-00000.safetensors").write_bytes((tmp_path / "b" / "shard-00000.safetensors").read_bytes())
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: foreign shard.*fingerprint [0-9a-f]{16} vs"):
        GradientStore.open(tmp_path / "a").verify()
