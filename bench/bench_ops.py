#!/usr/bin/env python
"""Benchmark the numeric ops (``fastinf.ops``) on every available backend × dtype at realistic shapes.

Ops and shapes (the kernels issue): per-example LoRA gradients with r = 8/16 on 4096-wide layers, S = 512,
N = 16/64 (with a padding mask); DataInf's inverse sum with n = 4500, d = 65 536, m = 1…512; RRInf's row
updates with n = 300/1000/5000, m = 100, T = 1000 steps; BIF's trace correlation (issue 5) with N = 160/800
draws, n = 10⁵, m = 10³, as the full matrix and as per-query top-k (k = 10/64; the row's error is on values).
Backends: ``torch`` (the PyTorch reference, also the speed baseline), ``triton`` and ``cuda`` where they can
run; dtypes float32, bfloat16, float16.

In the same run it measures two ceilings on the same device: a large matrix product (bfloat16 and float32,
``torch.matmul``, random data) and a large device-to-device copy (bytes read + written). Each row's
``roofline_s`` = max(flop / GEMM rate of its dtype, minimal bytes / copy bandwidth) and ``frac_roofline`` =
roofline_s / median_s. ``flop`` counts the useful multiply-adds (×2); ``bytes`` counts each input read once
and each output written once. ``speedup`` is the reference's (``baseline`` = torch) median over this row's, same dtype;
``max_rel_err`` is ‖out − ref‖/‖ref‖ against the reference's output on the same inputs.

Usage::

    python bench/bench_ops.py                       # GPU: full shapes -> bench/results/bench_ops.csv
    python bench/bench_ops.py --quick               # any machine (CPU: the reference only), small shapes
                                                    #   -> bench/results/bench_ops_quick.csv
    python bench/bench_ops.py --ops datainf --dtypes bfloat16 --backends triton,cuda --out /tmp/x.csv

Timing: CUDA events around each call (host clock on CPU), after warm-up (JIT compilation and the
extension build stay out of the numbers); median, p20, p80 over at least ``--min-reps`` calls and up to
``--budget`` seconds per row. The inputs of the full shapes are far larger than L2.
"""

# No ``from __future__ import annotations``: the dataclasses below then work even when a CLI executes this file
# by path without registering it in sys.modules (dataclasses look string annotations up there).
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import utils as bu  # noqa: E402
from fastinf import ops  # noqa: E402
from fastinf.testing import rel_err  # noqa: E402
from fastinf.utils import time_fn  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    op: str
    shape: str
    flop: float
    nbytes: float
    make: Callable[[torch.dtype, torch.device], tuple]  # -> args
    call: Callable[..., object]  # call(backend, *args) -> output (tensor or tuple)


def _esize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


# -------------------------------------------------------------------------------------------------- cases
def lora_case(N: int, S: int, d: int, r: int) -> Case:
    def make(dt, dev):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(N, S, d, device=dev, generator=g).to(dt)
        dy = torch.randn(N, S, d, device=dev, generator=g).to(dt)
        A = torch.randn(r, d, device=dev, generator=g) / d**0.5
        B = torch.randn(d, r, device=dev, generator=g)
        lengths = torch.randint(S // 2, S + 1, (N,), device=dev, generator=g)
        mask = (torch.arange(S, device=dev)[None, :] < lengths[:, None]).float()  # right padding
        return x, dy, A, B, 2.0, mask

    def call(backend, x, dy, A, B, scale, mask):
        return ops.lora_per_sample_grads(x, dy, A, B, scale, mask, backend=backend)

    flop = 4.0 * N * S * r * (2 * d)  # u, v, gA, gB: four products of 2·N·S·r·d
    return Case("lora_per_sample_grads", f"N={N} S={S} d_in=d_out={d} r={r}", flop, 0.0, make, call)


def lora_bytes(c: Case, dt: torch.dtype) -> float:
    N, S, d, r = (int(p.split("=")[-1]) for p in c.shape.replace("d_in=d_out", "d").split())
    return N * S * 2 * d * _esize(dt) + N * S * 4 + N * r * 2 * d * 4


def datainf_case(n: int, d: int, m: int) -> Case:
    def make(dt, dev):
        g = torch.Generator(device=dev).manual_seed(1)
        G = (torch.randn(n, d, device=dev, generator=g) * torch.rand(n, 1, device=dev, generator=g)).to(dt)
        T = torch.randn(m, d, device=dev, generator=g).to(dt)
        lam = 0.1 * float(G[: min(n, 256)].float().pow(2).mean())
        return G, T, lam

    def call(backend, G, T, lam):
        return ops.datainf_inverse_sum(G, T, lam, backend=backend)

    return Case("datainf_inverse_sum", f"n={n} d={d} m={m}", 4.0 * n * d * m, 0.0, make, call)


def datainf_bytes(c: Case, dt: torch.dtype) -> float:
    n, d, m = (int(p.split("=")[1]) for p in c.shape.split())
    return n * d * _esize(dt) + m * d * _esize(dt) + m * d * 4


def rrinf_case(T: int, n: int, m: int, b: int = 1) -> Case:
    def make(dt, dev):
        g = torch.Generator(device=dev).manual_seed(2)
        rows = torch.randn(T * b, n, device=dev, generator=g).to(dt)
        targets = (torch.randn(T * b, m, device=dev, generator=g) * n).to(dt)
        omega = torch.zeros(n, m, device=dev)
        return rows, targets, omega, 0.01, 1e-3, b

    def call(backend, rows, targets, omega, lr, reg, bsz):
        return ops.rrinf_row_updates(rows, targets, omega, lr, reg, bsz, backend=backend)

    flop = T * b * (4.0 * n * m + 2.0 * n)  # per row: φᵀΩ (2nm), the update (2nm), ‖φ‖²
    return Case("rrinf_row_updates", f"T={T} n={n} m={m} batch={b}", flop, 0.0, make, call)


def rrinf_bytes(c: Case, dt: torch.dtype) -> float:
    T, n, m, b = (int(p.split("=")[1]) for p in c.shape.split())
    return T * b * (n + m) * _esize(dt) + 2 * n * m * 4


def trace_cov_case(N: int, n: int, m: int, k: int | None = None) -> Case:
    """BIF's −correlation of loss traces (N draws): the full (m, n) matrix, or per-query top-k (values only)."""

    def make(dt, dev):
        g = torch.Generator(device=dev).manual_seed(3)
        X = torch.randn(N, n, device=dev, generator=g)
        Y = X[:, :m] * 0.3 + torch.randn(N, m, device=dev, generator=g)
        return X.to(dt), Y.to(dt)

    def call(backend, X, Y):
        if k is None:
            return ops.trace_cov(X, Y, True, backend=backend)
        return ops.trace_cov_topk(X, Y, k, normalize=True, backend=backend)[0]

    op = "trace_cov" if k is None else "trace_cov_topk"
    return Case(op, f"N={N} n={n} m={m}" + ("" if k is None else f" k={k}"), 2.0 * N * n * m, 0.0, make, call)


def trace_cov_bytes(c: Case, dt: torch.dtype) -> float:
    p = {q.split("=")[0]: int(q.split("=")[1]) for q in c.shape.split()}
    out = p["m"] * p["k"] * 12 if "k" in p else p["m"] * p["n"] * 4
    return p["N"] * (p["n"] + p["m"]) * _esize(dt) + out


BYTES = {
    "lora_per_sample_grads": lora_bytes,
    "datainf_inverse_sum": datainf_bytes,
    "rrinf_row_updates": rrinf_bytes,
    "trace_cov": trace_cov_bytes,
    "trace_cov_topk": trace_cov_bytes,
}


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            lora_case(2, 64, 256, 8),
            datainf_case(300, 2048, 1),
            datainf_case(300, 2048, 64),
            rrinf_case(200, 300, 20),
            trace_cov_case(160, 4000, 100),
            trace_cov_case(160, 4000, 100, k=10),
        ]
    out = [lora_case(N, 512, 4096, r) for N in (16, 64) for r in (8, 16)]
    out += [datainf_case(4500, 65536, m) for m in (1, 16, 64, 128, 512)]
    out += [rrinf_case(1000, n, 100) for n in (300, 1000, 5000)]
    out += [trace_cov_case(160, 100_000, 1000), trace_cov_case(800, 100_000, 1000)]
    out += [trace_cov_case(160, 100_000, 1000, k=k) for k in (10, 64)]
    return out


# ------------------------------------------------------------------------------------------------ timing
def _time(fn: Callable[[], object], dev: torch.device, args: argparse.Namespace | None = None, **kw):
    """fastinf.utils.time_fn with this script's rule: at least ``--min-reps`` calls after ``--warmup``, more (up
    to 200) while the timed calls have used less than ``--budget`` seconds. No gc.collect between calls and no
    peak-memory probe on the CPU (its /proc reads between calls slow sub-millisecond calls by ~15 %); on a GPU
    the peak is the device's max_memory_allocated growth."""
    opts = {"warmup": 2, "repeats": 5, "budget": 1.0}
    if args is not None:
        opts = {"warmup": args.warmup, "repeats": args.min_reps, "budget": args.budget}
    opts.update(kw)
    return time_fn(fn, device=dev, max_repeats=200, memory=False, collect=False, **opts)


def measure_ceilings(dev: torch.device, quick: bool) -> dict[str, float]:
    """GEMM rate (flop/s) per dtype and copy bandwidth (bytes/s, read + write) on ``dev``; sizes in "what"."""
    out: dict = {"what": {}}
    n = 8192 if dev.type == "cuda" and not quick else (4096 if dev.type == "cuda" else 1024)
    for name, dt in DTYPES.items():
        if dev.type == "cpu" and dt != torch.float32:
            continue
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        med = _time(lambda a=a, b=b: a @ b, dev).median
        out[f"gemm_{name}"] = 2.0 * n**3 / med
        out["what"][f"gemm_{name}"] = f"{n}^3 matmul, random data"
        del a, b
    if dev.type == "cpu":  # 16-bit matmuls on CPU are not a meaningful ceiling: use the float32 rate
        out["gemm_bfloat16"] = out["gemm_float16"] = out["gemm_float32"]
        out["what"]["gemm_bfloat16"] = out["what"]["gemm_float16"] = "= the float32 rate (CPU)"
    nbytes = (1 << 30) if dev.type == "cuda" and not quick else (1 << 27)
    x = torch.empty(nbytes // 4, device=dev).uniform_()
    y = torch.empty_like(x)
    med = _time(lambda x=x, y=y: y.copy_(x), dev).median
    out["copy"] = 2.0 * nbytes / med
    out["what"]["copy"] = f"{nbytes >> 20} MiB copy, read + write"
    del x, y
    return out


# -------------------------------------------------------------------------------------------------- main
def _max_rel_err(out, ref) -> float:
    """The largest ‖o − r‖/‖r‖ over the outputs (an op may return a tuple)."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max(rel_err(o, r) for o, r in zip(outs, refs, strict=True))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default="", help="comma list of substrings of op names (default: all)")
    ap.add_argument("--backends", default="torch,triton,cuda", help="comma list (unavailable ones are skipped)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per row (after min-reps)")
    ap.add_argument("--sweep", action="store_true", help="time Triton block-size configs instead (GPU; tuning)")
    bu.add_output_args(ap, "bench_ops", quick_help="small shapes (any machine; always on a CPU)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (None: ``sys.argv[1:]``); returns the exit status."""
    return bu.run_script(build_parser(), argv, run)


def run(args: argparse.Namespace) -> int:
    bu.set_torch_threads()
    if args.sweep:
        return sweep(args)

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.quick = args.quick or dev.type == "cpu"
    out_path = bu.output_path(args, "bench_ops")
    state = ops.backends()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = []
    for b in wanted:
        if b == "torch" or (dev.type == "cuda" and state.get(b) == "available"):
            backends.append(b)
        else:
            why = state.get(b, "unknown backend") if dev.type == "cuda" else f"needs a CUDA device ({dev.type})"
            print(f"# skipping backend {b}: {why}", file=sys.stderr)
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    filt = [s.strip() for s in args.ops.split(",") if s.strip()]
    todo = [c for c in cases(args.quick) if not filt or any(f in c.op for f in filt)]

    rows = bu.RowBuilder(dev)
    print(f"# {rows.device}; {rows.version}; backends {backends}", file=sys.stderr)
    ceil = measure_ceilings(dev, args.quick)
    print(
        "# ceilings: "
        + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceil.items() if k.startswith("gemm_"))
        + f", copy {ceil['copy'] / 1e9:.0f} GB/s",
        file=sys.stderr,
    )
    for k, v in ceil.items():
        if k == "what":
            continue
        is_gemm = k.startswith("gemm")
        rows.add(
            op=f"ceiling_{k}",
            backend="torch",
            shape=ceil["what"][k],
            tflops=v / 1e12 if is_gemm else None,
            gbps=None if is_gemm else v / 1e9,
            note="measured in this run; the roofline of every row below",
        )
    for case in todo:
        for dt in dtypes:
            dname = str(dt).replace("torch.", "")
            try:
                inputs = case.make(dt, dev)
            except torch.OutOfMemoryError as e:
                print(f"# {case.op} {case.shape} {dname}: out of memory making inputs ({e})", file=sys.stderr)
                continue
            nbytes = BYTES[case.op](case, dt)
            roof = max(case.flop / ceil[f"gemm_{dname}"], nbytes / ceil["copy"])
            ref_out, ref_med = None, None
            for b in backends:
                common = dict(op=case.op, backend=b, shape=case.shape, dtype=dname, roofline_s=roof)
                common.update(gflop=case.flop / 1e9, gbytes=nbytes / 1e9)
                try:
                    out = case.call(b, *inputs)
                    if b == "torch":
                        ref_out = out
                    stats = _time(lambda b=b, c=case, a=inputs: c.call(b, *a), dev, args)
                except Exception as e:  # noqa: BLE001 - a failing backend is a result too
                    row = rows.add(**common, note=f"error: {type(e).__name__}: {str(e)[:300]}")
                    print(f"# {case.op} {case.shape} {dname} {b}: {row['note']}", file=sys.stderr)
                    continue
                med = stats.median
                if b == "torch":
                    ref_med = med
                row = rows.add(
                    **common,
                    timing=stats,
                    tflops=case.flop / med / 1e12,
                    gbps=nbytes / med / 1e9,
                    frac_roofline=roof / med,
                    baseline="torch" if ref_med else None,
                    speedup=ref_med / med if ref_med else None,
                    max_rel_err=_max_rel_err(out, ref_out) if ref_out is not None else None,
                    note=f"runs={len(stats.times)} over a {args.budget:.1f}s budget",
                )
                print(
                    f"{case.op:22s} {case.shape:34s} {dname:9s} {b:7s} {med * 1e3:10.3f} ms "
                    f"{case.flop / med / 1e12:8.2f} TFLOP/s {nbytes / med / 1e9:8.1f} GB/s "
                    f"roof {roof / med:6.1%}  x{(ref_med or med) / med:6.2f} vs torch  err {row['max_rel_err']}",
                    flush=True,
                )
            del inputs, ref_out
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    bu.write_csv(rows.rows, out_path, append=args.append)
    print(f"# wrote {len(rows.rows)} rows to {out_path}", file=sys.stderr)
    print_goals(rows.rows)
    return 0


def sweep(args) -> int:
    """Time the Triton kernels over a few block-size configs at the issue's shapes (bf16; RRInf fp32)."""
    from fastinf.kernels.datainf_inverse_sum import datainf_inverse_sum_triton
    from fastinf.kernels.lora_per_sample_grads import lora_per_sample_grads_triton
    from fastinf.kernels.rrinf_row_updates import rrinf_row_updates_triton

    dev = torch.device("cuda")
    out_path = Path(args.out) if args.out else bu.RESULTS / "bench_ops_sweep.csv"
    rows = bu.RowBuilder(dev)

    def run(case: Case, dt: torch.dtype, label: str, fn) -> None:
        common = dict(op=case.op, backend=f"triton[{label}]", shape=case.shape, dtype=str(dt)[6:])
        try:
            stats = _time(fn, dev, args)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: a result of the sweep
            row = rows.add(**common, note=f"error: {type(e).__name__}: {str(e)[:200]}")
            print(f"{case.op:22s} {label:48s} {row['note']}", flush=True)
            return
        med = stats.median
        rows.add(**common, timing=stats, tflops=case.flop / med / 1e12)
        print(f"{case.op:22s} {case.shape:30s} {label:48s} {med * 1e3:9.3f} ms {case.flop / med / 1e12:7.1f} TFLOP/s")

    bf = torch.bfloat16
    for m in (64, 512):
        case = datainf_case(4500, 65536, m)
        G, T, lam = case.make(bf, dev)
        for bm, bn, bk, w, st in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4),
                                  (128, 128, 128, 8, 2), (256, 128, 64, 8, 3)]:  # fmt: skip
            cfg = (
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st},
                {"BLOCK_M": bm, "BLOCK_D": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st},
            )
            run(case, bf, f"BM{bm} BN/BD{bn} BK{bk} w{w} s{st}",
                lambda G=G, T=T, lam=lam, cfg=cfg: datainf_inverse_sum_triton(G, T, lam, config=cfg))  # fmt: skip
        del G, T
    case = lora_case(16, 512, 4096, 16)
    args_l = case.make(bf, dev)
    for bs, bd, w, st in [
        (32, 64, 4, 3),
        (64, 64, 4, 3),
        (128, 64, 8, 3),
        (64, 128, 4, 3),
        (64, 128, 8, 2),
        (128, 32, 4, 4),
    ]:
        cfg = {"BLOCK_S": bs, "BLOCK_R": 16, "BLOCK_D": bd, "num_warps": w, "num_stages": st}
        run(case, bf, f"BS{bs} BD{bd} w{w} s{st}",
            lambda a=args_l, cfg=cfg: lora_per_sample_grads_triton(*a, config=cfg))  # fmt: skip
    del args_l
    for n in (300, 5000):
        case = rrinf_case(1000, n, 100)
        args_r = case.make(torch.float32, dev)
        bn = max(16, 1 << (n - 1).bit_length())
        for bm, w in [(1, 4), (1, 8), (1, 16), (2, 8), (4, 8)]:
            cfg = {"BLOCK_N": bn, "BLOCK_M": bm, "num_warps": w}
            run(case, torch.float32, f"BN{bn} BM{bm} w{w}",
                lambda a=args_r, cfg=cfg: rrinf_row_updates_triton(*a, config=cfg))  # fmt: skip
    bu.write_csv(rows.rows, out_path, append=args.append)
    print(f"# wrote {len(rows.rows)} sweep rows to {out_path}", file=sys.stderr)
    return 0


def print_goals(rows: list[dict]) -> None:
    """The kernels issue's speed goals, read off this run's rows (best kernel backend per row)."""

    def best(op, pred):
        got = [r for r in rows if r["op"] == op and r["backend"] != "torch" and r.get("median_s") and pred(r)]
        return got

    print("# goals (kernel rows of this run):")
    di = best("datainf_inverse_sum", lambda r: int(r["shape"].split("m=")[1]) >= 64)
    for r in di:
        print(f"#   datainf m>=64 >= 70% of roofline: {r['shape']} {r['dtype']} {r['backend']}: {r['frac_roofline']}")
    for r in best("rrinf_row_updates", lambda r: True):
        print(f"#   rrinf >= 10x torch loop: {r['shape']} {r['dtype']} {r['backend']}: x{r['speedup']}")
    for r in best("lora_per_sample_grads", lambda r: True):
        print(f"#   lora >= 2x unfused torch: {r['shape']} {r['dtype']} {r['backend']}: x{r['speedup']}")


if __name__ == "__main__":
    raise SystemExit(main())
