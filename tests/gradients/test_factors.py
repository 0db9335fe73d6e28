"""Kronecker factors from the capture hooks (METHODS.md §11) against an independent per-token loop on
tiny peft models with padding; factors in the GradientStore: same as in memory, resumed, repaired, and
merged by a distributed capture."""

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_examples, pad_lm_batch

pytest.importorskip("peft")
pytest.importorskip("safetensors")

import fastinf  # noqa: E402
from fastinf import distributed  # noqa: E402
from fastinf.gradients.losses import DenoisingLoss, causal_lm_loss, sequence_classification_loss  # noqa: E402
from fastinf.gradients.store import GradientStore, StoreError  # noqa: E402
from fastinf.testing import lora_config, run_distributed, tiny_lora_llama, tiny_lora_roberta, tiny_unet2d  # noqa: E402


def loop_factors(model, loss_fn, singles, names):
    """Oracle: one unpadded example at a time, hooks of its own, Σ over tokens one outer product at a time.
    Also returns G_i = Σ_s δ_is x_isᵀ per block (to check that δ and x are those of the gradient rows)."""
    mods = dict(model.named_modules())
    xx = {k: 0.0 for k in names}
    dd = {k: 0.0 for k in names}
    tokens = dict.fromkeys(names, 0)
    rows = {k: [] for k in names}
    model.eval()
    for b in singles:
        seen: dict[str, dict] = {}
        hooks = []
        for k in names:
            mname = k.rsplit(".", 1)[0]
            m = mods[mname]

            def hook(mod, inp, out, mname=mname, seen=seen):
                x = inp[0].detach()
                if isinstance(mod, torch.nn.Conv2d):  # one row per output position: the unfolded patch
                    x = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                    x = x.transpose(1, 2)
                seen[mname] = {"x": x.reshape(-1, x.shape[-1]), "y": out}

            hooks.append(m.register_forward_hook(hook))
        try:
            loss = loss_fn(model, b).sum()
            ys = [v["y"] for v in seen.values()]
            dys = torch.autograd.grad(loss, ys)
        finally:
            for h in hooks:
                h.remove()
        dy = {
            m: (g.flatten(2).transpose(1, 2) if g.dim() == 4 else g).reshape(
                -1, g.shape[1] if g.dim() == 4 else g.shape[-1]
            )
            for m, g in zip(seen, dys, strict=True)
        }
        for k in names:
            mname, role = k.rsplit(".", 1)
            if ".lora_A." in mname:
                bname = mname.replace(".lora_A.", ".lora_B.")
                x = seen[mname]["x"]
                delta = dy[bname] @ mods[bname].weight.detach().reshape(dy[bname].shape[1], -1)
            else:
                x = seen[mname]["x"] if role == "weight" else torch.ones(dy[mname].shape[0], 1, dtype=torch.float64)
                delta = dy[mname]
            G = 0.0
            for s in range(x.shape[0]):  # one token at a time
                xx[k] = xx[k] + torch.outer(x[s], x[s])
                dd[k] = dd[k] + torch.outer(delta[s], delta[s])
                G = G + torch.outer(delta[s], x[s])
            tokens[k] += x.shape[0]
            rows[k].append(G.reshape(-1))
    n = len(singles)
    factors = {k: (xx[k] / tokens[k], dd[k] / n) for k in names}
    return factors, {k: torch.stack(v) for k, v in rows.items()}


def _check(got, want_factors, want_rows, grads):
    for k, (A, S) in want_factors.items():
        gA, gS = got[k]
        assert gA.shape == A.shape and gS.shape == S.shape, k
        for g, w, what in ((gA, A, "A"), (gS, S, "S")):
            assert float(w.abs().max()) > 0, f"{k}: {what} is zero (vacuous)"
            assert float((g - w).abs().max()) <= 1e-10 * float(w.abs().max()), (k, what)
        # the oracle's δ and x reproduce the stored gradient rows: the factors describe these rows
        torch.testing.assert_close(grads[k], want_rows[k], rtol=1e-9, atol=1e-12)


def test_llama_left_padding_factors_match_per_token_loop():
    model = tiny_lora_llama(dtype=torch.float64, pad_token_id=0, target_modules=["q_proj", "k_proj", "v_proj"])
    ex = lm_examples(5)
    col = fastinf.LoRAGradientCollector(model, dtype=torch.float64)
    got = col.collect([pad_lm_batch(ex[:3], "left"), pad_lm_batch(ex[3:], "left")], progress=False, factors=True)
    want, rows = loop_factors(model, causal_lm_loss, [pad_lm_batch([e], "right") for e in ex], col.block_names)
    assert set(got.factors) == set(col.block_names)
    _check(got.factors, want, rows, got)
    # the padding matters: with the pad tokens counted, A would differ
    ntok = sum(len(e[0]) for e in ex)
    assert ntok < 2 * 9 + 3 * 9  # padded positions exist in both batches


def test_roberta_with_head_and_padding_matches_per_token_loop():
    model = tiny_lora_roberta(seed=1, num_labels=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 60, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = 1
    labels = torch.tensor([0, 2, 1, 2])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    col = fastinf.LoRAGradientCollector(model, include_modules_to_save=True, dtype=torch.float64)
    heads = [k for k in col.block_names if "modules_to_save" in k]
    assert any(k.endswith("bias") for k in heads) and any(k.endswith("weight") for k in heads)
    got = col.collect([batch], progress=False, factors=True)
    L = mask.sum(1)
    singles = [
        {"input_ids": ids[i : i + 1, : L[i]], "attention_mask": mask[i : i + 1, : L[i]], "labels": labels[i : i + 1]}
        for i in range(4)
    ]
    want, rows = loop_factors(model, sequence_classification_loss, singles, col.block_names)
    _check(got.factors, want, rows, got)
    bias = [k for k in heads if k.endswith("bias")][0]
    assert torch.equal(got.factors[bias][0], torch.ones(1, 1, dtype=torch.float64))


@pytest.mark.parametrize("timesteps", [1, 2])
def test_unet_conv_and_linear_lora_factors_match_per_position_loop(timesteps):
    pytest.importorskip("diffusers")
    from peft import inject_adapter_in_model

    unet = inject_adapter_in_model(
        lora_config(["to_q", "to_v", "conv1"], r=2), tiny_unet2d(seed=3, dtype=torch.float64)
    )
    loss = DenoisingLoss(timesteps_per_example=timesteps, seed=5)
    g = torch.Generator().manual_seed(6)
    batch = {
        "pixel_values": torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64),
        "index": torch.tensor([10, 11, 12]),
        "class_labels": torch.tensor([1, 4, 7]),
    }
    col = fastinf.LoRAGradientCollector(unet, loss_fn=loss, dtype=torch.float64)
    assert any("conv1.lora_A" in n for n in col.block_names)
    got = col.collect([batch], progress=False, factors=True)
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    want, rows = loop_factors(unet, loss, singles, col.block_names)
    _check(got.factors, want, rows, got)


def test_factors_refused_with_projection_and_kept_by_views():
    model = tiny_lora_llama(target_modules=["q_proj"])
    batches = [pad_lm_batch(lm_examples(3), "right")]
    with pytest.raises(ValueError, match="projection=None"):
        fastinf.LoRAGradientCollector(model, projection=8).collect(batches, progress=False, factors=True)
    gs = fastinf.LoRAGradientCollector(model).collect(batches, progress=False, factors=True)
    assert gs.to(dtype=torch.float64).factors.keys() == gs.factors.keys()
    assert set(gs.select(gs.names[:1]).factors) == {gs.names[0]}
    assert gs.subset([0, 1]).factors is None  # a row selection is not the set the factors describe
    no = fastinf.LoRAGradientCollector(model).collect(batches, progress=False)
    assert no.factors is None
    with pytest.raises(ValueError, match="width"):
        fastinf.GradientSet(no.blocks(), factors={no.names[0]: (torch.eye(3), torch.eye(3))})


# ------------------------------------------------------------------------------------ the store
def _setup():
    torch.manual_seed(0)
    model = tiny_lora_llama(target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ex = lm_examples(14, seed=3)
    loader = [pad_lm_batch(ex[i : i + 3], "right") for i in range(0, 14, 3)]  # 5 batches, padded
    return fastinf.LoRAGradientCollector(model), loader


def _assert_same_factors(a, b, rtol=1e-12):
    assert set(a) == set(b)
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            assert float((x - y).abs().max()) <= rtol * float(y.abs().max()), k


def test_store_factors_equal_memory_resume_and_repair(tmp_path):
    col, loader = _setup()
    mem = col.collect(loader, progress=False, factors=True)
    st = col.collect(loader, store=tmp_path / "s", progress=False, factors=True, shard_bytes=1)
    assert st.has_factors and len(st.manifest["shards"]) == 5
    _assert_same_factors(GradientStore.open(tmp_path / "s").factors, mem.factors)
    # a store without factors is another capture: refused without overwrite
    with pytest.raises(StoreError, match="factors"):
        col.collect(loader, store=tmp_path / "s", progress=False)
    # interrupted after 2 shards, resumed: the same factors
    calls = []
    real = col.batch_gradients

    def dying(b, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(b, **kw)

    col.batch_gradients = dying
    with pytest.raises(KeyboardInterrupt):
        col.collect(loader, store=tmp_path / "r", progress=False, factors=True, shard_bytes=1)
    col.batch_gradients = real
    part = GradientStore.open(tmp_path / "r", allow_incomplete=True)
    assert part.n == 6 and part.factors is not None
    res = col.collect(loader, store=tmp_path / "r", progress=False, factors=True, shard_bytes=1)
    _assert_same_factors(res.factors, mem.factors)
    # a damaged shard is recomputed with its factor sums
    shard = tmp_path / "r" / res.manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # the last tensor in name order is a factor sum
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        _ = GradientStore.open(tmp_path / "r").factors
    rep = col.collect(loader, store=tmp_path / "r", progress=False, factors=True)
    _assert_same_factors(rep.factors, mem.factors)


def _dist_capture(path):
    col, loader = _setup()
    st = col.collect(loader, store=path, progress=False, factors=True, shard_bytes=1)
    f = st.factors
    return distributed.rank(), {k: (a.numpy(), s.numpy()) for k, (a, s) in f.items()}


def test_distributed_capture_merges_factor_sums(tmp_path):
    col, loader = _setup()
    mem = col.collect(loader, progress=False, factors=True)
    out = run_distributed(_dist_capture, str(tmp_path / "d"), world_size=2)
    for _, f in out:  # every rank: the factors of all 5 batches (rank 0 took 3, rank 1 took 2)
        _assert_same_factors({k: (torch.from_numpy(a), torch.from_numpy(s)) for k, (a, s) in f.items()}, mem.factors)


def test_store_factors_follow_rows_appended_after_a_read(tmp_path):
    """Reading .factors and then appending (a resumed capture on the same object) must not keep the sums of
    the earlier shards: after every flush the factors equal those of all rows written so far."""
    col, loader = _setup()
    fp = {**col.fingerprint(), "factors": True}
    st = GradientStore.create(tmp_path / "s", fp, shard_bytes=1)
    parts = [col.batch_gradients(b, factors=True) for b in loader]
    for k, (g, sums) in enumerate(parts):
        st.append(g, factors=sums)
        st.flush()
        want = col.collect(loader[: k + 1], progress=False, factors=True).factors
        _assert_same_factors(st.factors, want)
