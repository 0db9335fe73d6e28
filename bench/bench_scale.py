"""Large-n scoring: out-of-core estimators on a 10⁶-row bfloat16 GradientStore against the I/O floor.

    python bench/bench_scale.py [--quick] [--n N] [--m M] [--scratch DIR]

Synthetic LoRA-like gradients (default 64 blocks × 128 = D 8192, as after a per-block projection: a
rank-16 latent shared by all blocks, isotropic noise, a log-normal per-example factor, per-block scales)
are written through the public store API (``GradientStore.create(path, {"blocks": ..., "dtype":
"bfloat16"}) / .append / .mark_complete``) in appends of ~256 MiB, generated chunk by chunk from seeded
generators (row r is the same whatever the chunking, so the 10⁴ store is a prefix of the 10⁶ one). The
m test rows are held in memory (float32). For each n of the scaling list the script times and measures
the peak RSS (``fastinf.utils.PeakMemory``) of

* writing the store;
* the I/O floor: a plain sequential read of every shard file in 64 MiB blocks (``readinto`` one buffer);
* ``fit(store).topk(test, k)`` for datainf, hessian_free, diagonal_fisher and exact (``solve="d"``);
* ``fit(store).self_influence()`` for hessian_free and diagonal_fisher (DataInf's is O(n²·D): not run);

and reports each as a ratio to the floor of the same run (and per pass over the training gradients,
where the estimator reports ``passes_``). Before every timed step the store's pages are dropped from the
page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed), so every step starts cold;
whether the store fits in the page cache (and later passes of a method can be served from it) is printed
and written to the notes. At the largest n, the top-k of one method (``--dist-method``) is also run under
``torch.distributed.run`` with ``--dist-procs`` gloo processes on the same store, as a ratio to the
one-process time of the same call.

Goals (issue 9): every streamed method within 2× of the I/O floor; peak RSS ≤ 4 GiB at n = 10⁶.
Rows (bench/utils.py schema) go to bench/results/bench_scale.csv (``--quick``: bench_scale_quick.csv),
the scaling plot to bench/results/bench_scale.png (``--quick``: bench_scale_quick.png). Stores are
written under ``--scratch`` and deleted at the end (``--keep-stores`` keeps them). Set OMP_NUM_THREADS=1.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402
from fastinf.utils import PeakMemory, loadavg  # noqa: E402

ROWS_PER_SEED = 1024  # rows drawn from one seeded generator: the data do not depend on the append size
READ_BLOCK = 64 << 20  # the I/O floor reads in 64 MiB blocks
GIB = 1 << 30

TOPK_METHODS = ("hessian_free", "diagonal_fisher", "datainf", "exact")
SELF_METHODS = ("hessian_free", "diagonal_fisher")


# ----------------------------------------------------------------------------------------- data
class Spec:
    """The synthetic gradients: block names and widths, latent rank and seed (everything a row depends on)."""

    def __init__(self, blocks: int = 64, width: int = 128, rank: int = 16, seed: int = 0) -> None:
        self.blocks, self.width, self.rank, self.seed = blocks, width, rank, seed
        self.names = [f"layers.{i // 2}.lora_{'AB'[i % 2]}" for i in range(blocks)]
        self.D = blocks * width
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(rank, self.D, generator=g) / math.sqrt(rank)  # latent directions, all blocks
        self.latent_scale = torch.logspace(0, -1.5, rank)  # decaying latent scales
        scale = torch.where(torch.arange(blocks) % 2 == 1, 2.0, 0.5) * torch.exp(0.3 * torch.randn(blocks, generator=g))
        self.col_scale = scale.repeat_interleave(width)  # per-block scales (lora_B > lora_A)

    def fingerprint(self) -> dict:
        return {
            "blocks": {k: self.width for k in self.names},
            "dtype": "bfloat16",
            "model_class": "bench_scale.synthetic",
            "name_or_path": f"synthetic rank={self.rank} seed={self.seed}",
            "projection": None,
        }

    def shape(self) -> str:
        return f"{self.blocks}x{self.width} (D={self.D})"

    def _rows(self, stream: int, start: int, stop: int) -> torch.Tensor:
        out = torch.empty(stop - start, self.D)
        for b in range(start // ROWS_PER_SEED, (stop - 1) // ROWS_PER_SEED + 1):
            b0 = b * ROWS_PER_SEED
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream * 7_919_993 + b + 1)
            z = torch.randn(ROWS_PER_SEED, self.rank, generator=g) * self.latent_scale
            x = torch.randn(ROWS_PER_SEED, self.D, generator=g).mul_(0.5).addmm_(z, self.W)
            x.mul_(self.col_scale).mul_(torch.exp(0.5 * torch.randn(ROWS_PER_SEED, 1, generator=g)))
            lo, hi = max(start, b0), min(stop, b0 + ROWS_PER_SEED)
            out[lo - start : hi - start] = x[lo - b0 : hi - b0]
        return out

    def train_rows(self, start: int, stop: int) -> torch.Tensor:
        """Training rows [start, stop) as an (c, D) float32 tensor (before the bfloat16 storage cast)."""
        return self._rows(1, start, stop)

    def test_set(self, m: int) -> fastinf.GradientSet:
        """The m test rows (float32, in memory), blocked like the store."""
        x = self._rows(2, 0, m)
        return fastinf.GradientSet(
            {k: x[:, i * self.width : (i + 1) * self.width].contiguous() for i, k in enumerate(self.names)}
        )

    def split(self, x: torch.Tensor) -> dict:
        return {k: x[:, i * self.width : (i + 1) * self.width] for i, k in enumerate(self.names)}


def write_store(path: Path, spec: Spec, n: int, append_rows: int, shard_bytes: int | None = None) -> float:
    """Write n training rows through the public store API, one append of ``append_rows`` rows at a time
    (the store cuts shards of ``shard_bytes``; None: its default). Returns the seconds spent generating
    the synthetic rows (not the store's work)."""
    kw = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    store = fastinf.GradientStore.create(path, spec.fingerprint(), overwrite=True, **kw)
    gen = 0.0
    for s in range(0, n, append_rows):
        e = min(s + append_rows, n)
        t0 = time.perf_counter()
        blocks = spec.split(spec.train_rows(s, e))
        gen += time.perf_counter() - t0
        store.append(blocks)
        del blocks
    store.mark_complete()
    return gen


def open_store(path: Path, checksums: bool = False) -> fastinf.GradientStore:
    """A fresh read-only view of the store (``checksums=False``: existence and size checked on read, the
    SHA-256 is timed separately as ``verify``)."""
    try:
        return fastinf.GradientStore.open(path, checksums=checksums)
    except TypeError:  # a store without the option
        return fastinf.GradientStore.open(path)


def store_files(path: Path) -> list[Path]:
    """The store's shard files (everything but the manifest)."""
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != "manifest.json")


def drop_cache(path: Path) -> bool:
    """Evict the store's pages from the page cache (``posix_fadvise DONTNEED``, no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in store_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def read_floor(path: Path, buf: bytearray | None = None) -> int:
    """The I/O floor: read every shard file sequentially in 64 MiB blocks into one buffer; returns bytes."""
    buf = bytearray(READ_BLOCK) if buf is None else buf
    mv, total = memoryview(buf), 0
    for p in store_files(path):
        with open(p, "rb", buffering=0) as f:
            while True:
                k = f.readinto(mv)
                if not k:
                    break
                total += k
    return total


def page_cache_note(nbytes: int) -> str:
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return "page cache: unknown"
    fits = "fits in" if nbytes < 0.8 * avail else "does not fit in"
    return f"store {nbytes / GIB:.2f} GiB {fits} the page cache (MemAvailable {avail / GIB:.1f} GiB)"


# ----------------------------------------------------------------------------------------- methods
def make_estimator(method: str, exact_global: bool = False):
    if method == "exact":
        return fastinf.Exact(solve="d", blockwise=not exact_global)
    return fastinf.get_estimator(method)


def passes_of(est) -> int | None:
    p = getattr(est, "passes_", None)
    if isinstance(p, dict):
        p = sum(v for v in p.values() if isinstance(v, int)) or None
    return p if isinstance(p, int) and p > 0 else None


def run_method(store, test, method: str, what: str, k: int, exact_global: bool = False) -> dict:
    """One timed ``fit(store)`` (``store``: a GradientStore, or its path: opened without checksums) +
    ``topk(test, k)`` (what="topk") or ``self_influence()`` (what="self"),
    under one PeakMemory probe; the result, the fit/second-step split and the estimator's passes_."""
    est = make_estimator(method, exact_global)
    if not isinstance(store, fastinf.GradientStore):
        store = open_store(store)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        est.fit(store)
        t1 = time.perf_counter()
        out = est.topk(test, k) if what == "topk" else est.self_influence()
        t2 = time.perf_counter()
    return {"time": t2 - t0, "fit": t1 - t0, "step": t2 - t1, "peak_mb": mem.mb, "out": out, "passes": passes_of(est)}


# ----------------------------------------------------------------------------------------- distributed
def run_distributed(store_path: Path, spec: Spec, m: int, k: int, method: str, procs: int, outdir: Path) -> dict:
    """``fit(store).topk(test, k)`` under ``torch.distributed.run --nproc_per_node=procs`` (gloo): the
    slowest rank's time from a barrier after group start-up, every rank's peak RSS, rank 0's top-k."""
    res = outdir / "dist.json"
    cfg = {
        "store": str(store_path),
        "spec": [spec.blocks, spec.width, spec.rank, spec.seed],
        "m": m,
        "k": k,
        "method": method,
        "out": str(res),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        str(Path(__file__).resolve()),
        "--dist-worker",
        json.dumps(cfg),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not res.exists():
        raise RuntimeError(
            f"distributed run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    out = json.loads(res.read_text())
    out["wall"] = wall
    from safetensors.torch import load_file

    t = load_file(str(outdir / "dist_topk.safetensors"))
    out["values"], out["indices"] = t["values"], t["indices"]
    return out


def dist_worker(cfg: dict) -> int:
    from safetensors.torch import save_file

    from fastinf import distributed as fd

    bu.set_torch_threads()
    fd.init_from_env("gloo")
    spec = Spec(*cfg["spec"])
    test = spec.test_set(cfg["m"])
    fd.barrier()
    r = run_method(Path(cfg["store"]), test, cfg["method"], "topk", cfg["k"])
    fd.barrier()
    per_rank = fd.all_gather_objects({"time": r["time"], "fit": r["fit"], "peak_mb": r["peak_mb"]})
    if fd.is_main():
        vals, idx = r["out"]
        save_file(
            {"values": vals.contiguous(), "indices": idx.contiguous()},
            str(Path(cfg["out"]).parent / "dist_topk.safetensors"),
        )
        Path(cfg["out"]).write_text(
            json.dumps(
                {"ranks": per_rank, "world": fd.world_size(), "passes": r["passes"], "sharded": fd.is_distributed()}
            )
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------- plot
def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for p in points:
        series.setdefault(p["label"], []).append((p["n"], p["time"], p["peak_mb"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, pts in series.items():
        pts.sort()
        ns = [x[0] for x in pts]
        style = "k--" if label == "I/O floor (cold read)" else "-o"
        ax1.plot(ns, [x[1] for x in pts], style, label=label, ms=4)
        ax2.plot(ns, [x[2] / 1024 for x in pts], style, label=label, ms=4)
    ns = sorted({p["n"] for p in points})
    if len(ns) > 1:
        ref = max(p["time"] for p in points if p["n"] == ns[-1])
        ax1.plot(ns, [ref * x / ns[-1] for x in ns], ":", color="grey", label="∝ n")
    ax1.set(
        xscale="log", yscale="log", xlabel="training rows n", ylabel="seconds", title="time (linear in n = slope 1)"
    )
    ax2.axhline(4, color="red", ls=":", label="goal: 4 GiB")
    ax2.set(xscale="log", xlabel="training rows n", ylabel="peak RSS added (GiB)", title="peak memory (flat in n)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    ax1.grid(alpha=0.3, which="both")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bu.add_output_args(ap, "bench_scale", quick_help="n up to 10⁵ (10⁴, 10⁵), m = 100: well under a minute")
    ap.add_argument("--n", type=int, default=None, help="largest n (default 10⁶; --quick 10⁵)")
    ap.add_argument(
        "--scaling", default=None, help="comma-separated n of the scaling curve (default: 10⁴ … n by decades, and n)"
    )
    ap.add_argument("--m", type=int, default=None, help="test rows (default 1000; --quick 100)")
    ap.add_argument("--k", type=int, default=100, help="top-k per test row (default 100)")
    ap.add_argument("--blocks", type=int, default=None, help="LoRA-like blocks (default 64; --quick 16)")
    ap.add_argument("--width", type=int, default=128, help="width of every block (default 128: D = 8192)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the shared latent (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--append-mib", type=float, default=256.0, help="bytes per append() in bfloat16 (default 256 MiB)")
    ap.add_argument("--shard-mib", type=float, default=None, help="the store's shard_bytes in MiB (default: its own)")
    ap.add_argument(
        "--methods", default=",".join(TOPK_METHODS), help=f"top-k methods (default {','.join(TOPK_METHODS)})"
    )
    ap.add_argument("--self-methods", default=",".join(SELF_METHODS), help="self_influence methods ('' for none)")
    ap.add_argument(
        "--exact-global",
        action="store_true",
        help="exact with one global d-space solve (D×D; O(n·D²): ~1 h at the default shape on one core) "
        "instead of one per block",
    )
    ap.add_argument(
        "--extra-m",
        default=None,
        help="also run --dist-method's top-k at the largest n with these test-row counts "
        "(comma-separated; default: 1000 when --m is below it, none with --quick)",
    )
    ap.add_argument("--dist-procs", type=int, default=2, help="processes of the torch.distributed run (0: skip it)")
    ap.add_argument("--dist-method", default="hessian_free", help="method of the 1-vs-P comparison (top-k)")
    ap.add_argument(
        "--no-drop-cache", action="store_true", help="do not evict the store from the page cache before each step"
    )
    ap.add_argument("--scratch", default=None, help="directory for the stores (default: a temporary directory)")
    ap.add_argument("--keep-stores", action="store_true", help="keep the stores after the run")
    ap.add_argument(
        "--png", default=None, help="scaling plot (default bench/results/bench_scale[_quick].png; 'none': no plot)"
    )
    ap.add_argument(
        "--save-topk", default=None, help="directory: write each method's top-k at the largest n (safetensors)"
    )
    ap.add_argument("--dist-worker", default=None, help=argparse.SUPPRESS)
    return ap


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    if a.dist_worker:
        return a
    a.n = a.n or (10**5 if a.quick else 10**6)
    a.m = a.m or (100 if a.quick else 1000)
    a.blocks = a.blocks or (16 if a.quick else 64)
    if a.extra_m is None:
        a.extra_m = "" if a.quick or a.m >= 1000 else "1000"
    a.extra_m = [int(x) for x in a.extra_m.split(",") if x.strip() and int(x) != a.m]
    if a.scaling:
        a.scaling = sorted({int(float(x)) for x in a.scaling.split(",") if x.strip()})
    else:
        a.scaling = [10**e for e in range(4, 8) if 10**e < a.n] + [a.n]
    a.scaling = [x for x in a.scaling if x <= a.n]
    if a.n not in a.scaling:
        a.scaling.append(a.n)
    a.methods = [x for x in a.methods.split(",") if x]
    a.self_methods = [x for x in a.self_methods.split(",") if x]
    known = set(fastinf.available_methods("gradients"))
    for x in [*a.methods, *a.self_methods, a.dist_method]:
        if x not in known:
            raise SystemExit(f"unknown method {x!r}; gradient methods: {sorted(known)}") from None
    if "datainf" in a.self_methods:
        raise SystemExit("datainf's self_influence is O(n²·D) (every pair of training rows): not benchmarked")
    if a.k > min(a.scaling):
        raise SystemExit(f"--k {a.k} exceeds the smallest n {min(a.scaling)}")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line arguments ``argv`` (None: ``sys.argv[1:]``); returns the exit status."""
    ap = build_parser()

    def _resolve(a):
        try:
            return resolve(a)
        except SystemExit as e:
            ap.error(str(e))

    return bu.run_script(ap, argv, run, _resolve)


def run(a: argparse.Namespace) -> int:
    if a.dist_worker:
        return dist_worker(json.loads(a.dist_worker))
    bu.set_torch_threads()
    spec = Spec(a.blocks, a.width, a.rank, a.seed)
    append_rows = max(1, int(a.append_mib * 2**20) // (spec.D * 2))
    shard_bytes = int(a.shard_mib * 2**20) if a.shard_mib else None
    rows = bu.RowBuilder(
        printer=bu.LinePrinter(
            [
                ("op", 24),
                ("method", 16),
                ("shape", 30),
                ("median_s", 9),
                ("peak_mem_mb", 9),
                ("gbps", 6),
                ("frac_roofline", 7),
            ]
        )
    )
    scratch = Path(a.scratch) if a.scratch else Path(tempfile.mkdtemp(prefix="fastinf-bench-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    test = spec.test_set(a.m)
    points: list[dict] = []
    summary: list[str] = []
    drop = not a.no_drop_cache
    print(
        f"# bench_scale: n in {a.scaling}, m = {a.m}, k = {a.k}, blocks {spec.shape()}, bfloat16 store, "
        f"appends of {append_rows} rows; {loadavg()}; {bu.memory_doc()}",
        flush=True,
    )
    single: dict = {}
    floors: dict[int, float] = {}
    try:
        for n in a.scaling:
            path = scratch / f"store-n{n}"
            shape = f"n={n} m={a.m} {spec.shape()}"
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                t_gen = write_store(path, spec, n, append_rows, shard_bytes)
                t_total = time.perf_counter() - t0
            t_write = t_total - t_gen  # the store's own work: append (checks, bf16 cast, buffer) + shard writes
            nbytes = sum(p.stat().st_size for p in store_files(path))
            cache = page_cache_note(nbytes)
            dropped = drop and drop_cache(path)
            cache_note = f"{cache}; {'evicted (posix_fadvise) before each step' if dropped else 'not evicted'}"
            rows.add(
                op="write_store",
                backend="fastinf",
                method="GradientStore.append",
                shape=shape,
                dtype="bfloat16",
                median_s=t_write,
                p20_s=t_write,
                p80_s=t_write,
                peak_mem_mb=mem.mb,
                gbps=nbytes / t_write / 1e9,
                throughput=n / t_write,
                unit="rows/s",
                gbytes=nbytes / 1e9,
                note=f"{len(store_files(path))} shard files, {nbytes / GIB:.2f} GiB; appends of {append_rows} rows; "
                f"time excludes generating the synthetic rows ({t_gen:.3g} s; {t_total:.3g} s in all), peak not",
            )
            points.append({"label": "write store", "n": n, "time": t_write, "peak_mb": mem.mb})
            # the I/O floor, measured like the methods (cold), and warm for reference
            buf = bytearray(READ_BLOCK)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                got = read_floor(path, buf)
                floor = time.perf_counter() - t0
            t0 = time.perf_counter()
            read_floor(path, buf)
            warm = time.perf_counter() - t0
            rows.add(
                op="io_floor",
                backend="python",
                method="sequential read",
                shape=shape,
                dtype="bfloat16",
                median_s=floor,
                p20_s=floor,
                p80_s=floor,
                peak_mem_mb=mem.mb,
                gbytes=got / 1e9,
                gbps=got / floor / 1e9,
                throughput=n / floor,
                unit="rows/s",
                note=f"64 MiB readinto (one preallocated buffer) over every shard file; warm (second read) "
                f"{warm:.3g} s = {got / warm / 1e9:.2f} GB/s; {cache_note}",
            )
            points.append({"label": "I/O floor (cold read)", "n": n, "time": floor, "peak_mb": mem.mb})
            floors[n] = floor
            if drop:
                drop_cache(path)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                open_store(path, checksums=True).verify()
                t_ver = time.perf_counter() - t0
            rows.add(
                op="verify (SHA-256)",
                backend="fastinf",
                method="GradientStore.verify",
                shape=shape,
                dtype="bfloat16",
                median_s=t_ver,
                p20_s=t_ver,
                p80_s=t_ver,
                peak_mem_mb=mem.mb,
                baseline="io_floor",
                baseline_median_s=floor,
                speedup=floor / t_ver,
                gbps=nbytes / t_ver / 1e9,
                note=f"ratio to I/O floor {t_ver / floor:.2f}×; what open(checksums=True) adds to the first pass "
                "(the methods below open the store with checksums=False: existence and size only)",
            )
            jobs = [(x, "topk") for x in a.methods] + [(x, "self") for x in a.self_methods]
            for method, what in jobs:
                if drop:
                    drop_cache(path)
                r = run_method(path, test, method, what, a.k, a.exact_global)
                op = f"fit+topk(k={a.k})" if what == "topk" else "fit+self_influence"
                ratio = r["time"] / floor
                p = r["passes"]
                per_pass = f", {ratio / p:.2f}× per pass" if p else ""
                variant = ""
                if method == "exact":
                    variant = " solve=d, " + (
                        "one global D×D solve" if a.exact_global else "one d-space solve per block"
                    )
                rows.add(
                    op=op,
                    backend="fastinf",
                    method=method,
                    shape=shape,
                    dtype="bfloat16 store, float32+ compute",
                    median_s=r["time"],
                    p20_s=r["time"],
                    p80_s=r["time"],
                    peak_mem_mb=r["peak_mb"],
                    baseline="io_floor",
                    baseline_median_s=floor,
                    speedup=floor / r["time"],
                    roofline_s=floor * (p or 1),
                    frac_roofline=floor * (p or 1) / r["time"],
                    gbps=nbytes * (p or 1) / r["time"] / 1e9,
                    throughput=n / r["time"],
                    unit="rows/s",
                    note=f"ratio to I/O floor {ratio:.2f}× (passes_={p if p else 'not reported'}{per_pass}); "
                    f"fit {r['fit']:.3g} s + {what} {r['step']:.3g} s;{variant} 1 run",
                )
                points.append(
                    {
                        "label": f"{method} {'top-k' if what == 'topk' else 'self-influence'}",
                        "n": n,
                        "time": r["time"],
                        "peak_mb": r["peak_mb"],
                    }
                )
                if n == a.n:
                    summary.append(
                        f"{method:16s} {op:22s} {r['time']:9.2f} s  {ratio:7.2f}× floor  "
                        f"passes={p}  peak {r['peak_mb'] / 1024:.2f} GiB"
                    )
                    single[(method, what)] = r
                    if a.save_topk:
                        from safetensors.torch import save_file

                        d = Path(a.save_topk)
                        d.mkdir(parents=True, exist_ok=True)
                        t = (
                            {"values": r["out"][0].contiguous(), "indices": r["out"][1].contiguous()}
                            if what == "topk"
                            else {"self": r["out"].contiguous()}
                        )
                        save_file(t, str(d / f"{method}_{what}.safetensors"))
                if not (n == a.n and method == a.dist_method and what == "topk" and a.dist_procs > 1):
                    r["out"] = None  # keep only what the 1-vs-P comparison needs
            if n == a.n:
                summary.insert(
                    0,
                    f"n = {n}: I/O floor {floor:.2f} s ({got / floor / 1e9:.2f} GB/s cold, warm "
                    f"{got / warm / 1e9:.2f} GB/s), write {t_write:.1f} s; {cache}",
                )
            if n != a.n and not a.keep_stores:
                shutil.rmtree(path, ignore_errors=True)
        # the top-k cost in m: the same call with other test-row counts at the largest n
        for m2 in a.extra_m:
            path = scratch / f"store-n{a.n}"
            if drop:
                drop_cache(path)
            r = run_method(path, spec.test_set(m2), a.dist_method, "topk", a.k)
            p = r["passes"]
            floor = floors[a.n]
            rows.add(
                op=f"fit+topk(k={a.k})",
                backend="fastinf",
                method=a.dist_method,
                shape=f"n={a.n} m={m2} {spec.shape()}",
                dtype="bfloat16 store, float32+ compute",
                median_s=r["time"],
                p20_s=r["time"],
                p80_s=r["time"],
                peak_mem_mb=r["peak_mb"],
                baseline="io_floor",
                baseline_median_s=floor,
                speedup=floor / r["time"],
                roofline_s=floor * (p or 1),
                frac_roofline=floor * (p or 1) / r["time"],
                throughput=a.n / r["time"],
                unit="rows/s",
                note=f"ratio to I/O floor {r['time'] / floor:.2f}× (passes_={p}); m = {m2} test rows instead of "
                f"{a.m}: the GEMM work grows with m, the bytes read do not; 1 run",
            )
            summary.append(
                f"{a.dist_method:16s} fit+topk m={m2:<6d}      {r['time']:9.2f} s  {r['time'] / floor:7.2f}× floor  "
                f"passes={p}  peak {r['peak_mb'] / 1024:.2f} GiB"
            )
        # 1 vs P processes on the largest store
        if a.dist_procs > 1:
            path = scratch / f"store-n{a.n}"
            one = single.get((a.dist_method, "topk"))
            if one is None:
                if drop:
                    drop_cache(path)
                one = run_method(path, test, a.dist_method, "topk", a.k)
            if drop:
                drop_cache(path)
            d = run_distributed(path, spec, a.m, a.k, a.dist_method, a.dist_procs, scratch)
            t_p = max(x["time"] for x in d["ranks"])
            peak = max(x["peak_mb"] for x in d["ranks"])
            same = float((d["indices"] == one["out"][1]).float().mean()) if one.get("out") is not None else float("nan")
            shape = f"n={a.n} m={a.m} {spec.shape()}"
            rows.add(
                op=f"fit+topk(k={a.k}) x{a.dist_procs} procs",
                backend="fastinf/torch.distributed gloo",
                method=a.dist_method,
                shape=shape,
                dtype="bfloat16 store, float32 compute",
                median_s=t_p,
                p20_s=t_p,
                p80_s=t_p,
                peak_mem_mb=peak,
                baseline=f"{a.dist_method} 1 process",
                baseline_median_s=one["time"],
                speedup=one["time"] / t_p,
                throughput=a.n / t_p,
                unit="rows/s",
                note=f"{a.dist_procs} ranks via torch.distributed.run, slowest rank from a barrier after start-up "
                f"(wall incl. start-up {d['wall']:.3g} s); per-rank fit {[round(x['fit'], 3) for x in d['ranks']]} s, "
                f"peaks {[round(x['peak_mb']) for x in d['ranks']]} MiB; passes_={d.get('passes')}; "
                f"top-k indices equal to 1 process: {same:.4f}",
            )
            summary.append(
                f"{a.dist_method} top-k: 1 process {one['time']:.2f} s, {a.dist_procs} processes {t_p:.2f} s "
                f"-> {one['time'] / t_p:.2f}× (top-k indices equal: {same:.4f})"
            )
    finally:
        if not a.keep_stores:
            for p in scratch.glob("store-n*"):
                shutil.rmtree(p, ignore_errors=True)
            if not a.scratch:
                shutil.rmtree(scratch, ignore_errors=True)
    out = bu.write_csv(rows.rows, bu.output_path(a, "bench_scale"), append=a.append)
    print(f"# wrote {len(rows.rows)} rows to {out}")
    png = a.png or str(bu.RESULTS / ("bench_scale_quick.png" if a.quick else "bench_scale.png"))
    if png != "none" and len(a.scaling) > 1:
        plot(points, Path(png))
        print(f"# wrote {png}")
    top = [r for r in rows.rows if r["op"].startswith("fit+") and "procs" not in r["op"] and f"n={a.n} " in r["shape"]]
    worst_ratio = max((float(r["median_s"]) / float(r["baseline_median_s"]) for r in top), default=float("nan"))
    worst_mem = max((float(r["peak_mem_mb"]) for r in rows.rows if f"n={a.n} " in r["shape"]), default=0.0)
    print("\n# summary\n" + "\n".join("  " + s for s in summary))
    print(
        f"# goals at n = {a.n}: every method within 2× of the I/O floor: {'met' if worst_ratio <= 2 else 'NOT met'} "
        f"(worst {worst_ratio:.2f}×); peak RSS ≤ 4 GiB: {'met' if worst_mem <= 4096 else 'NOT met'} "
        f"(largest {worst_mem / 1024:.2f} GiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
