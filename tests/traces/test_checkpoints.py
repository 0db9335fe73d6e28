"""loss_table, checkpoint_gram and the Trainer callback on a tiny peft model."""

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

import fastinf  # noqa: E402
from fastinf.gradients.losses import sequence_classification_loss  # noqa: E402
from fastinf.testing import perturbed_adapter_states, tiny_lora_roberta  # noqa: E402


def _model():
    return tiny_lora_roberta(seed=0, num_labels=2)


def _loader():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (7, 6), generator=g)
    labels = torch.randint(0, 2, (7,), generator=g)
    return [
        {"input_ids": ids[i : i + 3], "attention_mask": torch.ones_like(ids[i : i + 3]), "labels": labels[i : i + 3]}
        for i in range(0, 7, 3)
    ]


def _perturbed_states(model, T):
    return perturbed_adapter_states(model, T, scale=0.3, seed=2, growing=True)


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


def _loop_losses(states, batches):
    """Independent per-example losses: each checkpoint loaded into a freshly built model the ordinary way
    (peft's set_peft_model_state_dict), one example per forward pass, cross-entropy of the logits."""
    out = torch.empty(len(states), sum(len(b["labels"]) for b in batches), dtype=torch.float64)
    for t, state in enumerate(states):
        fresh = _model()
        peft.set_peft_model_state_dict(fresh, state)
        fresh.eval()
        j = 0
        with torch.no_grad():
            for b in batches:
                for i in range(len(b["labels"])):
                    logits = fresh(input_ids=b["input_ids"][i : i + 1], attention_mask=b["attention_mask"][i : i + 1])
                    out[t, j] = torch.nn.functional.cross_entropy(logits.logits, b["labels"][i : i + 1]).double()
                    j += 1
    return out


def _z0inf_by_definition(theta, L_tr, L_te, K):
    """Z(i, j) = (1/T) Σ_t ⟨ĝ_t(z_i), ĝ_t(z_j)⟩ (METHODS.md §7) with explicit parameter vectors θ_t (T, D):
    ĝ_t(z) = (1/K) Σ_{s ∈ 𝒩_t} (L[t, z] − L[s, z]) (θ_t − θ_s) / ‖θ_t − θ_s‖², 𝒩_t the K nearest s ≠ t
    (ties toward the smaller s), losses centred per checkpoint over each set's examples."""
    T = theta.shape[0]

    def ghat(L):
        L = L - L.mean(1, keepdim=True)
        out = torch.zeros(T, L.shape[1], theta.shape[1], dtype=torch.float64)
        for t in range(T):
            nb = sorted(sorted((s for s in range(T) if s != t), key=lambda s: (abs(s - t), s))[:K])
            for s in nb:
                d = theta[t] - theta[s]
                out[t] += torch.outer(L[t] - L[s], d / d.dot(d)) / K
        return out

    g_tr, g_te = ghat(L_tr), ghat(L_te)
    return torch.einsum("tjd,tid->ji", g_te, g_tr) / T


def _spearman(a, b):
    """(m, n) Spearman correlations over dim 0 between the columns of b (T, m) and a (T, n), via scipy."""
    from scipy.stats import spearmanr

    n = a.shape[1]
    rho = spearmanr(torch.cat([a, b], 1).numpy()).statistic  # (n + m, n + m)
    return torch.from_numpy(rho[n:, :n])


def test_z0inf_end_to_end_from_checkpoints():
    """loss_table → checkpoint_gram → Z0Inf equals the method written out by definition on independently
    computed losses and explicit parameter vectors (not through the Gram matrix or its factorisation)."""
    pytest.importorskip("scipy")
    model = _model()
    states = _perturbed_states(model, 6)
    loader = _loader()
    L = fastinf.loss_table(model, states, loader, progress=False)
    torch.testing.assert_close(L, _loop_losses(states, loader), rtol=1e-5, atol=1e-6)
    keys = sorted(states[0])
    theta = torch.stack([torch.cat([s[k].reshape(-1).double() for k in keys]) for s in states])
    tr, te = fastinf.LossTrace(L, fastinf.checkpoint_gram(states)), fastinf.LossTrace(L[:, [5, 0, 3]])
    Z = _z0inf_by_definition(theta, L, te.losses, K=2)
    assert float(Z.abs().max()) > 0
    plain = fastinf.Z0Inf(neighbors=2, weight_by_correlation=False).fit(tr).score(te)
    assert plain.shape == (3, 7)
    torch.testing.assert_close(plain, -Z, rtol=1e-9, atol=1e-12 * float(Z.abs().max()))
    # the default weights each pair by the Spearman correlation of the raw loss trajectories
    weighted = fastinf.Z0Inf(neighbors=2).fit(tr).score(te)
    torch.testing.assert_close(weighted, -Z * _spearman(L, te.losses), rtol=1e-9, atol=1e-12 * float(Z.abs().max()))
    # query 1 is training example 0: a trajectory has correlation 1 with itself, so that pair keeps its weight
    assert float(weighted[1, 0]) == pytest.approx(float(plain[1, 0]), rel=1e-12)


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
