"""Trace-based methods: loss-table throughput and trace-GEMM scoring time.

    python bench/bench_traces.py [--quick]

1. ``fastinf.loss_table`` (adapter weights swapped in place) against a naive loop that rebuilds the
   peft model from its config for every checkpoint, on a small Llama-shaped model
   (``fastinf.testing`` size ``bench``, LoRA r = 8 on q/v): examples × checkpoints per second, and the
   ratio, in one run.
2. Scoring at n = 10⁵ training, m = 10³ query examples with T·K = 160 (T = 40 checkpoints, K = 4):
   Z0-Inf (embedding + one GEMM, with and without the Spearman weighting) and BIF (trace_cov over
   N = 160 draws), plus top-k without forming (m, n).
Rows (bench/utils.py schema) go to bench/results/bench_traces.csv (``--quick``: bench_traces_quick.csv).
Set OMP_NUM_THREADS=1 on shared CPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402
from fastinf.testing import add_lora, perturbed_adapter_states, random_lm_batches, tiny_llama  # noqa: E402
from fastinf.utils import time_fn  # noqa: E402


def bench_loss_table(quick: bool, rows: bu.RowBuilder) -> None:
    import transformers
    from peft import set_peft_model_state_dict

    from fastinf.gradients.losses import causal_lm_loss

    tmp = tempfile.mkdtemp(prefix="fastinf-bench-")
    base = tiny_llama("bench", seed=0)
    base.save_pretrained(tmp)  # the base model on disk, as in real use
    vocab = base.config.vocab_size
    del base

    def build():
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM.from_pretrained(tmp)
        return add_lora(base, ["q_proj", "v_proj"], r=8, task_type="CAUSAL_LM")

    model = build()
    T = 4 if quick else 8
    cks = perturbed_adapter_states(model, T, scale=0.01, seed=1)
    n, bs, seq = (32, 16, 32) if quick else (128, 32, 32)
    loader = random_lm_batches(vocab, n=n, seq=seq, batch_size=bs, seed=2)

    def ours():
        fastinf.loss_table(model, cks, loader, progress=False)

    def naive():  # load the base model and the adapter per checkpoint (what a per-checkpoint script does)
        for ck in cks:
            m = build()
            set_peft_model_state_dict(m, ck)
            m.eval()
            with torch.no_grad():
                for b in loader:
                    causal_lm_loss(m, b)

    t_ours, t_naive = time_fn(ours, repeats=2), time_fn(naive, repeats=2)
    shape = f"T={T} n={n} batch={bs} seq={seq}"
    for method, backend, s in (
        ("fastinf (in-place swap)", "fastinf", t_ours),
        ("naive rebuild per checkpoint", "python-loop", t_naive),
    ):
        rows.add(
            op="loss_table",
            backend=backend,
            method=method,
            shape=shape,
            dtype="float32",
            timing=s,
            baseline="naive rebuild per checkpoint",
            baseline_median_s=t_naive.median,
            speedup=t_naive.median / s.median,
            throughput=n * T / s.median,
            unit="examples*checkpoints/s",
            note=f"runs={len(s.times)}",
        )


def bench_scoring(quick: bool, rows: bu.RowBuilder) -> None:
    n, m, T, K = (20_000, 200, 40, 4) if quick else (100_000, 1_000, 40, 4)
    g = torch.Generator().manual_seed(2)
    theta = torch.cumsum(torch.randn(T, 64, generator=g, dtype=torch.float64), 0)
    Ltr = torch.randn(T, n, generator=g)
    Lte = torch.randn(T, m, generator=g)
    tr, te = fastinf.LossTrace(Ltr, theta @ theta.T), fastinf.LossTrace(Lte)
    shape = f"n={n} m={m} T={T} K={K} (T*K={T * K})"
    for wc in (False, True):
        est = fastinf.Z0Inf(neighbors=K, weight_by_correlation=wc)
        t_fit = time_fn(lambda est=est: est.fit(tr))
        s = time_fn(lambda est=est: est.score(te), repeats=2)
        rows.add(
            op="z0inf score",
            backend="fastinf",
            method=f"GEMM embedding{' + Spearman' if wc else ''}",
            shape=shape,
            dtype="float32",
            timing=s,
            throughput=2 * n * m * T * K / s.median / 1e9,
            unit="GFLOP/s (inner GEMM)",
            note=f"runs={len(s.times)}; fit {t_fit.median:.2f}s",
        )
    est = fastinf.Z0Inf(neighbors=K, weight_by_correlation=False).fit(tr)
    s = time_fn(lambda: est.topk(te, 10), repeats=2)
    rows.add(
        op="z0inf topk(10)",
        backend="fastinf",
        method="chunked, no (m, n)",
        shape=shape,
        dtype="float32",
        timing=s,
        note=f"runs={len(s.times)}",
    )
    N = T * K
    X, Y = torch.randn(N, n, generator=g), torch.randn(N, m, generator=g)
    bif = fastinf.BIF().fit(fastinf.LossTrace(X))
    s = time_fn(lambda: bif.score(fastinf.LossTrace(Y)), repeats=2)
    rows.add(
        op="bif score",
        backend="fastinf",
        method="trace_cov (torch, float64 pairwise blocks)",
        shape=f"n={n} m={m} N={N}",
        dtype="float32",
        timing=s,
        throughput=2 * n * m * N / s.median / 1e9,
        unit="GFLOP/s",
        note=f"runs={len(s.times)}",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bu.add_output_args(ap, "bench_traces", quick_help="fewer checkpoints and examples (n = 2·10⁴, m = 200)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (None: ``sys.argv[1:]``); returns the exit status."""
    return bu.run_script(build_parser(), argv, run)


def run(a: argparse.Namespace) -> int:
    rows = bu.RowBuilder(printer=bu.LinePrinter([("op", 16), ("method", 44), ("shape", 34), ("median_s", 10),
                                                 ("throughput", 10), ("unit", 24), ("speedup", 8)]))  # fmt: skip
    bench_loss_table(a.quick, rows)
    bench_scoring(a.quick, rows)
    out = bu.write_csv(rows.rows, bu.output_path(a, "bench_traces"), append=a.append)
    print(f"# wrote {len(rows.rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
