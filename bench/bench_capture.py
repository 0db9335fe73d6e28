"""Capture throughput: LoRAGradientCollector vs a per-example backward loop and a plain training step.

    python bench/bench_capture.py [--quick] [--batch 32] [--seq 32] [--repeats 3]

On a Llama-shaped model of a few million parameters (random weights, built from a config:
``fastinf.testing.tiny_lora_llama("bench")``; ``--quick``: the ``small`` size) with LoRA r = 8 on q/v,
measures examples/s of (a) the per-example loop (one forward + backward per example, copying the adapters'
.grad — what the reference codes do), (b) a plain batched training step (forward + backward + AdamW step on
the adapters), (c) fastinf's capture, all on the same batches, in one run. Rows (bench/utils.py schema) go
to bench/results/bench_capture.csv (``--quick``: bench_capture_quick.csv); ``speedup`` is against the
per-example loop, the note gives the ratio to the training step. Set OMP_NUM_THREADS=1 on shared CPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402
from fastinf.gradients.losses import causal_lm_loss  # noqa: E402
from fastinf.testing import random_lm_batches, tiny_lora_llama  # noqa: E402
from fastinf.utils import text_table, time_fn  # noqa: E402


def run_loop(model, data, names):
    params = dict(model.named_parameters())
    model.eval()
    for b in data:
        for i in range(b["input_ids"].shape[0]):
            model.zero_grad(set_to_none=True)
            causal_lm_loss(model, {k: v[i : i + 1] for k, v in b.items()}).sum().backward()
            _ = [params[n].grad.detach().reshape(-1).clone() for n in names]


def run_train(model, data, opt):
    model.train()
    for b in data:
        opt.zero_grad(set_to_none=True)
        causal_lm_loss(model, b).mean().backward()
        opt.step()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bu.add_output_args(ap, "bench_capture", quick_help="smaller model and batches (smoke run)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (None: ``sys.argv[1:]``); returns the exit status."""
    return bu.run_script(build_parser(), argv, run)


def run(a: argparse.Namespace) -> int:
    if a.quick:
        a.batch, a.seq, a.repeats = 8, 64, 2
    model = tiny_lora_llama("small" if a.quick else "bench", seed=0, device=a.device, r=8, lora_alpha=16)
    n_params = sum(p.numel() for p in model.parameters())
    data = random_lm_batches(
        model.config.vocab_size, n=a.batches * a.batch, seq=a.seq, batch_size=a.batch, seed=1, device=a.device
    )
    n_ex = a.batches * a.batch
    col = fastinf.LoRAGradientCollector(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    # warm-up
    col.collect(data[:1], progress=False)
    run_train(model, data[:1], opt)

    fns = {
        "capture": ("fastinf", lambda: col.collect(data, progress=False)),
        "train_step": ("torch", lambda: run_train(model, data, opt)),
        "per_example_loop": ("python-loop", lambda: run_loop(model, data, col.block_names)),
    }
    stats = {name: time_fn(fn, device=a.device, repeats=a.repeats) for name, (_, fn) in fns.items()}
    loop, train = stats["per_example_loop"].median, stats["train_step"].median
    model_desc = f"Llama-shaped {n_params / 1e6:.1f}M params, LoRA r=8 on q/v ({len(col.block_names)} blocks)"
    rows = bu.RowBuilder(a.device)
    for name, (backend, _) in fns.items():
        s = stats[name]
        rows.add(
            op="lora_capture",
            backend=backend,
            method=name,
            shape=f"batch={a.batch} seq={a.seq} batches={a.batches}",
            dtype="float32",
            timing=s,
            baseline="per_example_loop",
            baseline_median_s=loop,
            speedup=loop / s.median,
            throughput=n_ex / s.median,
            unit="examples/s",
            note=f"runs={len(s.times)}; ratio_vs_train_step={train / s.median:.3f}; {model_desc}",
        )
    print(f"{model_desc}; batch={a.batch} seq={a.seq} batches={a.batches}; {rows.device}")
    table = [
        (name, f"{n_ex / s.median:.1f}", f"{s.median:.3f}", f"{train / s.median:.2f}", f"{loop / s.median:.2f}")
        for name, s in stats.items()
    ]
    print(text_table(["method", "examples/s", "median s", "× train step", "× loop"], table))
    out = bu.write_csv(rows.rows, bu.output_path(a, "bench_capture"), append=a.append)
    print(f"# wrote {len(rows.rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
