"""Library-level refusals (issue 13, "nothing silently wrong"): a store knows its data and its model,
an interrupted store is not read as if it were whole, a damaged shard is rewritten on resume, and bad
options get one clear line. Each test shows the result a wrong implementation would give."""

import json
import logging

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("safetensors")

import fastinf  # noqa: E402
from fastinf.gradients.store import GradientStore, StoreError, check_same_model  # noqa: E402
from fastinf.testing import lm_batches, tiny_lora_llama  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_lora_llama(target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # lora_B = 0 at init: give every block a non-zero gradient
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def _loader(n, *, seed=0, batch_size=4, seq=6):
    g = torch.Generator().manual_seed(seed)
    return lm_batches(torch.randint(1, 97, (n, seq), generator=g), batch_size)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _count_batches(monkeypatch):
    computed = []
    real = fastinf.LoRAGradientCollector.batch_gradients
    monkeypatch.setattr(
        fastinf.LoRAGradientCollector, "batch_gradients", lambda self, b: computed.append(1) or real(self, b)
    )
    return computed


# ------------------------------------------------------------------------------ 1. stale gradients
def test_rerun_with_fewer_rows_refuses(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    col.collect(_loader(20), store=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match=r"holds 20 rows, the data 5.*pass overwrite=True"):
        col.collect(_loader(5), store=tmp_path / "s", progress=False)
    st = col.collect(_loader(5), store=tmp_path / "s", progress=False, overwrite=True)
    assert st.n == 5


def test_rerun_with_more_rows_refuses(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    col.collect(_loader(8), store=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match=r"holds 8 rows, the data 12.*pass overwrite=True"):
        col.collect(_loader(12), store=tmp_path / "s", progress=False)


def test_rerun_with_same_count_other_text_refuses(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    col.collect(_loader(12), store=tmp_path / "s", progress=False)
    other = _loader(12)
    other[1] = _loader(12, seed=1)[1]  # batch 1 holds other text, same shapes
    with pytest.raises(StoreError, match=r"shard 0 holds other data than batch 1.*pass overwrite=True"):
        col.collect(other, store=tmp_path / "s", progress=False)  # one shard holds all three batches
    col.collect(_loader(12), store=tmp_path / "one", progress=False, shard_bytes=1)  # one shard per batch
    with pytest.raises(StoreError, match=r"shard 1 holds other data than batch 1.*pass overwrite=True"):
        col.collect(other, store=tmp_path / "one", progress=False)
    st = col.collect(other, store=tmp_path / "s", progress=False, overwrite=True)
    torch.testing.assert_close(st.load().matrix(), col.collect(other, progress=False).matrix())


def test_other_batching_is_refused_with_the_reason(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    col.collect(_loader(8, batch_size=4), store=tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match=r"shard 0 holds other data than batch 0 \(4 rows vs 8: .*another size"):
        col.collect(_loader(8, batch_size=8), store=tmp_path / "s", progress=False)


def test_a_shard_without_a_data_digest_is_not_trusted(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    loader = _loader(8)
    st = GradientStore.create(tmp_path / "s", col)
    st.append(col.batch_gradients(loader[0]))  # no data_sha256 (e.g. written by an older fastinf)
    st.flush()
    with pytest.raises(StoreError, match=r"shard 0 records no digest of its data.*pass overwrite=True"):
        col.collect(loader, store=tmp_path / "s", progress=False)


def test_batch_hash_covers_dtype_shape_and_every_key(model, tmp_path):
    from fastinf.gradients.store import batch_digest

    b = _loader(4)[0]
    d = batch_digest(b)
    assert d == batch_digest({k: v.clone() for k, v in reversed(list(b.items()))})  # key order does not matter
    assert d != batch_digest({**b, "labels": b["labels"].clone().fill_(-100)})
    assert d != batch_digest({**b, "attention_mask": b["attention_mask"].to(torch.int32)})
    assert d != batch_digest({**b, "index": torch.arange(4)})
    assert batch_digest({"x": torch.zeros(2, 3)}) != batch_digest({"x": torch.zeros(3, 2)})


def test_identical_rerun_reuses_without_recomputing(model, tmp_path, monkeypatch):
    col = fastinf.LoRAGradientCollector(model)
    col.collect(_loader(10), store=tmp_path / "s", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    computed = _count_batches(monkeypatch)
    st = col.collect(_loader(10), store=tmp_path / "s", progress=False)
    assert computed == [] and st.n == 10
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before
    man = _manifest(tmp_path / "s")
    assert len(man["shards"]) == 1 and man["n"] == 10  # 3 batches buffered into one shard
    assert [b["n"] for b in man["shards"][0]["batches"]] == [4, 4, 2]
    assert all(len(b["data_sha256"]) == 64 for b in man["shards"][0]["batches"])


def test_resume_checks_the_shards_already_written(model, tmp_path, monkeypatch):
    col = fastinf.LoRAGradientCollector(model)
    loader = _loader(12)
    col.collect(loader[:2], store=tmp_path / "s", progress=False)  # as if interrupted after 2 of 3 batches
    man = _manifest(tmp_path / "s")
    man["complete"] = False
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match=r"shard 0 holds other data than batch 0"):
        col.collect(_loader(12, seed=5), store=tmp_path / "s", progress=False)
    computed = _count_batches(monkeypatch)
    st = col.collect(loader, store=tmp_path / "s", progress=False)
    assert len(computed) == 1 and st.n == 12


# ------------------------------------------------------------------------------ 2. different models
def _two_adapters(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    col.collect(_loader(8), store=tmp_path / "train", progress=False)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    try:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(0.01)
        col.collect(_loader(4, seed=1), store=tmp_path / "test", progress=False)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
    return GradientStore.open(tmp_path / "train"), GradientStore.open(tmp_path / "test")


@pytest.mark.parametrize("method", ["datainf", "hessian_free", "exact"])
def test_estimators_refuse_stores_of_different_adapters(model, tmp_path, method):
    train, test = _two_adapters(model, tmp_path)
    est = fastinf.get_estimator(method).fit(train)
    with pytest.raises(StoreError, match=r"different adapters: [0-9a-f]{12} vs [0-9a-f]{12}.*allow_mismatch=True"):
        est.score(test)
    with pytest.raises(StoreError, match="different adapters"):
        est.topk(test, 2)
    scores = fastinf.get_estimator(method, allow_mismatch=True).fit(train).score(test)
    assert scores.shape == (4, 8)


def test_same_model_pair_passes_and_store_reads_its_fingerprint(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    a = col.collect(_loader(8), store=tmp_path / "a", progress=False)
    b = col.collect(_loader(4, seed=1), store=tmp_path / "b", progress=False)
    check_same_model(a, b)  # no error
    check_same_model(tmp_path / "a", tmp_path / "b")  # paths too
    fastinf.DataInf().fit(a).score(b)


def test_block_mismatch_is_summarised_not_listed(tmp_path):
    def store(name, nblocks, **extra):
        fp = {"blocks": {f"layer.{i}.some.long.module.name.lora_A": 3 for i in range(nblocks)}, "dtype": "float32"}
        st = GradientStore.create(tmp_path / name, {**fp, **extra})
        st.append({k: torch.randn(2, 3) for k in fp["blocks"]})
        st.mark_complete()
        return GradientStore.open(tmp_path / name)

    a, b = store("a", 26), store("b", 120)
    with pytest.raises(StoreError) as e:
        check_same_model(a, b)
    msg = str(e.value)
    assert "26 vs 120 blocks" in msg and len(msg) < 400
    c = store("c", 26, projection=16, projection_seed=0)
    with pytest.raises(StoreError, match="projection"):
        check_same_model(a, c)


# ------------------------------------------------------------------------------ 3. incomplete store
def test_open_refuses_an_incomplete_store(model, tmp_path):
    col = fastinf.LoRAGradientCollector(model)
    loader = _loader(12)
    st = GradientStore.create(tmp_path / "s", col)
    st.append(col.batch_gradients(loader[0]), data_sha256=None)
    st.flush()
    with pytest.raises(StoreError, match=r"is incomplete: 4 rows, capture not finished.*allow_incomplete=True") as e:
        GradientStore.open(tmp_path / "s")
    assert "\n" not in str(e.value)
    assert GradientStore.open(tmp_path / "s", allow_incomplete=True).n == 4


# ------------------------------------------------------------------------------ 4. damaged shard on resume
@pytest.mark.parametrize("shard_bytes", [1, None])  # one shard per batch; all three batches in one shard
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "truncate-unfinished", "foreign"])
def test_resume_rewrites_a_damaged_shard(model, tmp_path, monkeypatch, caplog, damage, shard_bytes):
    col = fastinf.LoRAGradientCollector(model)
    loader = _loader(12)
    unfinished = damage.endswith("unfinished")
    if unfinished and shard_bytes is None:
        pytest.skip("an unfinished one-shard store has no complete shard to damage")
    kw = {"progress": False, "shard_bytes": shard_bytes}
    col.collect(loader, store=tmp_path / "ref", **kw)
    ref = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    col.collect(loader[:2] if unfinished else loader, store=tmp_path / "s", **kw)
    if unfinished:  # as if interrupted after 2 of 3 batches
        man = _manifest(tmp_path / "s")
        man["complete"] = False
        (tmp_path / "s" / "manifest.json").write_text(json.dumps(man, indent=1))
    name = "shard-00001.safetensors" if shard_bytes else "shard-00000.safetensors"
    shard = tmp_path / "s" / name
    data = bytearray(shard.read_bytes())
    if damage.startswith("truncate"):
        shard.write_bytes(bytes(data[:-100]))
    elif damage == "flip":
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "foreign":  # a shard of another capture (other projection) copied over this one
        fastinf.LoRAGradientCollector(model, projection=8).collect(loader, store=tmp_path / "other", **kw)
        shard.write_bytes((tmp_path / "other" / name).read_bytes())
        with pytest.raises(StoreError, match=rf"{name}: foreign shard: written by a store of another capture"):
            GradientStore.open(tmp_path / "s").load()
    else:
        shard.unlink()
    computed = _count_batches(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fastinf"):
        st = col.collect(loader, store=tmp_path / "s", **kw)
    # only the damaged shard's batches (and the missing batch) were computed
    assert len(computed) == (1 + unfinished if shard_bytes else 3)
    assert any(name[:11] in r.getMessage() and "recomput" in r.getMessage() for r in caplog.records)
    st.verify()
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == ref


# ------------------------------------------------------------------------------ 11-13. one clear line
def test_z0inf_window_error_names_the_option():
    trace = fastinf.LossTrace(torch.randn(4, 5, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"neighbors=4.*T = 4 checkpoints.*fewer neighbors.*more checkpoints"):
        fastinf.Z0Inf(neighbors=4).fit(trace)


@pytest.mark.parametrize("method", ["datainf", "exact", "lissa", "diagonal_fisher", "rrinf", "rrinf_fixed_point"])
@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "big", True])
def test_one_damping_rule_and_message(method, bad):
    cls = fastinf.method_info(method).cls.__name__
    want = rf"^{cls}: damping must be 'auto' or a positive finite float, got "
    with pytest.raises(ValueError, match=want):
        fastinf.get_estimator(method, damping=bad)


def test_methods_without_damping_accept_and_ignore_it():
    # documented: hessian_free does not use damping; any valid value is accepted and ignored
    assert fastinf.HessianFree(damping=0.5).options.damping == 0.5
    with pytest.raises(ValueError, match=r"^HessianFree: damping must be 'auto' or a positive finite float"):
        fastinf.HessianFree(damping=-1.0)


@pytest.mark.parametrize("method", ["datainf", "exact", "lissa", "diagonal_fisher"])
def test_all_zero_blocks_are_all_named(method):
    few = fastinf.GradientSet({"a": torch.zeros(4, 3), "b": torch.zeros(4, 2), "c": torch.randn(4, 2)})
    with pytest.raises(ValueError) as e:
        fastinf.get_estimator(method, blockwise=True).fit(few)
    msg = str(e.value)
    assert "'a'" in msg and "'b'" in msg and "'c'" not in msg and "2 of 3 blocks" in msg
    many = fastinf.GradientSet({f"blk{i:02d}": torch.zeros(4, 2) for i in range(12)})
    with pytest.raises(ValueError, match=r"12 of 12 blocks.*e\.g\. 'blk00', 'blk01', 'blk02'") as e:
        fastinf.get_estimator(method).fit(many)
    assert "blk11" not in str(e.value)
