"""What storing gradients in 16 bits costs in attribution (issue 9 §1, "Storage dtype").

The same synthetic LoRA-like training rows (``bench_scale``'s generator: 64 blocks × 128, a decaying
rank-16 latent, log-normal per-example scale) are written to three GradientStores, in float32, bfloat16
and float16, and every streamed method scores the same m test rows from each. Against the float32
store's scores it reports, per method and storage dtype:

* Spearman of the influence on the mean test loss (``reduce="mean"``, (n,));
* the mean overlap of the top-k training rows per test point (``topk``; the share of the float32
  top-k found in the 16-bit top-k);
* the largest relative difference of the (n,) scores, ``max|s − s₃₂| / max|s₃₂|``.

The estimators compute in float32 or higher whatever the storage dtype, so the differences come from
rounding the stored gradients only (bfloat16: 8 significant bits; float16: 11).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_store_dtype.py            # n = 20 000, m = 100, k = 100
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_store_dtype.py --quick    # n = 4 000, m = 50, k = 50
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402
from bench.bench_scale import Spec  # noqa: E402
from fastinf.eval.metrics import agreement  # noqa: E402

METHODS = ("hessian_free", "diagonal_fisher", "datainf", "exact")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="training rows (default 20000; --quick 4000)")
    ap.add_argument("--m", type=int, default=None, help="test rows (default 100; --quick 50)")
    ap.add_argument("--k", type=int, default=None, help="top-k per test row (default 100; --quick 50)")
    ap.add_argument("--seed", type=int, default=0)
    bu.add_output_args(ap, "bench_store_dtype", quick_help="n = 4000, m = 50, k = 50 (seconds)")
    return ap


def estimator(method: str) -> fastinf.Estimator:
    # exact: one d-space solve per block (the global 8192 × 8192 solve adds nothing to a storage question)
    return fastinf.get_estimator(method, **({"blockwise": True, "solve": "d"} if method == "exact" else {}))


def topk_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |a_j ∩ b_j| / k for index matrices (m, k)."""
    hits = [len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b, strict=True)]
    return sum(hits) / len(hits)


def run(a: argparse.Namespace) -> int:
    bu.set_torch_threads()
    n = a.n or (4000 if a.quick else 20_000)
    m = a.m or (50 if a.quick else 100)
    k = a.k or (50 if a.quick else 100)
    spec = Spec(seed=a.seed)
    test = spec.test_set(m)
    rows = bu.RowBuilder(printer=bu.LinePrinter([("method", 16), ("dtype", 9), ("max_rel_err", 12)]))
    with tempfile.TemporaryDirectory(prefix="fastinf-bench-dtype-") as tmp:
        results: dict[str, dict[str, tuple]] = {}
        for name in DTYPES:
            store_path = Path(tmp) / name
            store = fastinf.GradientStore.create(store_path, {**spec.fingerprint(), "dtype": name})
            for s in range(0, n, 4096):  # the same float32 rows, rounded to the storage dtype by the store
                store.append(spec.split(spec.train_rows(s, min(s + 4096, n))))
            store.mark_complete()
            store = fastinf.GradientStore.open(store_path)
            results[name] = {}
            for method in METHODS:
                mean = estimator(method).fit(store).score(test, reduce="mean").double()
                _, idx = estimator(method).fit(store).topk(test, k)
                results[name][method] = (mean, idx)
        for method in METHODS:
            ref_mean, ref_idx = results["float32"][method]
            for name in ("bfloat16", "float16"):
                mean, idx = results[name][method]
                err = float((mean - ref_mean).abs().max() / ref_mean.abs().max())
                rho = agreement(mean, ref_mean)["spearman"]
                ov = topk_overlap(idx, ref_idx)
                rows.add(
                    op="store_dtype_effect",
                    method=method,
                    shape=f"n={n} m={m} k={k} {spec.shape()}",
                    dtype=name,
                    baseline="float32 store",
                    max_rel_err=err,
                    note=f"spearman(mean)={rho:.6f}; top-{k} overlap={ov:.4f}",
                )
    path = bu.write_csv(rows.rows, bu.output_path(a, "bench_store_dtype"), append=a.append)
    print(f"# wrote {len(rows.rows)} rows to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return bu.run_script(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
