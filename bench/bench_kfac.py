"""K-FAC and EK-FAC: fastinf against kronfluence on the same trained demo model (issue 14).

One run trains the demo's model once — MiniLM + LoRA (query, value; r = 8) and a trained
classification head on Rotten Tomatoes, ``n_train`` examples with 20 % of the labels flipped
(:class:`fastinf.eval.experiments.mislabel.MislabelSettings`, data seed ``--seed``) — and then:

* **fastinf**: captures the per-example gradients *with* the Kronecker factors (``collect(...,
  factors=True)``; also once without, for the factors' overhead), then fits and scores every gradient
  method on the mean test loss, K-FAC and EK-FAC included (EK-FAC's eigenvalues from the captured
  gradients: no second capture);
* **kronfluence** (when importable; never a fastinf dependency: ``--kron DIR`` puts a
  ``pip install --no-deps --target DIR kronfluence einops einconv opt_einsum`` on ``sys.path`` for this
  run only): tracks the same LoRA / head ``nn.Linear`` modules (padding masked), fits the factors and
  computes pairwise scores for EK-FAC (its default, sampled-label Fisher), EK-FAC with the empirical
  Fisher, K-FAC and the identity; each strategy's fit and scoring are timed separately.

Rows: time of every step; per method the mislabel AUC and the Spearman correlation of its mean-test
scores with kronfluence's EK-FAC (and with kronfluence's strategy of the same name), in ``note``
(kronfluence's scores are negated: its positive is helpful, fastinf's harmful); the totals "capture +
every fastinf method" vs "one kronfluence EK-FAC fit + scoring" (``speedup``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_kfac.py --kron /tmp/kron        # n = 600, seed 0
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_kfac.py --quick --kron /tmp/kron
"""

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402
from fastinf.eval import hf  # noqa: E402
from fastinf.eval.experiments.common import mislabel_split, train_mislabel_model  # noqa: E402
from fastinf.eval.experiments.mislabel import MislabelSettings  # noqa: E402
from fastinf.eval.metrics import agreement, mislabel_auc  # noqa: E402
from fastinf.eval.runner import run_gradient_methods  # noqa: E402

# (strategy, empirical Fisher, scorings: (label suffix, kronfluence damping_factor)); kronfluence's default λ is
# an absolute 1e-8; None is its heuristic 0.1 × mean eigenvalue (fastinf's damping="auto" for kfac / ekfac)
KRON_STRATEGIES = (
    ("ekfac", False, (("", 1e-8), (" (0.1×mean λ)", None))),
    ("ekfac", True, (("", 1e-8),)),
    ("kfac", False, (("", 1e-8),)),
    ("identity", False, (("", 1e-8),)),
)
KRON_LAMBDA = 1e-8
# fastinf rows compared with the kronfluence strategy of the same curvature and damping
SAME = {
    "hessian_free": ["identity"],
    "kfac": ["kfac"],
    "ekfac": ["ekfac (0.1×mean λ)"],
    "kfac (λ=1e-8)": ["kfac"],
    "ekfac (λ=1e-8)": ["ekfac (empirical)", "ekfac"],
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="data seed (flips, split, training)")
    ap.add_argument(
        "--kron",
        default=os.environ.get("FASTINF_KRONFLUENCE_PATH"),
        help="directory holding kronfluence and its pure-python deps (put on sys.path for this run only)",
    )
    ap.add_argument("--no-kron", action="store_true", help="fastinf only")
    ap.add_argument("--n-train", type=int, default=None, help="training examples (default: the demo's)")
    ap.add_argument("--n-test", type=int, default=None, help="test examples (default: the demo's)")
    ap.add_argument("--methods", default=None, help="comma-separated fastinf methods (default: every gradient one)")
    bu.add_output_args(ap, "bench_kfac", quick_help="n_train = 160, n_test = 40, 3 epochs (a few minutes)")
    return ap


def import_kronfluence(path: str | None):
    """The kronfluence module, or None (with the reason printed)."""
    if path:
        sys.path.insert(0, str(path))
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer  # noqa: F401
    except ImportError as e:
        print(
            f"bench_kfac: kronfluence is not importable ({e}); the kronfluence rows are skipped. Install it into a "
            "directory of its own (pip install --no-deps --target DIR kronfluence einops einconv opt_einsum) "
            "and pass --kron DIR",
            flush=True,
        )
        return None
    return kronfluence


# ------------------------------------------------------------------------------------ the demo model
def train_demo(s: MislabelSettings, seed: int):
    """The mislabel experiment's seed: data split, flips and the trained model, by the experiment's own functions."""
    from fastinf.data import rotten_tomatoes

    texts, labels = rotten_tomatoes()
    labels = np.asarray(labels)
    tr_idx, te_idx, y_tr, flipped = mislabel_split(labels, s, seed)
    torch.manual_seed(seed)
    tok, net = hf.text_classifier("minilm", 2, s.lora_r)

    def enc(idx):
        return tok([texts[i] for i in idx], truncation=True, max_length=s.max_length)

    train_ds, test_ds = hf.TextDataset(enc(tr_idx), y_tr), hf.TextDataset(enc(te_idx), labels[te_idx])
    with tempfile.TemporaryDirectory(prefix="fastinf-bench-kfac-") as work:
        t0 = time.perf_counter()
        train_mislabel_model(net, train_ds, tok, s, seed, Path(work) / "checkpoints", progress=False)
        print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return tok, net, train_ds, test_ds, flipped


# ------------------------------------------------------------------------------------ kronfluence
def kron_task(modules: list[str]):
    import torch.nn.functional as F
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if not sample:
                return F.cross_entropy(logits, batch["labels"], reduction="sum")
            with torch.no_grad():
                drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, drawn, reduction="sum")

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            return F.cross_entropy(logits, batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return ClassificationTask()


def kron_run(net, tok, train_ds, test_ds, modules, strategy, empirical, scorings, work, batch_size):
    """(fit seconds, {label suffix: (score seconds, fastinf-signed mean-test scores (n,))}) of one
    kronfluence strategy, scored once per damping in ``scorings``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs
    from transformers import DataCollatorWithPadding

    task = kron_task(modules)
    model = prepare_model(copy.deepcopy(net), task)
    name = f"{strategy}{'_emp' if empirical else ''}"
    an = Analyzer(analysis_name=name, model=model, task=task, cpu=True, output_dir=str(work), disable_tqdm=True)
    an.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=DataCollatorWithPadding(tok, return_tensors="pt")))
    fa = FactorArguments(strategy=strategy, use_empirical_fisher=empirical)
    t0 = time.perf_counter()
    an.fit_all_factors(
        factors_name=name, dataset=train_ds, per_device_batch_size=batch_size, factor_args=fa, overwrite_output_dir=True
    )
    fit_s = time.perf_counter() - t0
    out = {}
    for i, (suffix, damping) in enumerate(scorings):
        t0 = time.perf_counter()
        sname = f"{name}_{i}"
        scores = an.compute_pairwise_scores(
            scores_name=sname,
            factors_name=name,
            query_dataset=test_ds,
            train_dataset=train_ds,
            per_device_query_batch_size=len(test_ds),
            per_device_train_batch_size=batch_size,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        score_s = time.perf_counter() - t0
        if scores is None:  # kronfluence 1.0.1 returns None after computing; the scores are on disk
            scores = an.load_pairwise_scores(scores_name=sname)
        out[suffix] = (score_s, -scores["all_modules"].double().mean(0))  # kronfluence: positive = helpful
    return fit_s, out


def tracked_modules(col: fastinf.LoRAGradientCollector) -> list[str]:
    """The module names (lora_A, lora_B, head Linear) of the collector's blocks."""
    names = []
    for b in col.block_names:
        m = b.rsplit(".", 1)[0]
        if m not in names:
            names.append(m)
    return names


# ------------------------------------------------------------------------------------ the run
def run(a: argparse.Namespace) -> int:
    bu.set_torch_threads()
    sizes = {k: v for k, v in (("n_train", a.n_train), ("n_test", a.n_test)) if v is not None}
    s = MislabelSettings.quick(**sizes) if a.quick else MislabelSettings(**sizes)
    kron = None if a.no_kron else import_kronfluence(a.kron)
    tok, net, train_ds, test_ds, flipped = train_demo(s, a.seed)
    shape = f"n={s.n_train} m={s.n_test} seed={a.seed}"
    rows = bu.RowBuilder(printer=bu.LinePrinter([("op", 22), ("backend", 12), ("method", 20), ("median_s", 9)]))
    tr_loader = hf.text_loader(train_ds, tok, s.batch_size)
    te_loader = hf.text_loader(test_ds, tok, s.batch_size)
    col = fastinf.LoRAGradientCollector(net, include_modules_to_save=True)

    t0 = time.perf_counter()
    col.collect(tr_loader, progress=False)
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gtr = col.collect(tr_loader, progress=False, factors=True)
    gte = col.collect(te_loader, progress=False)
    cap_s = time.perf_counter() - t0
    rows.add(op="capture", backend="fastinf", method="train (no factors)", shape=shape, median_s=plain_s)
    rows.add(
        op="capture",
        backend="fastinf",
        method="train factors + test",
        shape=shape,
        median_s=cap_s,
        note=f"D={gtr.dim}; blocks={len(gtr.names)}",
    )

    methods = a.methods.split(",") if a.methods else fastinf.available_methods("gradients")
    runs = run_gradient_methods(gtr, gte, methods, reduce="mean", seeds=(0,), progress=False)
    fast: dict[str, torch.Tensor] = {}
    for name, r in runs.items():
        if r.error:
            rows.add(op="fit+score(mean)", backend="fastinf", method=name, shape=shape, note=f"error: {r.error}")
            continue
        fast[name] = r.scores[0]
    extra = {}  # K-FAC / EK-FAC at kronfluence's default damping (an absolute 1e-8), beside damping="auto"
    for name in ("kfac", "ekfac"):
        if name in methods:
            t0 = time.perf_counter()
            sc = fastinf.get_estimator(name, damping=KRON_LAMBDA).fit(gtr).score(gte, reduce="mean")
            extra[f"{name} (λ=1e-8)"] = (time.perf_counter() - t0, sc.double())
    kr: dict[str, tuple[float, float, torch.Tensor]] = {}  # label -> (fit s, score s, scores)
    if kron is not None:
        modules = tracked_modules(col)
        print(f"kronfluence {kron.__version__}: {len(modules)} modules", flush=True)
        with tempfile.TemporaryDirectory(prefix="fastinf-bench-kron-") as work:
            for strategy, emp, scorings in KRON_STRATEGIES:
                label = f"{strategy}{' (empirical)' if emp else ''}"
                fit_s, outs = kron_run(
                    net, tok, train_ds, test_ds, modules, strategy, emp, scorings, work, s.batch_size
                )
                for suffix, (score_s, sc) in outs.items():
                    kr[label + suffix] = (fit_s, score_s, sc)
    ref = kr.get("ekfac", (None, None, None))[2]

    def notes(scores: torch.Tensor, own: list[str]) -> str:
        out = [f"mislabel_auc={mislabel_auc(scores, flipped):.4f}"]
        if ref is not None:
            out.append(f"spearman_vs_kron_ekfac={agreement(scores, ref)['spearman']:.4f}")
        for o in own:
            if o in kr and o != "ekfac":
                out.append(f"spearman_vs_kron_{o.replace(' ', '_')}={agreement(scores, kr[o][2])['spearman']:.4f}")
        return "; ".join(out)

    total = cap_s
    for name, r in runs.items():
        if name in fast:
            total += r.seconds[0]
            lam = r.info.get("lambda")
            rows.add(
                op="fit+score(mean)",
                backend="fastinf",
                method=name,
                shape=shape,
                median_s=r.seconds[0],
                note=notes(fast[name], SAME.get(name, [])) + (f"; lambda={lam}" if isinstance(lam, float) else ""),
            )
    for label, (sec, sc) in extra.items():
        rows.add(
            op="fit+score(mean)",
            backend="fastinf",
            method=label,
            shape=shape,
            median_s=sec,
            note=notes(sc, SAME[label]),
        )
    for label, (fit_s, score_s, sc) in kr.items():
        if "λ)" not in label:  # a second scoring of the same factors: fitted once
            rows.add(op="fit_factors", backend="kronfluence", method=label, shape=shape, median_s=fit_s)
        rows.add(
            op="score(pairwise)",
            backend="kronfluence",
            method=label,
            shape=shape,
            median_s=score_s,
            note=notes(sc, []),
        )
    base = kr.get("ekfac")
    rows.add(
        op="capture+all_methods",
        backend="fastinf",
        method=f"{len(fast)} methods",
        shape=shape,
        median_s=total,
        baseline="kronfluence ekfac fit+score" if base else None,
        baseline_median_s=(base[0] + base[1]) if base else None,
        speedup=((base[0] + base[1]) / total) if base else None,
        note="capture with factors + test capture + fit+score(mean) of every method",
    )
    path = bu.write_csv(rows.rows, bu.output_path(a, "bench_kfac"), append=a.append)
    print(f"wrote {path}", flush=True)
    return 0


def main(argv=None) -> int:
    return bu.run_script(build_parser(), argv, run)


if __name__ == "__main__":
    raise SystemExit(main())
