"""Trace-based methods: loss-table throughput and trace-GEMM scoring time.

    python bench/bench_traces.py [--quick]

1. ``fastinf.loss_table`` (adapter weights swapped in place) against a naive loop that rebuilds the
   peft model from its config for every checkpoint, on a small Llama-shaped model: examples ×
   checkpoints per second, and the ratio, in one run.
2. Scoring at n = 10⁵ training, m = 10³ query examples with T·K = 160 (T = 40 checkpoints, K = 4):
   Z0-Inf (embedding + one GEMM, with and without the Spearman weighting) and BIF (trace_cov over
   N = 160 draws), plus top-k without forming (m, n).
Rows go to bench/results/bench_traces.csv. Set OMP_NUM_THREADS=1 on shared CPUs.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

import fastinf  # noqa: E402


def timed(fn, repeats=3):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_loss_table(quick: bool):
    import transformers
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    cfg = transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    lcfg = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")

    import tempfile

    tmp = tempfile.mkdtemp(prefix="fastinf-bench-")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp)  # the base model on disk, as in real use

    def build():
        torch.manual_seed(0)
        return get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp), lcfg)

    model = build()
    T = 4 if quick else 8
    g = torch.Generator().manual_seed(1)
    base = get_peft_model_state_dict(model)
    cks = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    n, bs, seq = (32, 16, 32) if quick else (128, 32, 32)
    ids = torch.randint(0, 8000, (n, seq), generator=g)
    loader = [
        {"input_ids": ids[i : i + bs], "labels": ids[i : i + bs], "attention_mask": torch.ones_like(ids[i : i + bs])}
        for i in range(0, n, bs)
    ]

    def ours():
        fastinf.loss_table(model, cks, loader, progress=False)

    def naive():  # load the base model and the adapter per checkpoint (what a per-checkpoint script does)
        from fastinf.gradients.losses import causal_lm_loss

        for ck in cks:
            m = build()
            set_peft_model_state_dict(m, ck)
            m.eval()
            with torch.no_grad():
                for b in loader:
                    causal_lm_loss(m, b)

    t_ours, t_naive = timed(ours, 2), timed(naive, 2)
    work = n * T
    return [
        {
            "what": "loss_table",
            "impl": "fastinf (in-place swap)",
            "shape": f"T={T} n={n} batch={bs} seq={seq}",
            "seconds": t_ours,
            "throughput": work / t_ours,
            "unit": "examples*checkpoints/s",
            "ratio": t_naive / t_ours,
        },
        {
            "what": "loss_table",
            "impl": "naive rebuild per checkpoint",
            "shape": f"T={T} n={n} batch={bs} seq={seq}",
            "seconds": t_naive,
            "throughput": work / t_naive,
            "unit": "examples*checkpoints/s",
            "ratio": 1.0,
        },
    ]


def bench_scoring(quick: bool):
    n, m, T, K = (20_000, 200, 40, 4) if quick else (100_000, 1_000, 40, 4)
    g = torch.Generator().manual_seed(2)
    theta = torch.cumsum(torch.randn(T, 64, generator=g, dtype=torch.float64), 0)
    Ltr = torch.randn(T, n, generator=g)
    Lte = torch.randn(T, m, generator=g)
    tr, te = fastinf.LossTrace(Ltr, theta @ theta.T), fastinf.LossTrace(Lte)
    rows = []
    shape = f"n={n} m={m} T={T} K={K} (T*K={T * K})"
    for wc in (False, True):
        est = fastinf.Z0Inf(neighbors=K, weight_by_correlation=wc)
        t_fit = timed(lambda est=est: est.fit(tr), 1)
        t = timed(lambda est=est: est.score(te), 2)
        rows.append(
            {
                "what": "z0inf score",
                "impl": f"GEMM embedding{' + Spearman' if wc else ''}",
                "shape": shape,
                "seconds": t,
                "throughput": 2 * n * m * T * K / t / 1e9,
                "unit": "GFLOP/s (inner GEMM)",
                "ratio": None,
                "note": f"fit {t_fit:.2f}s",
            }
        )
    est = fastinf.Z0Inf(neighbors=K, weight_by_correlation=False).fit(tr)
    t = timed(lambda: est.topk(te, 10), 2)
    rows.append(
        {
            "what": "z0inf topk(10)",
            "impl": "chunked, no (m, n)",
            "shape": shape,
            "seconds": t,
            "throughput": None,
            "unit": "",
            "ratio": None,
        }
    )
    N = T * K
    X, Y = torch.randn(N, n, generator=g), torch.randn(N, m, generator=g)
    bif = fastinf.BIF().fit(fastinf.LossTrace(X))
    t = timed(lambda: bif.score(fastinf.LossTrace(Y)), 2)
    rows.append(
        {
            "what": "bif score",
            "impl": "trace_cov (torch, float64 pairwise blocks)",
            "shape": f"n={n} m={m} N={N}",
            "seconds": t,
            "throughput": 2 * n * m * N / t / 1e9,
            "unit": "GFLOP/s",
            "ratio": None,
        }
    )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_traces.csv"))
    a = ap.parse_args(argv)
    rows = bench_loss_table(a.quick) + bench_scoring(a.quick)
    meta = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastinf": fastinf.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
    }
    for r in rows:
        thr = "" if r.get("throughput") is None else f"{r['throughput']:.3g} {r['unit']}"
        ratio = "" if r.get("ratio") is None else f"×{r['ratio']:.2f}"
        line = f"{r['what']:<16} {r['impl']:<42} {r['shape']:<34} {r['seconds']:8.3f}s {thr:<32} {ratio}"
        print(line, r.get("note", ""))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["what", "impl", "shape", "seconds", "throughput", "unit", "ratio", "note", *meta]
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in fields if k not in meta}, **meta})
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
