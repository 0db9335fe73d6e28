#!/usr/bin/env python
"""Benchmark fastinf's estimators against per-example Python-loop baselines (MRPC-shaped gradients).

The loop baselines (``fastinf.compat.reference_loops``, also the oracles of tests/compat) are written from
the formulas of METHODS.md, following the *algorithm* (not the code) of the reference engines: the DataInf
repository's ``IFEngine`` (loops over parameter tensors × training examples: ``identity``, ``proposed`` =
DataInf, ``LiSSA`` with the flipped damping sign and 10 steps, ``accurate`` = per-tensor d_l×d_l matrix from
summed outer products + eigendecomposition, and the IF loop), and the RRInf repository's neuron-mode SGD loop
over a dense Φ (D × n). Gradients are kept in the reference layout: one dict ``{tensor_name: 1-D view}`` per
example (views into the block storage, built outside the timed region, like the references' gradient dicts).

Each fastinf measurement is ``Estimator(...).fit(train).score(test, reduce=...)`` end to end; each
baseline measurement covers the same work (test mean, damping λ, preconditioner, IF loop). Both run in
the same process on the same tensors, so their ratio (``speedup`` = baseline / fastinf) is like for like.

Usage (always with one torch thread)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_estimators.py            # default: full MRPC shape
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_estimators.py --quick    # tiny shape, seconds
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_estimators.py --methods datainf,exact --exact-blocks head

See bench/README.md for what every column means and which rows are extrapolated.
"""

# No ``from __future__ import annotations``: the dataclasses below then work even when a CLI executes this file
# by path without registering it in sys.modules (dataclasses look string annotations up there).
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402
from fastinf import GradientSet  # noqa: E402
from fastinf.compat.reference_loops import (  # noqa: E402
    example_dicts,
    loop_hvp_proposed,
    loop_if,
    loop_lambda,
    loop_method,
    loop_outer_sum,
    loop_rrinf,
    loop_solve_accurate,
    loop_val_mean,
    oracle_exact_mean,
)
from fastinf.utils import TimingStats, loadavg, time_fn  # noqa: E402

ALL_METHODS = ("identity", "datainf", "lissa", "exact", "rrinf", "datainf_pertest")


# =============================================================================== synthetic gradients
@dataclass(frozen=True)
class Shape:
    """MRPC / RoBERTa-large LoRA shape: ``layers`` × (lora_A, lora_B) of rank × width, plus a head block."""

    n: int = 3668
    m: int = 408
    layers: int = 24
    rank: int = 8
    width: int = 1024
    head: int = 2  # rows of the classifier block (head × width); 0: no head block

    def specs(self) -> list[tuple[str, int, float]]:
        """(block name, width d_l, gradient scale) in storage order."""
        out = []
        for i in range(self.layers):
            s = 1.0 + i / max(self.layers, 1)
            out.append((f"layers.{i}.lora_A", self.rank * self.width, 1e-3 * s))
            out.append((f"layers.{i}.lora_B", self.rank * self.width, 3e-3 * s))
        if self.head:
            out.append(("classifier.out_proj", self.head * self.width, 1e-2))
        if not out:
            raise ValueError("the shape has no blocks (layers = 0 and head = 0)")
        return out

    @property
    def names(self) -> list[str]:
        return [k for k, _, _ in self.specs()]

    @property
    def dim(self) -> int:
        return sum(d for _, d, _ in self.specs())

    def describe(self, blocks: list[str] | None = None, n: int | None = None, m: int | None = None) -> str:
        s = (
            f"n={self.n if n is None else n} m={self.m if m is None else m} layers={self.layers} rank={self.rank} "
            f"width={self.width} head={self.head} D={self.dim}"
        )
        if blocks is not None:
            dims = dict((k, d) for k, d, _ in self.specs())
            s += f" | blocks={','.join(short(b) for b in blocks)} d={sum(dims[b] for b in blocks)}"
        return s


def short(name: str) -> str:
    """``layers.3.lora_A`` -> ``A3``, the head -> ``head`` (the tokens of --exact-blocks)."""
    if name.startswith("layers."):
        _, i, kind = name.split(".")
        return kind[-1] + i
    return "head"


def make_gradients(shape: Shape, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[GradientSet, GradientSet]:
    """Synthetic per-example gradients with LoRA-like structure, generated block by block in place.

    Row i of block l is c_i · s_l · (z_i U_l + 0.5 ξ): a shared 32-dim latent z_i with decaying scales
    (so the Gram spectrum spans several decades), per-block directions U_l shared by train and test,
    isotropic noise ξ, a heavy-tailed per-example factor c_i (log-normal, like |p − y|) and per-block
    scales s_l (lora_B gradients larger than lora_A). Only timings and agreement are measured on them.
    """
    latent = 32
    g_u = torch.Generator().manual_seed(seed)
    decay = 1.0 / torch.arange(1, latent + 1, dtype=torch.float32)
    sets = []
    gens = [torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2)]
    zs = []
    for count, g in zip((shape.n, shape.m), gens, strict=True):
        z = torch.randn(count, latent, generator=g) * decay
        c = torch.exp(torch.randn(count, generator=g))
        zs.append((z, c))
        sets.append({})
    for name, d, scale in shape.specs():
        u = torch.randn(latent, d, generator=g_u).div_(latent**0.5)
        for (z, c), g, blocks in zip(zs, gens, sets, strict=True):
            x = torch.randn(z.shape[0], d, generator=g).mul_(0.5)
            x.addmm_(z, u)
            x.mul_((c * scale)[:, None])
            blocks[name] = x.to(dtype)
    return GradientSet(sets[0], validate=False), GradientSet(sets[1], validate=False)


# =============================================================================== measurement
def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a − b| / max |b|, Pearson r) in float64; ``b`` is the baseline."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300)
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.numel() > 1 else float("nan")
    return err, r


# =============================================================================== rows
class Report:
    """The run's rows (bench/utils.py schema), printed as they come."""

    def __init__(self, args: argparse.Namespace, shape: Shape) -> None:
        self.shape = shape
        self.builder = bu.RowBuilder(printer=bu.LinePrinter(_PRINT_COLS))
        self.rows = self.builder.rows
        self.version, self.device = self.builder.version, self.builder.device

    def add(self, **row: Any) -> dict[str, str]:
        return self.builder.add(**row)

    def pair(
        self,
        method: str,
        op: str,
        shape: str,
        fast: TimingStats,
        base: TimingStats | None,
        *,
        fast_dtype: str = "float32",
        base_dtype: str = "float32",
        baseline_median: float | None = None,
        err: tuple[float, float] | None = None,
        fast_note: str = "",
        base_note: str = "",
        base_method: str | None = None,
    ) -> None:
        """A fastinf row and (if given) its loop-baseline row; the fastinf row carries the ratio."""
        bmed = baseline_median if baseline_median is not None else (base.median if base is not None else None)
        notes = [f"runs={len(fast.times)}"]
        if err is not None:
            notes.append(f"pearson_r={err[1]:.7f}")
        if fast_note:
            notes.append(fast_note)
        if fast.extra.get("split"):
            notes.append(fast.extra["split"])
        self.add(
            method=method,
            op=op,
            backend=fastinf_backend(method),
            shape=shape,
            dtype=fast_dtype,
            timing=fast,
            baseline=(base_method or f"loop_{method}") if bmed is not None else None,
            baseline_median_s=bmed,
            speedup=bmed / fast.median if bmed is not None else None,
            max_rel_err=err[0] if err is not None else None,
            note="; ".join(notes),
        )
        if base is not None:
            self.add(
                method=base_method or f"loop_{method}",
                op=op,
                backend="python-loop",
                shape=shape,
                dtype=base_dtype,
                timing=base,
                note="; ".join([f"runs={len(base.times)}"] + ([base_note] if base_note else [])),
            )


def fastinf_backend(method: str) -> str:
    op = {"datainf": "datainf_inverse_sum", "datainf_pertest": "datainf_inverse_sum", "rrinf": "rrinf_row_updates"}
    key = op.get(method)
    if key is None:
        return "fastinf/torch"
    from fastinf.ops import _dispatch

    try:
        return f"fastinf/{_dispatch.resolve(key, 'auto', torch.device('cpu'))}"
    except Exception:  # pragma: no cover - defensive
        return "fastinf"


_PRINT_COLS = [
    ("method", 22),
    ("backend", 13),
    ("op", 24),
    ("median_s", 10),
    ("p20_s", 10),
    ("p80_s", 10),
    ("peak_mem_mb", 9),
    ("baseline_median_s", 10),
    ("speedup", 8),
    ("max_rel_err", 10),
]


# =============================================================================== cases
def measure_fit_score(
    factory: Callable[[], fastinf.Estimator], train: GradientSet, test: GradientSet, reduce: str | None, args
) -> TimingStats:
    """Time ``factory().fit(train).score(test, reduce=reduce)`` end to end; the note gets the fit/score split."""
    split: list[tuple[float, float]] = []

    def run() -> torch.Tensor:
        t0 = time.perf_counter()
        est = factory().fit(train)
        t1 = time.perf_counter()
        out = est.score(test, reduce=reduce)
        split.append((t1 - t0, time.perf_counter() - t1))
        return out

    res = time_fn(run, warmup=args.warmup, repeats=args.repeats, max_seconds=args.max_seconds)
    timed = split[-len(res.times) :]
    res.extra["split"] = (
        f"fit {np.median([a for a, _ in timed]):.3g} s + score {np.median([b for _, b in timed]):.3g} s (medians)"
    )
    return res


def case_mean(name: str, args, ctx, rep: Report) -> None:
    """identity / datainf / lissa on the mean test gradient, all blocks."""
    train, test, tr, te = ctx["train"], ctx["test"], ctx["tr"], ctx["te"]
    factories = {
        "identity": lambda: fastinf.HessianFree(),
        "datainf": lambda: fastinf.DataInf(),
        "lissa": lambda: fastinf.LiSSA(reference_compat=True, depth=args.lissa_iters),
    }
    fast = measure_fit_score(factories[name], train, test, "mean", args)
    base = time_fn(
        lambda: loop_method(name, tr, te, train.names, lissa_iters=args.lissa_iters),
        repeats=args.baseline_repeats,
        max_seconds=args.baseline_max_seconds,
    )
    label = {
        "identity": ("HessianFree()", "IFEngine identity + IF loop"),
        "datainf": ("DataInf()", "IFEngine proposed + IF loop"),
        "lissa": (
            f"LiSSA(reference_compat=True, depth={args.lissa_iters})",
            f"IFEngine LiSSA ({args.lissa_iters} it, alpha=1, flipped damping) + IF loop",
        ),
    }[name]
    rep.pair(
        name,
        "fit+score(reduce=mean)",
        rep.shape.describe(),
        fast,
        base,
        err=agreement(fast.result, base.result),
        fast_note=label[0],
        base_note=label[1],
    )


def case_datainf_pertest(args, ctx, rep: Report) -> None:
    """The full (m, n) DataInf matrix vs the generation engine's loop (per test point), extrapolated from V points."""
    train, test, tr, te = ctx["train"], ctx["test"], ctx["tr"], ctx["te"]
    names, m = train.names, test.n
    V = min(args.pertest_val, m)
    fast = measure_fit_score(lambda: fastinf.DataInf(), train, test, None, args)

    def loop_rows() -> tuple[torch.Tensor, float, float]:
        t0 = time.perf_counter()
        lams = {k: loop_lambda(tr, k) for k in names}
        t_lam = time.perf_counter() - t0
        rows = []
        for j in range(V):
            hvp = {k: loop_hvp_proposed(tr, te[j][k], k, lams[k]) for k in names}
            rows.append(loop_if(tr, hvp))
        t_all = time.perf_counter() - t0
        return torch.stack(rows), t_lam, t_all

    ext: list[float] = []  # per run: λ part + per-point part scaled to all m test points

    def timed_rows() -> torch.Tensor:
        rows, t_lam, t_all = loop_rows()
        ext.append(t_lam + (t_all - t_lam) * m / V)
        return rows

    part = time_fn(timed_rows, repeats=args.baseline_repeats, max_seconds=args.baseline_max_seconds)
    base = TimingStats(ext, part.peak_mb, part.result)
    err = agreement(fast.result[:V], base.result)
    extrap = V < m
    rep.pair(
        "datainf_pertest",
        "fit+score(m x n)",
        rep.shape.describe(),
        fast,
        base,
        err=err,
        fast_note="DataInf() reduce=None; err/corr on the first V test rows",
        base_note=(
            f"EXTRAPOLATED: IFEngineGeneration-style loop run on {V} of {m} test points "
            f"({part.median:.3g} s measured), lambda once + per-point part x{m / V:.1f}"
            if extrap
            else "IFEngineGeneration-style loop, all test points"
        ),
        base_method="loop_datainf_pertest",
    )


def parse_blocks(spec: str, shape: Shape) -> list[str]:
    names = shape.names
    if spec.strip() == "all":
        return names
    by_short = {short(k): k for k in names}
    out = []
    for tok in spec.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok not in by_short:
            raise ValueError(f"--exact-blocks: unknown block {tok!r}; use 'all' or tokens like head, A0, B3")
        out.append(by_short[tok])
    return out


def case_exact(args, ctx, rep: Report) -> None:
    """Exact(blockwise=True) per block vs the `accurate` loop (outer-product sum + eigendecomposition)."""
    train, test, tr, te, shape = ctx["train"], ctx["test"], ctx["tr"], ctx["te"], rep.shape
    n = train.n
    blocks = args.exact_blocks  # resolved by resolve_args
    variants = [("exact", None)] + ([("exact_fp32", torch.float32)] if args.exact_fp32 else [])
    per_block: dict[str, dict[str, float]] = {}  # block -> {label: fastinf median, "loop": loop median, "err": ...}
    for k in blocks:
        d = train.dims[k]
        tr_k, te_k = train.select([k]), test.select([k])
        sample = n if d <= args.accurate_max_full_d else min(n, args.accurate_sample)
        eff: list[float] = []  # per run: the loop's time, with the outer-product sum scaled to n when sampled
        outer: list[float] = []

        def loop_accurate(k=k, sample=sample, eff=eff, outer=outer) -> torch.Tensor:
            t0 = time.perf_counter()
            vbar = loop_val_mean(te, [k])
            lam = loop_lambda(tr, k)
            t1 = time.perf_counter()
            A = loop_outer_sum(tr, k, sample)
            t_outer = time.perf_counter() - t1
            if sample < n:  # the rest of Σ g gᵀ untimed, by one GEMM (the same matrix, so the numbers are checked)
                A = train[k].T @ train[k]
            t2 = time.perf_counter()
            hvp = {k: loop_solve_accurate(A, vbar[k], lam, n, args.accurate_eig)}
            del A
            IF = loop_if(tr, hvp)
            t3 = time.perf_counter()
            eff.append((t1 - t0) + t_outer * n / sample + (t3 - t2))
            outer.append(t_outer)
            return IF

        part = time_fn(loop_accurate, repeats=args.baseline_repeats, max_seconds=args.baseline_max_seconds)
        base = TimingStats(eff, part.peak_mb, part.result)
        if sample < n:
            bnote = (
                f"EXTRAPOLATED: outer-product sum timed on {sample} of {n} examples ({np.median(outer):.3g} s) and "
                f"scaled x{n / sample:.1f}; lambda, {args.accurate_eig}, hvp and IF loop timed in full "
                f"(wall time of the partial run {part.median:.3g} s)"
            )
        else:
            bnote = f"IFEngine accurate ({args.accurate_eig}, full outer-product sum) + IF loop"
        per_block[k] = {"loop": base.median}
        truth = oracle_exact_mean(train[k], test[k])
        loop_vs_truth = agreement(base.result, truth)[0]
        for label, dtype in variants:

            def fac(dtype=dtype) -> fastinf.Estimator:
                return fastinf.Exact(blockwise=True, dtype=dtype) if dtype else fastinf.Exact(blockwise=True)

            fast = measure_fit_score(fac, tr_k, te_k, "mean", args)
            err = agreement(fast.result, base.result)
            per_block[k][label] = fast.median
            per_block[k]["err_" + label] = err[0]
            solve = "n-space (push-through)" if d > n else "d-space"
            rep.pair(
                label,
                "fit+score(reduce=mean)",
                shape.describe([k]),
                fast,
                base if label == "exact" else None,
                fast_dtype="float32->float64" if dtype is None else "float32",
                baseline_median=base.median,
                err=err,
                fast_note=(
                    f"Exact(blockwise=True{', dtype=float32' if dtype else ''}), {solve} solve, block {short(k)}; "
                    f"rel err vs float64 dense solve: fastinf {agreement(fast.result, truth)[0]:.1e}, "
                    f"loop {loop_vs_truth:.1e}"
                ),
                base_note=bnote,
                base_method="loop_accurate",
            )
    # whole-model estimate from per-block medians: every lora block has the same width, hence the same cost
    lora = [k for k in per_block if k.startswith("layers.")]
    missing = [k for k in shape.names if k not in per_block]
    if not (missing and lora and all(k.startswith("layers.") for k in missing)):
        return
    note = (
        f"EXTRAPOLATED whole model: measured blocks {','.join(short(k) for k in per_block)} + {len(missing)} "
        "unmeasured lora blocks x median measured lora-block time; nothing was run at this size"
    )

    def total(key: str) -> float:
        return sum(v[key] for v in per_block.values()) + len(missing) * float(
            np.median([per_block[k][key] for k in lora])
        )

    loop_total = total("loop")
    for label, dtype in variants:
        val = total(label)
        rep.add(
            method=label,
            op="fit+score(reduce=mean)",
            backend="fastinf/torch",
            shape=shape.describe(shape.names),
            dtype="float32->float64" if dtype is None else "float32",
            median_s=val,
            baseline="loop_accurate",
            baseline_median_s=loop_total,
            speedup=loop_total / val,
            max_rel_err=max(v["err_" + label] for v in per_block.values()),
            note=note,
        )
    rep.add(
        method="loop_accurate",
        op="fit+score(reduce=mean)",
        backend="python-loop",
        shape=shape.describe(shape.names),
        dtype="float32",
        median_s=loop_total,
        note=note,
    )


def case_rrinf(args, ctx, rep: Report) -> None:
    """RRInf neuron mode (T iterations) vs the reference-style loop over a dense Φ, same drawn coordinates."""
    train, test, te = ctx["train"], ctx["test"], ctx["te"]
    names, n, D = train.names, train.n, train.dim

    def fac():
        return fastinf.RRInf(iters=args.rrinf_iters, seed=args.seed)

    fast = measure_fit_score(fac, train, test, "mean", args)
    coords = torch.randint(D, (args.rrinf_iters,), generator=torch.Generator().manual_seed(args.seed))
    fitted = fac().fit(train)
    same = hasattr(fitted, "coords_") and torch.equal(fitted.coords_.cpu(), coords)
    del fitted
    # Φ (D × n) built outside the timed region, as the reference times exclude building it
    Phi = torch.empty(D, n, dtype=train.dtype)
    off = 0
    for k in names:
        d = train.dims[k]
        Phi[off : off + d] = train[k].T
        off += d
    clist = coords.tolist()
    base = time_fn(
        functools.partial(loop_rrinf, Phi, te, names, clist, 0.01),
        repeats=args.baseline_repeats,
        max_seconds=args.baseline_max_seconds,
    )
    del Phi
    gc.collect()
    err = agreement(fast.result, base.result) if same else None
    rep.pair(
        "rrinf",
        "fit+score(reduce=mean)",
        rep.shape.describe(),
        fast,
        base,
        err=err,
        fast_note=f"RRInf(iters={args.rrinf_iters}, neuron, lr=0.01, seed={args.seed})"
        + ("" if same else "; draws differ from the loop's: timing only"),
        base_note="neuron-mode loop on a dense Phi (D x n, built untimed as in the reference); same draws"
        if same
        else "neuron-mode loop on a dense Phi (built untimed); own draws",
    )


# =============================================================================== main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    d = Shape()
    p.add_argument("--n", type=int, default=None, help=f"training examples (default {d.n}; --quick: 256)")
    p.add_argument("--m", type=int, default=None, help=f"test examples (default {d.m}; --quick: 32)")
    p.add_argument("--layers", type=int, default=None, help=f"LoRA layers (default {d.layers}; --quick: 2)")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank (default {d.rank}; --quick: 8)")
    p.add_argument("--width", type=int, default=None, help=f"hidden width (default {d.width}; --quick: 128)")
    p.add_argument("--head", type=int, default=None, help=f"rows of the classifier block, 0: none (default {d.head})")
    p.add_argument("--repeats", type=int, default=None, help="timed fastinf runs per case (default 5; --quick: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed fastinf runs before timing (default 1)")
    p.add_argument("--baseline-repeats", type=int, default=None, help="timed loop runs (default 3)")
    p.add_argument(
        "--baseline-max-seconds",
        type=float,
        default=30.0,
        help="no new loop-baseline run starts after this many seconds (30): slow loops run once",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="no new run of a measurement starts after this many seconds, warm-up included (60)",
    )
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma list from {','.join(ALL_METHODS)}")
    p.add_argument(
        "--exact-blocks",
        default=None,
        help="blocks for exact/accurate: 'all' or tokens head,A0,B0,... (default head,A0; --quick: all)",
    )
    p.add_argument("--no-exact-fp32", dest="exact_fp32", action="store_false", help="skip Exact(dtype=float32) rows")
    p.add_argument(
        "--accurate-max-full-d",
        type=int,
        default=4096,
        help="blocks wider than this time the loop outer-product sum on --accurate-sample examples and scale (4096)",
    )
    p.add_argument("--accurate-sample", type=int, default=64, help="examples timed for wide blocks' outer sum (64)")
    p.add_argument(
        "--accurate-eig",
        choices=("eigh", "eig"),
        default="eigh",
        help="eigendecomposition of the loop baseline: eigh (correct) or eig (the DataInf code's choice)",
    )
    p.add_argument("--lissa-iters", type=int, default=10, help="LiSSA steps (reference: 10)")
    p.add_argument("--rrinf-iters", type=int, default=1000, help="RRInf SGD steps (reference: 1000)")
    p.add_argument("--pertest-val", type=int, default=2, help="test points the per-test loop runs on (default 2)")
    p.add_argument("--seed", type=int, default=0)
    bu.add_output_args(p, "bench_estimators", quick_help="tiny shape (n=256, m=32, 2 layers, width 128): seconds")
    return p


def resolve_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[argparse.Namespace, Shape]:
    """Fill the --quick / full defaults and validate (a bad value: ``parser.error``, exit status 2)."""
    q = args.quick
    base = Shape(n=256, m=32, layers=2, rank=8, width=128, head=2) if q else Shape()
    shape = Shape(
        n=args.n or base.n,
        m=args.m or base.m,
        layers=base.layers if args.layers is None else args.layers,
        rank=args.rank or base.rank,
        width=args.width or base.width,
        head=base.head if args.head is None else args.head,
    )
    if args.repeats is None:
        args.repeats = 5
    if args.baseline_repeats is None:
        args.baseline_repeats = 3
    if args.exact_blocks is None:
        args.exact_blocks = "all" if q else ("head,A0" if shape.head and shape.layers else "all")
    args.out = bu.output_path(args, "bench_estimators")
    if min(args.repeats, args.baseline_repeats) < 1:
        parser.error("--repeats and --baseline-repeats must be at least 1")
    args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
    bad = [x for x in args.methods if x not in ALL_METHODS]
    if bad:
        parser.error(f"--methods: unknown {bad}; choose from {ALL_METHODS}")
    try:
        args.exact_blocks = parse_blocks(args.exact_blocks, shape)
    except ValueError as e:
        parser.error(str(e))
    return args, shape


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (None: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    return bu.run_script(parser, argv, lambda parsed: run(*parsed), lambda a: resolve_args(parser, a))


def run(args: argparse.Namespace, shape: Shape) -> int:
    bu.set_torch_threads()
    t_start = time.perf_counter()
    rep = Report(args, shape)
    gb = (shape.n + shape.m) * shape.dim * 4 / 2**30
    print(f"# fastinf estimator benchmark: {shape.describe()}  (train+test {gb:.2f} GiB float32)")
    print(f"# {rep.device}; {rep.version}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; {loadavg()}")
    print(f"# times: fit+score wall seconds; speedup = loop median / fastinf median; peak_mem_mb = {bu.memory_doc()}")
    print(f"# max_rel_err = max|fastinf - loop| / max|loop|; methods: {','.join(args.methods)}", flush=True)
    t0 = time.perf_counter()
    train, test = make_gradients(shape, seed=args.seed)
    print(f"# gradients generated in {time.perf_counter() - t0:.1f} s", flush=True)
    ctx = {"train": train, "test": test, "tr": example_dicts(train), "te": example_dicts(test)}
    for name in args.methods:
        t1 = time.perf_counter()
        if name in ("identity", "datainf", "lissa"):
            case_mean(name, args, ctx, rep)
        elif name == "datainf_pertest":
            case_datainf_pertest(args, ctx, rep)
        elif name == "exact":
            case_exact(args, ctx, rep)
        elif name == "rrinf":
            case_rrinf(args, ctx, rep)
        print(f"#   ({name}: {time.perf_counter() - t1:.1f} s)", flush=True)
        gc.collect()
    bu.write_csv(rep.rows, args.out, append=args.append)
    print(f"# wrote {len(rep.rows)} rows to {args.out}; total {time.perf_counter() - t_start:.1f} s; {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
