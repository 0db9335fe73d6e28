"""loss_table, checkpoint_gram and the Trainer callback on a tiny peft model."""

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import fastinf  # noqa: E402
from fastinf.gradients.losses import sequence_classification_loss  # noqa: E402


def _model():
    cfg = transformers.RobertaConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=24,
        num_labels=2,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    return get_peft_model(
        transformers.RobertaForSequenceClassification(cfg),
        LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False, task_type="SEQ_CLS"),
    )


def _loader():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (7, 6), generator=g)
    labels = torch.randint(0, 2, (7,), generator=g)
    return [
        {"input_ids": ids[i : i + 3], "attention_mask": torch.ones_like(ids[i : i + 3]), "labels": labels[i : i + 3]}
        for i in range(0, 7, 3)
    ]


def _perturbed_states(model, T):
    base = get_peft_model_state_dict(model)
    g = torch.Generator().manual_seed(2)
    return [{k: v + 0.3 * (t + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in range(T)]


def test_loss_table_swaps_in_place_and_matches_fresh_models(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = _perturbed_states(model, 3)
    save_file(states[1], str(tmp_path / "ck1.safetensors"))
    (tmp_path / "ck2").mkdir()
    save_file(states[2], str(tmp_path / "ck2" / "adapter_model.safetensors"))
    table = fastinf.loss_table(
        model, [states[0], tmp_path / "ck1.safetensors", tmp_path / "ck2"], _loader(), progress=False
    )
    assert table.shape == (3, 7) and table.dtype == torch.float64
    for k, v in model.state_dict().items():  # original weights restored
        assert torch.equal(v, before[k]), k
    for t in range(3):  # the same losses as a model loaded the ordinary way
        fresh = _model()
        peft.set_peft_model_state_dict(fresh, states[t])
        fresh.eval()
        with torch.no_grad():
            ref = torch.cat([sequence_classification_loss(fresh, b) for b in _loader()]).double()
        torch.testing.assert_close(table[t], ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(table[0], table[2])


def test_checkpoint_gram_streams_and_matches_dense(tmp_path):
    model = _model()
    states = _perturbed_states(model, 4)
    paths = []
    for t, s in enumerate(states):
        paths.append(tmp_path / f"c{t}.safetensors")
        save_file(s, str(paths[-1]))
    G = fastinf.checkpoint_gram(paths)
    Theta = torch.stack([torch.cat([s[k].reshape(-1).double() for k in sorted(s)]) for s in states])
    torch.testing.assert_close(G, Theta @ Theta.T)
    torch.testing.assert_close(fastinf.checkpoint_gram(states), G)
    bad = dict(states[1])
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="different tensors"):
        fastinf.checkpoint_gram([states[0], bad])


def test_z0inf_end_to_end_from_checkpoints():
    model = _model()
    states = _perturbed_states(model, 6)
    L = fastinf.loss_table(model, states, _loader(), progress=False)
    tr = fastinf.LossTrace(L, fastinf.checkpoint_gram(states))
    scores = fastinf.Z0Inf().fit(tr).score(fastinf.LossTrace(L[:, :2]))
    assert scores.shape == (2, 7) and torch.isfinite(scores).all()


class _DS(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(3, 40, (8, 6), generator=g)
        self.labels = torch.randint(0, 2, (8,), generator=g)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


def test_trainer_callback(tmp_path):
    from fastinf.integrations.transformers import CheckpointCallback

    model = _model()
    for every, expected in ((2, 4), (None, 2)):
        cb = CheckpointCallback(tmp_path / f"cks-{every}", every_n_steps=every, save_initial=True)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=2,
            num_train_epochs=2,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        transformers.Trainer(model=model, args=args, train_dataset=_DS(), callbacks=[cb]).train()
        assert len(cb.checkpoints) == expected + 1  # + the initial weights
        G = fastinf.checkpoint_gram(cb.checkpoints)
        assert G.shape == (expected + 1, expected + 1)
        L = fastinf.loss_table(model, cb.checkpoints, _loader(), progress=False)
        assert not torch.allclose(L[0], L[-1])  # training moved the adapter
    with pytest.raises(ValueError, match="every_n_steps"):
        CheckpointCallback(tmp_path, every_n_steps=0)
