"""LoRAGradientCollector vs an independent per-example autograd loop, on tiny models built from configs."""

import pytest
import torch
from conftest import lm_examples, pad_lm_batch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import inject_adapter_in_model  # noqa: E402

from fastinf import LoRAGradientCollector  # noqa: E402
from fastinf.gradients.losses import DenoisingLoss, causal_lm_loss, sequence_classification_loss  # noqa: E402
from fastinf.testing import (  # noqa: E402
    add_lora,
    lora_config,
    tiny_llama,
    tiny_lora_llama,
    tiny_lora_roberta,
    tiny_unet2d,
)


def loop_gradients(model, loss_fn, batches, names):
    """Independent oracle: one backward per example, reading parameter .grad."""
    params = dict(model.named_parameters())
    rows = {n: [] for n in names}
    model.eval()
    for b in batches:
        for p in model.parameters():
            p.grad = None
        loss = loss_fn(model, b)
        assert loss.shape == (1,)
        loss.sum().backward()
        for n in names:
            rows[n].append(params[n].grad.detach().reshape(-1).clone())
    return {n: torch.stack(v) for n, v in rows.items()}


def assert_grads_equal(got, ref, rtol):
    assert set(got.names) == set(ref)
    for n, r in ref.items():
        g = got[n].to(r.dtype)
        scale = float(r.abs().max())
        assert scale > 0, f"{n}: reference gradient is all zero (the test would be vacuous)"
        assert float((g - r).abs().max()) <= rtol * scale, (n, float((g - r).abs().max()) / scale)


def _llama(dtype):
    return tiny_lora_llama(dtype=dtype, pad_token_id=0, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.2)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_llama_gqa_left_padding_matches_loop(dtype, rtol):
    model = _llama(dtype)
    ex = lm_examples(5)
    col = LoRAGradientCollector(model, dtype=dtype)
    assert any("k_proj.lora_B" in n for n in col.block_names)  # GQA: k/v are narrower than q
    got = col.collect([pad_lm_batch(ex[:3], "left"), pad_lm_batch(ex[3:], "left")], progress=False)
    ref = loop_gradients(model, causal_lm_loss, [pad_lm_batch([e], "right") for e in ex], col.block_names)
    assert_grads_equal(got, ref, rtol)
    assert got.n == 5


def test_batch_size_and_padding_side_invariance():
    model = _llama(torch.float64)
    ex = lm_examples(6, seed=1)
    col = LoRAGradientCollector(model, dtype=torch.float64)
    a = col.collect([pad_lm_batch(ex, "left")], progress=False)
    b = col.collect([pad_lm_batch(ex[i : i + 2], "right") for i in range(0, 6, 2)], progress=False)
    for n in a.names:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-12)


def test_roberta_classifier_with_head_matches_loop():
    model = tiny_lora_roberta(seed=1, num_labels=3, dtype=torch.float64, lora_dropout=0.1)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 60, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 1
    labels = torch.tensor([0, 2, 1, 2])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    col = LoRAGradientCollector(model, include_modules_to_save=True, dtype=torch.float64)
    assert any("classifier" in n and "modules_to_save" in n for n in col.block_names)
    got = col.collect([batch], progress=False)
    singles = [
        {
            "input_ids": ids[i : i + 1, : int(mask[i].sum())],
            "attention_mask": mask[i : i + 1, : int(mask[i].sum())],
            "labels": labels[i : i + 1],
        }
        for i in range(4)
    ]
    ref = loop_gradients(model, sequence_classification_loss, singles, col.block_names)
    assert_grads_equal(got, ref, 1e-9)
    assert model.training is False or True  # state restored below
    model.train()
    col.collect([batch], progress=False)
    assert model.training  # capture switched to eval and restored train mode


def test_gpt2_conv1d_fan_in_fan_out_matches_loop():
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(2)
    base = transformers.GPT2LMHeadModel(cfg).double()
    model = add_lora(base, ["c_attn"], r=3, fan_in_fan_out=True, task_type="CAUSAL_LM")
    g = torch.Generator().manual_seed(4)
    ex = [(torch.randint(0, 50, (L,), generator=g),) * 2 for L in (5, 8, 3)]
    col = LoRAGradientCollector(model, dtype=torch.float64)
    got = col.collect([pad_lm_batch(ex, "right")], progress=False)
    ref = loop_gradients(model, causal_lm_loss, [pad_lm_batch([e], "right") for e in ex], col.block_names)
    assert_grads_equal(got, ref, 1e-9)


def _unet2d():
    pytest.importorskip("diffusers")
    unet = tiny_unet2d(seed=3, dtype=torch.float64)
    return inject_adapter_in_model(lora_config(["to_q", "to_v", "conv1"], r=2), unet)


@pytest.mark.parametrize("timesteps", [1, 2])
def test_unet2d_linear_and_conv_lora_match_loop(timesteps):
    unet = _unet2d()
    loss = DenoisingLoss(timesteps_per_example=timesteps, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    batch = {"pixel_values": x, "index": torch.tensor([10, 11, 12]), "class_labels": torch.tensor([1, 4, 7])}
    col = LoRAGradientCollector(unet, loss_fn=loss, dtype=torch.float64)
    assert any("conv1.lora_A" in n for n in col.block_names)
    got = col.collect([batch], progress=False)
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    ref = loop_gradients(unet, loss, singles, col.block_names)
    assert_grads_equal(got, ref, 1e-9)


def test_unet2d_condition_add_adapter_matches_loop():
    pytest.importorskip("diffusers")
    unet = tiny_unet2d(seed=4, dtype=torch.float64, cross_attention_dim=12)
    unet.add_adapter(lora_config(["to_q", "to_k", "to_v", "to_out.0"], r=2))
    g = torch.Generator().manual_seed(7)
    batch = {
        "pixel_values": torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(2, 3, 12, generator=g, dtype=torch.float64),
        "index": torch.tensor([0, 1]),
    }
    loss = DenoisingLoss(salt="test")
    col = LoRAGradientCollector(unet, loss_fn=loss, dtype=torch.float64)
    got = col.collect([batch], progress=False)
    ref = loop_gradients(unet, loss, [{k: v[i : i + 1] for k, v in batch.items()} for i in range(2)], col.block_names)
    assert_grads_equal(got, ref, 1e-9)


def test_denoising_noise_depends_on_index_and_salt_not_batch():
    loss_a, loss_b = DenoisingLoss(salt="train"), DenoisingLoss(salt="test")
    ta, na = loss_a._draw(3, (1, 2, 2))
    tb, nb = loss_b._draw(3, (1, 2, 2))
    assert not torch.equal(na, nb)
    assert torch.equal(loss_a._draw(3, (1, 2, 2))[1], na)


def test_projection_preserves_inner_products():
    model = _llama(torch.float64)
    ex = lm_examples(8, seed=2)
    full = LoRAGradientCollector(model, dtype=torch.float64).collect([pad_lm_batch(ex, "right")], progress=False)
    k = 2048
    proj = LoRAGradientCollector(model, dtype=torch.float64, projection=k, projection_seed=1)
    small = proj.collect([pad_lm_batch(ex, "right")], progress=False)
    assert all(d == k for d in small.dims.values())
    for n in full.names:
        G, P = full[n] @ full[n].T, small[n] @ small[n].T
        norms = full[n].norm(dim=1)
        # JL: |⟨Pu, Pv⟩ − ⟨u, v⟩| ≲ c·‖u‖‖v‖/√k (c ≈ 4 covers every pair at this size)
        assert float(((P - G).abs() / torch.outer(norms, norms)).max()) < 4 / k**0.5, n
    again = LoRAGradientCollector(model, dtype=torch.float64, projection=k, projection_seed=1)
    assert torch.equal(again.collect([pad_lm_batch(ex, "right")], progress=False)[n], small[n])  # seeded


def test_clear_errors():
    plain = tiny_llama()
    with pytest.raises(ValueError, match="no LoRA adapters"):
        LoRAGradientCollector(plain)
    model = _llama(torch.float32)
    col = LoRAGradientCollector(model)
    with pytest.raises(ValueError, match="no batches"):
        col.collect([], progress=False)
    batch = pad_lm_batch(lm_examples(2), "right")
    del batch["labels"]
    with pytest.raises(ValueError, match="labels"):
        col.collect([batch], progress=False)
    with pytest.raises(ValueError, match="no default per-example loss"):
        LoRAGradientCollector(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_denoising_fixed_timestep_grid():
    loss = DenoisingLoss(timesteps=(10, 500), seed=1)
    t, noise = loss._draw(7, (1, 2, 2))
    assert t.tolist() == [10, 500] and noise.shape == (2, 1, 2, 2) and loss.timesteps_per_example == 2
    assert not torch.equal(noise, loss._draw(8, (1, 2, 2))[1])  # noise still differs per example
    with pytest.raises(ValueError, match="timesteps"):
        DenoisingLoss(timesteps=(5000,))
