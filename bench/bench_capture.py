"""Capture throughput: LoRAGradientCollector vs a per-example backward loop and a plain training step.

    python bench/bench_capture.py [--quick] [--batch 32] [--seq 32] [--repeats 3]

On a Llama-shaped model of a few million parameters (random weights, built from a config) with LoRA
on q/v, measures examples/s of (a) the per-example loop (one forward + backward per example, copying
the adapters' .grad — what the reference codes do), (b) a plain batched training step (forward +
backward + AdamW step on the adapters), (c) fastinf's capture, all on the same batches, in one run.
Writes rows to bench/results/bench_capture.csv. Set OMP_NUM_THREADS=1 on shared CPUs.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

import fastinf  # noqa: E402
from fastinf.gradients.losses import causal_lm_loss  # noqa: E402


def build(quick: bool, device: str):
    import transformers
    from peft import LoraConfig, get_peft_model

    if quick:
        cfg = transformers.LlamaConfig(
            vocab_size=2000,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=8000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).to(device)
    model = get_peft_model(
        base,
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    return model, cfg


def batches(cfg, n_batches, batch, seq, device):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
        out.append(
            {"input_ids": ids.to(device), "labels": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        )
    return out


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


def timed(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller model and batches (smoke run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_capture.csv"))
    a = ap.parse_args(argv)
    if a.quick:
        a.batch, a.seq, a.repeats = 8, 64, 2
    model, cfg = build(a.quick, a.device)
    n_params = sum(p.numel() for p in model.parameters())
    data = batches(cfg, a.batches, a.batch, a.seq, a.device)
    n_ex = a.batches * a.batch
    col = fastinf.LoRAGradientCollector(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    # warm-up
    col.collect(data[:1], progress=False)
    run_train(model, data[:1], opt)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def cap():
        col.collect(data, progress=False)
        sync()

    def train():
        run_train(model, data, opt)
        sync()

    def loop():
        run_loop(model, data, col.block_names)
        sync()

    rows = []
    res = {}
    for name, fn in (("capture", cap), ("train_step", train), ("per_example_loop", loop)):
        med, lo, hi = timed(fn, a.repeats)
        res[name] = med
        rows.append({"method": name, "examples_per_s": n_ex / med, "median_s": med, "min_s": lo, "max_s": hi})
    for r in rows:
        r["ratio_vs_train_step"] = res["train_step"] / r["median_s"]
        r["ratio_vs_loop"] = res["per_example_loop"] / r["median_s"]
    meta = {
        "model": f"Llama-shaped {n_params / 1e6:.1f}M params, LoRA r=8 on q/v ({len(col.block_names)} blocks)",
        "shape": f"batch={a.batch} seq={a.seq} batches={a.batches}",
        "device": torch.cuda.get_device_name()
        if a.device.startswith("cuda")
        else f"cpu ({platform.processor() or 'x86_64'})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastinf": fastinf.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
    }
    print(f"{meta['model']}; {meta['shape']}; {meta['device']}; torch threads {meta['threads']}")
    print(f"{'method':<18}{'examples/s':>12}{'median s':>10}{'× train step':>14}{'× loop':>8}")
    for r in rows:
        print(
            f"{r['method']:<18}{r['examples_per_s']:>12.1f}{r['median_s']:>10.3f}"
            f"{r['ratio_vs_train_step']:>14.2f}{r['ratio_vs_loop']:>8.2f}"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0].keys(), *meta.keys()])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}, **meta})
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
