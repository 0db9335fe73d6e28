"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastinf  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture
def fresh_seed():
    """A new random seed on every run, set as torch's global seed (CPU and CUDA): GPU tests draw fresh inputs
    and put the seed into their failure messages, so that a failure can be reproduced."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


def make_blocks(n, dims, *, seed=0, dtype=torch.float64, scale=None):
    """Random gradients with heterogeneous block scales (like LoRA A vs B blocks)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, d) in enumerate(dims.items()):
        s = scale[i] if scale is not None else 10.0 ** (-(i % 3))
        out[name] = (torch.randn(n, d, generator=g, dtype=torch.float64) * s).to(dtype)
    return fastinf.GradientSet(out)


@pytest.fixture
def small_problem():
    dims = {"l0.lora_A": 6, "l0.lora_B": 5, "head": 3}
    train = make_blocks(17, dims, seed=1)
    test = make_blocks(4, dims, seed=2)
    return train, test


def dense_inverse_scores(train, test, lam, groups):
    """Independent oracle: −Σ_groups T_g (X_gᵀX_g/n + λ_g I)⁻¹ X_gᵀ with a dense solve."""
    n = train.n
    out = torch.zeros(test.n, n, dtype=torch.float64)
    for g in groups:
        X = torch.cat([train[k].double() for k in g], 1)
        T = torch.cat([test[k].double() for k in g], 1)
        lg = lam[tuple(g)] if isinstance(lam, dict) else lam
        H = X.T @ X / n + lg * torch.eye(X.shape[1], dtype=torch.float64)
        out -= T @ torch.linalg.solve(H, X.T)
    return out


def auto_lambda(train, group, factor=0.1):
    tot = sum(float(train[k].double().pow(2).sum()) for k in group)
    return factor * tot / (train.n * sum(train.dims[k] for k in group))


@pytest.fixture(scope="module")
def setup():
    """The store tests' model and data: a tiny LoRA Llama and 4 right-padded batches (3, 3, 3, 1 examples)."""
    pytest.importorskip("peft")
    from test_collector import _llama

    model = _llama(torch.float32)
    ex = lm_examples(10, seed=3)
    loader = [pad_lm_batch(ex[i : i + 3], "right") for i in range(0, 10, 3)]
    return model, loader


def lm_examples(n, seed=0):
    """n token sequences of lengths 3..9 with their labels (the first third of each, the prompt, is -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 3 + (i * 5) % 7
        ids = torch.randint(1, 97, (L,), generator=g)
        labels = ids.clone()
        labels[: L // 3] = -100  # prompt tokens not in the loss
        out.append((ids, labels))
    return out


def pad_lm_batch(examples, side):
    """(ids, labels) pairs padded to one batch on the ``side`` ("left" or "right"), with the attention mask."""
    L = max(len(e[0]) for e in examples)
    ids = torch.zeros(len(examples), L, dtype=torch.long)
    labels = torch.full((len(examples), L), -100)
    mask = torch.zeros(len(examples), L, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        sl = slice(L - len(x), L) if side == "left" else slice(0, len(x))
        ids[i, sl], labels[i, sl], mask[i, sl] = x, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
