"""Distributed capture on 2 gloo CPU processes: each rank captures its share of the batches into the
same store; the merged store equals a one-process capture; a killed rank resumes."""

import json
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("safetensors")

import fastinf  # noqa: E402
from fastinf import distributed  # noqa: E402
from fastinf.gradients.store import GradientStore  # noqa: E402
from fastinf.testing import random_lm_batches, run_distributed, tiny_lora_llama  # noqa: E402


def _setup(n=22, projection_seed=0):
    torch.manual_seed(0)
    model = tiny_lora_llama(target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # lora_B = 0 at init: give every block a non-zero gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    col = fastinf.LoRAGradientCollector(model, projection=16, projection_seed=projection_seed)
    loader = random_lm_batches(model.config.vocab_size, n=n, seq=5, batch_size=4, seed=1)  # 6 batches: 4 x 5, 2
    return col, loader


def _capture(path, shard_bytes, die_after=None, seed_of_rank1=0):
    """Run on every rank: capture into ``path``; rank 1 dies (os._exit) after ``die_after`` shards."""
    col, loader = _setup(projection_seed=seed_of_rank1 if distributed.rank() == 1 else 0)
    calls = []
    real = col.batch_gradients
    col.batch_gradients = lambda b: calls.append(1) or real(b)
    if die_after is not None and distributed.rank() == 1:
        real_flush = GradientStore.flush

        def flush(self):
            real_flush(self)
            if len(self.manifest["shards"]) >= die_after:
                os._exit(3)  # killed right after a complete shard

        GradientStore.flush = flush
    st = col.collect(loader, store=path, progress=False, shard_bytes=shard_bytes)
    m = st.load().matrix().numpy()  # numpy: a tensor would travel through shared memory the worker frees
    return distributed.rank(), len(calls), st.n, m, [e["file"] for e in st.manifest["shards"]]


def _reference(tmp_path, shard_bytes=1):
    col, loader = _setup()
    return col.collect(loader, store=tmp_path / "ref", progress=False, shard_bytes=shard_bytes)


def _batches(st):
    return [b for e in st.manifest["shards"] for b in e["batches"]]


def test_two_ranks_capture_the_same_store_as_one_process(tmp_path):
    ref = _reference(tmp_path)
    out = run_distributed(_capture, str(tmp_path / "d"), 1, world_size=2)
    assert [o[0] for o in out] == [0, 1]
    assert [o[1] for o in out] == [3, 3]  # disjoint shares of the 6 batches
    for _, _, n, m, files in out:  # every rank returns the merged store
        assert n == 22 and torch.equal(torch.from_numpy(m), ref.load().matrix())
        assert files == [f"shard-r{r}of2-{i:05d}.safetensors" for r in (0, 1) for i in range(3)]
    st = GradientStore.open(tmp_path / "d")
    assert _batches(st) == _batches(ref) and st.manifest["complete"]
    assert torch.equal(st.load().matrix(), ref.load().matrix())  # byte-identical rows, same order
    # the merge keeps each rank shard's recorded sums of squares: the same per-block sums as one process
    assert all("sq_sums" in e for e in st.manifest["shards"])
    sums, want = st.block_sq_sums(), ref.block_sq_sums()
    assert set(sums) == set(want) and all(abs(sums[k] - want[k]) <= 1e-12 * want[k] for k in want)
    assert not list((tmp_path / "d").glob("part-*")) and not list((tmp_path / "d").glob(".*"))
    # a re-run on the finished store is checked (rank 0) and reused: nothing computed
    again = run_distributed(_capture, str(tmp_path / "d"), 1, world_size=2)
    assert [o[1] for o in again] == [0, 0] and torch.equal(torch.from_numpy(again[1][3]), ref.load().matrix())


def test_a_killed_rank_resumes(tmp_path):
    ref = _reference(tmp_path)
    with pytest.raises(RuntimeError, match="a rank died|rank 0 failed.*gloo"):  # or gloo sees the kill first
        run_distributed(_capture, str(tmp_path / "d"), 1, 1, world_size=2)
    part = json.loads((tmp_path / "d" / "part-r1of2.json").read_text())
    assert [e["file"] for e in part["shards"]] == ["shard-r1of2-00000.safetensors"]  # rank 1 wrote one shard
    with pytest.raises(fastinf.gradients.StoreError, match="incomplete"):
        GradientStore.open(tmp_path / "d")
    out = run_distributed(_capture, str(tmp_path / "d"), 1, world_size=2)
    assert out[1][1] == 2  # rank 1 computed only the two batches it had not stored
    st = GradientStore.open(tmp_path / "d")
    assert torch.equal(st.load().matrix(), ref.load().matrix()) and _batches(st) == _batches(ref)
    assert not list((tmp_path / "d").glob("part-*"))


def test_a_one_process_capture_resumes_on_two_ranks(tmp_path):
    ref = _reference(tmp_path, shard_bytes=1)
    col, loader = _setup()
    col.collect(loader[:2], store=tmp_path / "d", progress=False, shard_bytes=1)
    man = json.loads((tmp_path / "d" / "manifest.json").read_text())
    man["complete"] = False  # as if interrupted after 2 of 6 batches
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(man))
    out = run_distributed(_capture, str(tmp_path / "d"), 1, world_size=2)
    assert [o[1] for o in out] == [2, 2]  # the 4 batches left, split over the ranks
    assert out[0][4][:2] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    st = GradientStore.open(tmp_path / "d")
    assert torch.equal(st.load().matrix(), ref.load().matrix()) and _batches(st) == _batches(ref)


def test_ranks_with_other_projection_seeds_are_refused(tmp_path):
    with pytest.raises(
        RuntimeError, match=r"StoreError: .*ranks capture with different arguments.*projection seed 0 vs 1"
    ):
        run_distributed(_capture, str(tmp_path / "d"), 1, None, 1, world_size=2)
    assert not (tmp_path / "d").exists() or not list((tmp_path / "d").glob("shard-*"))
