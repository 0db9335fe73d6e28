#!/usr/bin/env python
"""Benchmark the numeric ops (``fastinf.ops``) per backend × dtype against a measured roofline, an analytic traffic
model and an unfused baseline in the input dtype.

Ops and shapes (issues 9-10): per-example LoRA gradients with r = 16/64 on 4096-wide layers, S = 512, N = 16/64
(with a padding mask and the capture hook's u = A x given); DataInf's inverse sum with n = 4500, d = 65 536,
m = 1…512; RRInf's row updates with n = 300/1000/5000, m = 100, T = 1000 steps; BIF's trace correlation with
N = 160/800 draws, n = 10⁵, m = 10³, as the full matrix and as per-query top-k.

Rows per (op, shape, dtype):

* ``unfused``: the baseline, plain torch/cuBLAS GEMMs and bmm **in the input dtype** (no float32 upcast):
  LoRA v = dy B, gB = dyᵀ(u·w), gA = (v·w)ᵀ x (the mask folded into the small u, v; u is given, as to the
  kernels); DataInf P = T Gᵀ, C = P/((λ+‖g‖²) n), H = (T − C G)/λ. RRInf and trace_cov: the PyTorch reference
  (a per-step loop / float64 co-moments). ``speedup`` is against this row.
* ``torch`` (the PyTorch reference, float32 or wider), ``triton``, ``cuda`` where they can run.

**Traffic model.** For every op and shape, :func:`model` gives the minimum bytes (each input read once, each
output written once) and FLOPs (useful multiply-adds × 2), and the bytes and FLOPs of each plan: the kernels'
plan (``kernel``; LoRA separately for the Triton and CUDA tile widths), the plan before issue 10
(``previous``), the unfused baseline and the reference. It is printed beside every measurement, so a CPU run
already shows each plan's traffic ratio to the minimum; ``--quick`` (always on a CPU) also writes the model rows
of the full shapes (``method = traffic model``, ``throughput`` = plan bytes / minimum bytes).

**Roofline.** The same run measures a large ``torch.matmul`` per dtype and a large device copy:
``roofline_s`` = max(min FLOPs / GEMM rate of the dtype, min bytes / copy bandwidth), ``frac_roofline`` =
roofline_s / median_s. ``max_rel_err`` is ‖out − ref‖/‖ref‖ against the reference's output on the same inputs.

The CSV is written row by row (``bench/utils.py`` schema), so a timeout keeps every finished measurement; the
run ends with a summary table (op, dtype, shape, backend, ms, % of roofline, speed-up vs unfused);
``--summary CSV`` prints that table for an existing CSV (``bench/gpu_check.sh`` ends with it).

Usage::

    python bench/bench_ops.py                       # GPU: full shapes -> bench/results/bench_ops.csv
    python bench/bench_ops.py --quick               # any machine (CPU: reference and unfused rows), small shapes
                                                    #   + the full shapes' traffic model -> bench_ops_quick.csv
    python bench/bench_ops.py --ops datainf --dtypes bfloat16 --backends triton,cuda --out /tmp/x.csv
    python bench/bench_ops.py --summary bench/results/gpu/bench_ops.csv

Timing: CUDA events around each call (host clock on CPU), after warm-up (JIT compilation and the
extension build stay out of the numbers); median, p20, p80 over at least ``--min-reps`` calls and up to
``--budget`` seconds per row. The inputs of the full shapes are far larger than L2.
"""

# No ``from __future__ import annotations``: the dataclasses below then work even when a CLI executes this file
# by path without registering it in sys.modules (dataclasses look string annotations up there).
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import utils as bu  # noqa: E402
from fastinf import ops  # noqa: E402
from fastinf.kernels._common import lora_v_pieces  # noqa: E402
from fastinf.testing import rel_err  # noqa: E402
from fastinf.utils import text_table, time_fn  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNFUSED = "unfused"  # the baseline's backend name in the CSV


@dataclass
class Case:
    op: str
    shape: str
    p: dict  # the shape's numbers (N, S, ... as ints)
    make: Callable[[torch.dtype, torch.device], tuple]  # -> args
    call: Callable[..., object]  # call(backend, *args) -> output (tensor or tuple)
    unfused: Callable[..., object] | None = None  # the baseline in the input dtype (None: the reference is it)
    notes: dict = field(default_factory=dict)


def _esize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


# -------------------------------------------------------------------------------------------------- cases
def lora_unfused(x, dy, A, B, scale, mask, u):
    """v = dy B, gB = dyᵀ (u·w), gA = (v·w)ᵀ x in the input dtype (cuBLAS GEMM + bmm; w = scale·mask folded
    into the (N, S, r) factors, no copy of x or dy)."""
    w = scale if mask is None else (mask.to(x.dtype) * scale).unsqueeze(-1)
    v = dy @ B.to(x.dtype)
    return torch.bmm((v * w).transpose(1, 2), x), torch.bmm(dy.transpose(1, 2), u * w)


def lora_case(N: int, S: int, d: int, r: int) -> Case:
    def make(dt, dev):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(N, S, d, device=dev, generator=g).to(dt)
        dy = torch.randn(N, S, d, device=dev, generator=g).to(dt)
        A = (torch.randn(r, d, device=dev, generator=g) / d**0.5).to(dt)
        B = torch.randn(d, r, device=dev, generator=g).to(dt)
        lengths = torch.randint(S // 2, S + 1, (N,), device=dev, generator=g)
        mask = (torch.arange(S, device=dev)[None, :] < lengths[:, None]).float()  # right padding
        return x, dy, A, B, 2.0, mask, x @ A.T  # u = A x, as the capture hook records it

    def call(backend, x, dy, A, B, scale, mask, u):
        return ops.lora_per_sample_grads(x, dy, A, B, scale, mask, u=u, backend=backend)

    p = {"N": N, "S": S, "din": d, "dout": d, "r": r}
    return Case("lora_per_sample_grads", f"N={N} S={S} d_in=d_out={d} r={r}", p, make, call, lora_unfused)


def datainf_unfused(G, T, lam):
    """P = T Gᵀ and C G as GEMMs in the input dtype, C = P/((λ + ‖g‖²) n) rounded to it (no copy of G)."""
    n = G.shape[0]
    nsq = torch.linalg.vector_norm(G, dim=1, dtype=torch.float32).square()
    C = ((T @ G.T).float() / ((nsq + lam) * n)).to(G.dtype)
    return (T.float() - (C @ G).float()) / lam


def datainf_case(n: int, d: int, m: int) -> Case:
    def make(dt, dev):
        g = torch.Generator(device=dev).manual_seed(1)
        G = (torch.randn(n, d, device=dev, generator=g) * torch.rand(n, 1, device=dev, generator=g)).to(dt)
        T = torch.randn(m, d, device=dev, generator=g).to(dt)
        lam = 0.1 * float(G[: min(n, 256)].float().pow(2).mean())
        return G, T, lam

    def call(backend, G, T, lam):
        return ops.datainf_inverse_sum(G, T, lam, backend=backend)

    return Case("datainf_inverse_sum", f"n={n} d={d} m={m}", {"n": n, "d": d, "m": m}, make, call, datainf_unfused)


def rrinf_case(T: int, n: int, m: int, b: int = 1) -> Case:
    def make(dt, dev):
        g = torch.Generator(device=dev).manual_seed(2)
        rows = torch.randn(T * b, n, device=dev, generator=g).to(dt)
        targets = (torch.randn(T * b, m, device=dev, generator=g) * n).to(dt)
        omega = torch.zeros(n, m, device=dev)
        return rows, targets, omega, 0.01, 1e-3, b

    def call(backend, rows, targets, omega, lr, reg, bsz):
        return ops.rrinf_row_updates(rows, targets, omega, lr, reg, bsz, backend=backend)

    p = {"T": T, "n": n, "m": m, "b": b}
    return Case("rrinf_row_updates", f"T={T} n={n} m={m} batch={b}", p, make, call)


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
    p = {"N": N, "n": n, "m": m, "k": k}
    return Case(op, f"N={N} n={n} m={m}" + ("" if k is None else f" k={k}"), p, make, call)


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
    return full_cases()


def full_cases() -> list[Case]:
    """The issue's shapes, most important first (a timeout keeps the rows written so far)."""
    out = [lora_case(16, 512, 4096, 16), lora_case(64, 512, 4096, 16), lora_case(16, 512, 4096, 64)]
    out += [datainf_case(4500, 65536, m) for m in (64, 512, 1, 16, 128)]
    out += [rrinf_case(1000, n, 100) for n in (300, 1000, 5000)]
    out += [trace_cov_case(160, 100_000, 1000), trace_cov_case(800, 100_000, 1000)]
    out += [trace_cov_case(160, 100_000, 1000, k=k) for k in (10, 64)]
    return out


# ------------------------------------------------------------------------------------------ traffic model
# Plan = (bytes moved to/from device memory, flop). Tiles reused from L2 within a pass count once.


def lora_dy_tiles(r: int, f32: bool) -> dict[str, int]:
    """The d_out tile of each backend's dy pass (its v pieces cost r/tile · 4 bytes per dy element, written and
    read): Triton's ``_config`` and csrc's ``dy_tile``."""
    R = max(16, 1 << max(0, r - 1).bit_length())
    return {"triton": max(16, min(256, 8192 // R)), "cuda": 64 if f32 else 128}


DATAINF_BM = {"triton": (16, 64, 128), "cuda": (64, 64, 128)}  # m tile for m <= 16, m <= 64, above: m is padded


def _lora_model(p: dict, e: int, f32: bool) -> dict[str, tuple[float, float]]:
    N, S, din, dout, r = p["N"], p["S"], p["din"], p["dout"], p["r"]
    X, Y, U = N * S * din * e, N * S * dout * e, N * S * r * e
    V4, M4, OUT = N * S * r * 4, N * S * 4, N * r * (din + dout) * 4
    useful = 2.0 * N * S * r * (2 * dout + din)  # v = dy B, gB = dyᵀu, gA = vᵀx (u given)
    out = {"min": (X + Y + U + M4 + OUT, useful)}
    for name, ty in lora_dy_tiles(r, f32).items():
        T = -(-dout // ty)
        rt = 1 if name == "triton" else -(-r // 64)  # CUDA tiles ranks over 64 on the grid (inputs re-read)
        # v: pieces from the dy pass (written and read), or (Triton, large r) a pass of its own re-reading dy
        v_cost = 2 * T * N * S * r * 4 if name == "cuda" or lora_v_pieces(r, ty, e) else Y + V4
        glue = 2 * U + M4 + v_cost + 3 * V4 + 2 * U  # u_op; v; v, v·w; v_op w+r
        out[f"kernel ({name})"] = (rt * (X + Y) + glue + OUT, useful)
    C = -(-S // 64)
    out["previous kernel"] = (2 * (X + Y) + 2 * N * C * r * (din + dout) * 4 + M4 + OUT, useful + 2.0 * N * S * r * din)
    # unfused: v = dy B (Y + U); u·w, v·w (4U); gB = dyᵀ(u w) (Y + U + out); gA = (v w)ᵀ x (X + U + out)
    out[UNFUSED] = (2 * Y + X + 7 * U + M4 + N * r * (din + dout) * e, useful)
    # reference (float32): x, dy cast (read e, write 4), dy·mask (r+w), u, v, gB, gA read the float32 copies
    Xf, Yf = X / e * 4, Y / e * 4
    out["torch reference"] = (X + Y + Xf + Yf + 2 * Yf + 2 * Xf + 2 * Yf + OUT, useful + 2.0 * N * S * r * din)
    return out


def _datainf_model(p: dict, e: int, f32: bool) -> dict[str, tuple[float, float]]:
    n, d, m = p["n"], p["d"], p["m"]
    G, T, H, P = n * d * e, m * d * e, m * d * 4, m * n * 4
    useful = 4.0 * n * d * m
    k1 = 3 if f32 else 1  # pass 1: 3xTF32 for float32 inputs
    k2 = 3 if f32 else 2  # pass 2: hi + lo (16-bit) or 3xTF32
    out = {"min": (G + T + H, useful)}
    for name, (small, mid, big) in DATAINF_BM.items():
        bm = small if m <= 16 else (mid if m <= 64 else big)
        mp = -(-m // bm) * bm
        out[f"kernel ({name})"] = (2 * G + 2 * T + H + 4 * P, 2.0 * n * d * mp * (k1 + k2))
    mp = -(-m // 64) * 64 if m <= 64 else -(-m // 128) * 128
    out["previous kernel"] = (2 * G + 2 * T + H + 2 * P, 2.0 * n * d * mp * (k1 + (3 if f32 else 1)))
    # unfused: P (G + T + m n e), nsq (G), C (m n), C G (G + m n e + m d e), H = (T − CG)/λ (elementwise)
    out[UNFUSED] = (3 * G + 2 * T + 3 * m * n * e + 3 * m * d * e + 2 * H, useful)
    Gf = n * d * 4
    out["torch reference"] = (G + Gf + 3 * Gf + T + 3 * H, useful)  # G cast to float32, 3 reads of the copy
    return out


def _rrinf_model(p: dict, e: int, f32: bool) -> dict[str, tuple[float, float]]:
    T, n, m, b = p["T"], p["n"], p["m"], p["b"]
    rows, om = T * b * (n + m) * e, n * m * 4
    useful = T * b * (4.0 * n * m + 2.0 * n)
    return {
        "min": (rows + 2 * om, useful),
        "kernel": (rows + 2 * om, useful),
        "torch reference": (rows + 6 * T * om, useful),
    }


def _trace_model(p: dict, e: int, f32: bool) -> dict[str, tuple[float, float]]:
    N, n, m, k = p["N"], p["n"], p["m"], p["k"]
    out_b = m * k * 12 if k else m * n * 4
    useful = 2.0 * N * n * m
    return {"min": (N * (n + m) * e + out_b, useful), "kernel": (N * (n + m) * e + out_b, useful)}


MODELS = {
    "lora_per_sample_grads": _lora_model,
    "datainf_inverse_sum": _datainf_model,
    "rrinf_row_updates": _rrinf_model,
    "trace_cov": _trace_model,
    "trace_cov_topk": _trace_model,
}


def model(case: Case, dt: torch.dtype) -> dict[str, tuple[float, float]]:
    """``{"min": (bytes, flop), plan: (bytes, flop), ...}`` of ``case`` in dtype ``dt`` (see the module doc)."""
    return MODELS[case.op](case.p, _esize(dt), dt == torch.float32)


def model_lines(case: Case, dt: torch.dtype) -> list[str]:
    """One printable line per plan: bytes and FLOPs, and their ratios to the minimum."""
    mod = model(case, dt)
    b0, f0 = mod["min"]
    return [
        f"#   model {case.op} {case.shape} {str(dt)[6:]}: {plan:16s} {b / 1e9:9.4f} GB ({b / b0:5.2f}x min)"
        f" {f / 1e9:10.2f} GFLOP ({f / f0:6.2f}x min)"
        for plan, (b, f) in mod.items()
    ]


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
    ap.add_argument("--dtypes", default="bfloat16,float32,float16")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per row (after min-reps)")
    ap.add_argument("--sweep", action="store_true", help="time Triton block-size configs instead (GPU; tuning)")
    ap.add_argument("--summary", metavar="CSV", default=None, help="print the summary table of an existing CSV")
    bu.add_output_args(ap, "bench_ops", quick_help="small shapes + the full shapes' traffic model (always on a CPU)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (None: ``sys.argv[1:]``); returns the exit status."""
    return bu.run_script(build_parser(), argv, run)


class RowWriter:
    """Writes the CSV as rows come (header first; ``--append`` keeps the file's rows)."""

    def __init__(self, rows: bu.RowBuilder, path: Path, append: bool) -> None:
        self.rows, self.path, self.done = rows, path, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (append and path.exists()):
            bu.write_csv([], path)

    def flush(self) -> None:
        new = self.rows.rows[self.done :]
        if new:
            bu.write_csv(new, self.path, append=True)
            self.done = len(self.rows.rows)


def run(args: argparse.Namespace) -> int:
    if args.summary:
        with open(args.summary, newline="") as f:
            print_summary(list(csv.DictReader(f)))
        return 0
    bu.set_torch_threads()
    if args.sweep:
        return sweep(args)

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.quick = args.quick or dev.type == "cpu"
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
    out = RowWriter(rows, bu.output_path(args, "bench_ops"), args.append)
    print(f"# {rows.device}; {rows.version}; backends {backends}", file=sys.stderr)
    if args.quick:  # the full shapes' traffic model (nothing is run)
        for case in [c for c in full_cases() if not filt or any(f in c.op for f in filt)]:
            for dt in dtypes:
                add_model_rows(rows, case, dt)
                print("\n".join(model_lines(case, dt)), flush=True)
        out.flush()
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
    out.flush()
    for case in todo:
        for dt in dtypes:
            measure_case(case, dt, dev, backends, ceil, rows, args)
            out.flush()
    print(f"# wrote {out.done} rows to {out.path}", file=sys.stderr)
    print_goals(rows.rows)
    print_summary(rows.rows)
    return 0


def add_model_rows(rows: bu.RowBuilder, case: Case, dt: torch.dtype) -> None:
    mod = model(case, dt)
    b0, f0 = mod["min"]
    for plan, (b, f) in mod.items():
        if plan == "min":
            continue
        rows.add(
            op=case.op,
            backend=plan,
            method="traffic model",
            shape=case.shape,
            dtype=str(dt)[6:],
            gflop=f0 / 1e9,
            gbytes=b0 / 1e9,
            throughput=b / b0,
            unit="plan bytes / min bytes",
            note=f"plan {b / 1e9:.4f} GB, {f / 1e9:.2f} GFLOP ({f / f0:.2f}x min flop); analytic, not measured",
        )


def measure_case(case, dt, dev, backends, ceil, rows, args) -> None:
    """Time the unfused baseline and every backend on one (case, dtype); rows added in that order."""
    dname = str(dt)[6:]
    try:
        inputs = case.make(dt, dev)
    except torch.OutOfMemoryError as e:
        print(f"# {case.op} {case.shape} {dname}: out of memory making inputs ({e})", file=sys.stderr)
        return
    mod = model(case, dt)
    nbytes, flop = mod["min"]
    roof = max(flop / ceil[f"gemm_{dname}"], nbytes / ceil["copy"])
    for line in model_lines(case, dt):
        print(line, flush=True)
    plan_of = {"torch": "torch reference", UNFUSED: UNFUSED, "triton": "kernel (triton)", "cuda": "kernel (cuda)"}
    if case.op not in ("lora_per_sample_grads", "datainf_inverse_sum"):
        plan_of["triton"] = plan_of["cuda"] = "kernel"
    base_name = UNFUSED if case.unfused is not None else "torch"
    try:  # the reference's output, untimed: every row's max_rel_err is against it
        ref_out, base_med = case.call("torch", *inputs), None
    except Exception as e:  # noqa: BLE001
        ref_out, base_med = None, None
        print(f"# {case.op} {case.shape} {dname}: the reference failed: {type(e).__name__}: {e}", file=sys.stderr)
    order = ([UNFUSED] if case.unfused is not None else []) + ["torch"] + [b for b in backends if b != "torch"]
    for b in order:
        fn = (lambda a=inputs: case.unfused(*a)) if b == UNFUSED else (lambda b=b, a=inputs: case.call(b, *a))
        common = dict(op=case.op, backend=b, shape=case.shape, dtype=dname, roofline_s=roof)
        common.update(gflop=flop / 1e9, gbytes=nbytes / 1e9)
        plan = mod.get(plan_of.get(b, ""), None)
        ratio = f"plan {plan[0] / nbytes:.2f}x min bytes, {plan[1] / flop:.2f}x min flop; " if plan else ""
        try:
            res = fn()
            stats = _time(fn, dev, args)
        except Exception as e:  # noqa: BLE001 - a failing backend is a result too
            row = rows.add(**common, note=f"error: {type(e).__name__}: {str(e)[:300]}")
            print(f"# {case.op} {case.shape} {dname} {b}: {row['note']}", file=sys.stderr)
            continue
        med = stats.median
        if b == base_name:
            base_med = med
        row = rows.add(
            **common,
            timing=stats,
            tflops=flop / med / 1e12,
            gbps=nbytes / med / 1e9,
            frac_roofline=roof / med,
            baseline=base_name if base_med else None,
            baseline_median_s=base_med,
            speedup=base_med / med if base_med else None,
            max_rel_err=_max_rel_err(res, ref_out) if ref_out is not None else None,
            note=f"{ratio}runs={len(stats.times)} over a {args.budget:.1f}s budget",
        )
        print(
            f"{case.op:22s} {case.shape:34s} {dname:9s} {b:8s} {med * 1e3:10.3f} ms "
            f"{flop / med / 1e12:8.2f} TFLOP/s {nbytes / med / 1e9:8.1f} GB/s roof {roof / med:6.1%}  "
            f"x{(base_med or med) / med:6.2f} vs {base_name}  err {row['max_rel_err']}  {ratio}",
            flush=True,
        )
        del res
    del inputs, ref_out
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def print_summary(rows: list[dict]) -> None:
    """The closing table: op, dtype, shape, backend, ms, % of roofline, speed-up vs the unfused baseline."""
    body = []
    for r in rows:
        if r.get("op", "").startswith("ceiling_") or r.get("method") or not r.get("median_s"):
            continue
        frac = r.get("frac_roofline")
        body.append(
            [
                r["op"],
                r["dtype"],
                r["shape"],
                r["backend"],
                f"{float(r['median_s']) * 1e3:.3f}",
                f"{float(frac) * 100:.1f}" if frac else "",
                f"{float(r['speedup']):.2f}x vs {r['baseline']}" if r.get("speedup") else "",
            ]
        )
    print("\n# summary")
    print(text_table(["op", "dtype", "shape", "backend", "ms", "% roofline", "speed-up"], body), flush=True)


def sweep(args) -> int:
    """Time the Triton kernels over a few block-size configs at the issue's shapes (bf16; RRInf fp32)."""
    from fastinf.kernels.datainf_inverse_sum import datainf_inverse_sum_triton
    from fastinf.kernels.lora_per_sample_grads import lora_per_sample_grads_triton
    from fastinf.kernels.rrinf_row_updates import rrinf_row_updates_triton

    dev = torch.device("cuda")
    out_path = Path(args.out) if args.out else bu.RESULTS / "bench_ops_sweep.csv"
    rows = bu.RowBuilder(dev)
    out = RowWriter(rows, out_path, args.append)  # row by row: a timeout keeps what was measured

    def run(case: Case, dt: torch.dtype, label: str, fn) -> None:
        common = dict(op=case.op, backend=f"triton[{label}]", shape=case.shape, dtype=str(dt)[6:])
        try:
            stats = _time(fn, dev, args)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: a result of the sweep
            row = rows.add(**common, note=f"error: {type(e).__name__}: {str(e)[:200]}")
            out.flush()
            print(f"{case.op:22s} {label:48s} {row['note']}", flush=True)
            return
        med, flop = stats.median, model(case, dt)["min"][1]
        rows.add(**common, timing=stats, tflops=flop / med / 1e12)
        out.flush()
        print(f"{case.op:22s} {case.shape:30s} {label:48s} {med * 1e3:9.3f} ms {flop / med / 1e12:7.1f} TFLOP/s")

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
    for bs, bd, bdy, w, st in [
        (64, 128, 256, 4, 3),
        (32, 128, 256, 4, 3),
        (64, 64, 128, 4, 3),
        (64, 128, 512, 8, 3),
        (128, 128, 256, 8, 2),
        (64, 256, 256, 8, 3),
    ]:
        cfg = {"BLOCK_S": bs, "BLOCK_R": 16, "BLOCK_D": bd, "BLOCK_D_DY": bdy, "num_warps": w, "num_stages": st}
        run(case, bf, f"BS{bs} BD{bd} BDY{bdy} w{w} s{st}",
            lambda a=args_l, cfg=cfg: lora_per_sample_grads_triton(*a[:6], u=a[6], config=cfg))  # fmt: skip
    del args_l
    for n in (300, 5000):
        case = rrinf_case(1000, n, 100)
        args_r = case.make(torch.float32, dev)
        bn = max(16, 1 << (n - 1).bit_length())
        for bm, w in [(1, 4), (1, 8), (1, 16), (2, 8), (4, 8)]:
            cfg = {"BLOCK_N": bn, "BLOCK_M": bm, "num_warps": w}
            run(case, torch.float32, f"BN{bn} BM{bm} w{w}",
                lambda a=args_r, cfg=cfg: rrinf_row_updates_triton(*a, config=cfg))  # fmt: skip
    print(f"# wrote {len(rows.rows)} sweep rows to {out_path}", file=sys.stderr)
    return 0


def print_goals(rows: list[dict]) -> None:
    """Issue 10's speed goals, read off this run's rows (kernel backends)."""

    def best(op, pred):
        return [
            r for r in rows if r["op"] == op and r["backend"] in ("triton", "cuda") and r.get("median_s") and pred(r)
        ]

    print("# goals (kernel rows of this run):")
    for r in best("lora_per_sample_grads", lambda r: r["dtype"] == "bfloat16"):
        print(
            f"#   lora >= 1.5x unfused and >= 60% roofline: {r['shape']} {r['backend']}: x{r['speedup']}, "
            f"roof {r['frac_roofline']}"
        )
    for r in best("datainf_inverse_sum", lambda r: int(r["shape"].split("m=")[1]) >= 64):
        print(f"#   datainf m>=64 >= 60% of roofline: {r['shape']} {r['dtype']} {r['backend']}: {r['frac_roofline']}")
    for r in best("rrinf_row_updates", lambda r: True):
        print(f"#   rrinf >= 10x torch loop: {r['shape']} {r['dtype']} {r['backend']}: x{r['speedup']}")


if __name__ == "__main__":
    raise SystemExit(main())
