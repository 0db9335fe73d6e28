"""Tier (b) for trace_cov / trace_cov_topk: the Triton kernels under TRITON_INTERPRET=1 against the PyTorch
references at small awkward shapes (two draws, N not a multiple of the draw block, n and m not powers of two,
several tiles and column splits, strided and mixed-dtype inputs, large offsets, zero-variance columns, k = 1
and k = n on both top-k paths), plus the top-k reference and the dispatcher (CPU, no interpreter needed).

bfloat16 is upcast by the launchers under the interpreter (it computes bf16 wrongly); the GPU tier
(tests/ops/test_trace_cov_gpu.py) checks real bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastinf import ops
from fastinf.ops import _dispatch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before triton is imported"
)
TOL = 2e-6  # ‖out − ref‖/‖ref‖: float32 accumulation of exactly represented inputs (every input dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _traces(N: int, n: int, m: int, seed: int, dtype=torch.float32, offset: float = 0.0):
    """Loss-like traces: query losses correlated with some training losses, plus a level ``offset``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))
    W = torch.randn(n, m, generator=g, dtype=torch.float64) / n**0.5
    Y = X @ W + 0.5 * torch.randn(N, m, generator=g, dtype=torch.float64)
    return (X + offset).to(dtype), (Y + offset).to(dtype)


# ------------------------------------------------------------------------------------------- trace_cov
CASES = [
    # N, n, m, dtype, normalize
    (2, 5, 3, torch.float32, False),  # two draws: one term
    (2, 5, 3, torch.float32, True),  # two draws: correlations are ±1
    (37, 41, 19, torch.float32, True),  # N over several draw chunks with a tail, 2 × 3 output tiles
    (19, 17, 33, torch.float16, False),
    (11, 9, 5, torch.bfloat16, True),
]


@interp
@pytest.mark.interp
@pytest.mark.parametrize("N,n,m,dtype,normalize", CASES)
def test_trace_cov_triton(N, n, m, dtype, normalize):
    from fastinf.kernels.trace_cov import trace_cov_triton

    X, Y = _traces(N, n, m, seed=N * 100 + n, dtype=dtype)
    got = trace_cov_triton(X, Y, normalize)
    ref = ops.trace_cov_reference(X, Y, normalize)
    assert got.shape == (m, n) and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _rel(got, ref) < TOL


@interp
@pytest.mark.interp
def test_trace_cov_triton_strided_and_mixed_inputs():
    """Column slices of a wider matrix and a transposed (n, N) buffer are read through their strides; X and Y
    of different dtypes are read in float32."""
    from fastinf.kernels.trace_cov import trace_cov_triton

    X, Y = _traces(23, 40, 6, seed=5)
    Xs = X[:, 7:31]
    Yt = Y.T.contiguous().T  # (N, m) view of an (m, N) buffer
    assert not Xs.is_contiguous() and not Yt.is_contiguous()
    for normalize in (False, True):
        assert _rel(trace_cov_triton(Xs, Yt, normalize), ops.trace_cov_reference(Xs, Yt, normalize)) < TOL
    Yh = Y.half()
    assert _rel(trace_cov_triton(X, Yh), ops.trace_cov_reference(X, Yh)) < TOL


@interp
@pytest.mark.interp
def test_trace_cov_triton_large_offset_beats_float32_reference():
    """Losses at a level of 100 varying by 1e-2: the kernel centres on the first draw before summing, so it
    keeps float32 accuracy where the float32 reference (mean first) loses about four digits."""
    from fastinf.kernels.trace_cov import trace_cov_triton

    g = torch.Generator().manual_seed(2)
    X = (100 + 0.01 * torch.randn(300, 20, generator=g, dtype=torch.float64)).float()
    Y = (3 + 0.1 * torch.randn(300, 7, generator=g, dtype=torch.float64)).float() + 2 * (X[:, :7] - 100)
    for normalize in (False, True):
        exact = ops.trace_cov_reference(X, Y, normalize)  # float64 on the same float32 inputs
        got = trace_cov_triton(X, Y, normalize)
        assert _rel(got, exact) < 1e-6
        assert _rel(got, exact) < 0.1 * _rel(ops.trace_cov_reference(X, Y, normalize, dtype=torch.float32), exact)


@interp
@pytest.mark.interp
def test_trace_cov_triton_zero_variance_matches_reference():
    from fastinf.kernels.trace_cov import trace_cov_topk_triton, trace_cov_triton

    X, Y = _traces(9, 21, 4, seed=3)
    X[:, 17] = 1.5
    Y[:, 2] = -0.25
    for Xa, Ya in ((X, Y), (X[:, :17], Y)):  # train reported first, then query
        with pytest.raises(ValueError) as ref_err:
            ops.trace_cov_reference(Xa, Ya, True)
        with pytest.raises(ValueError) as got_err:
            trace_cov_triton(Xa, Ya, True)
        assert str(got_err.value) == str(ref_err.value)
        with pytest.raises(ValueError, match="zero variance"):
            trace_cov_topk_triton(Xa, Ya, 2, normalize=True)
    Xc = X[:, :17].clone()
    Xc[:, 3] = 0.1  # not exactly summable: still exactly zero after the shift by the first draw
    with pytest.raises(ValueError, match="train trace of example 3 has zero variance"):
        trace_cov_triton(Xc, Y[:, :2], True)
    got = trace_cov_triton(X, Y, False)  # unnormalised: constant columns are simply zero
    assert torch.equal(got[:, 17], torch.zeros(4)) and torch.equal(got[2], torch.zeros(21))


@interp
@pytest.mark.interp
def test_trace_cov_triton_bad_input():
    from fastinf.kernels.trace_cov import trace_cov_topk_triton, trace_cov_triton

    with pytest.raises(ValueError, match="at least 2 draws"):
        trace_cov_triton(torch.ones(1, 3), torch.ones(1, 2))
    with pytest.raises(ValueError, match="float64"):
        trace_cov_triton(torch.ones(3, 3, dtype=torch.float64), torch.ones(3, 2))
    with pytest.raises(ValueError, match="k must be an int in"):
        trace_cov_topk_triton(torch.randn(3, 4), torch.randn(3, 2), 5)
    assert trace_cov_triton(torch.randn(4, 3), torch.randn(4, 0)).shape == (0, 3)
    v, i = trace_cov_topk_triton(torch.randn(4, 3), torch.randn(4, 0), 2)
    assert v.shape == i.shape == (0, 2)


# ------------------------------------------------------------------------------------------------ top-k
TOPK_CASES = [
    # N, n, m, k, normalize, largest, chunk_size
    (7, 41, 19, 1, False, True, None),  # k = 1; two query tiles, one program per tile merges three column tiles
    (9, 70, 5, 3, True, False, None),  # two column splits of several tiles, smallest
    (5, 37, 3, 37, False, True, None),  # k = n (KP = 64 = one widened tile)
    (6, 70, 4, 70, True, True, None),  # k = n > MAX_K: the full kernel over column chunks
    (6, 30, 4, 5, False, False, 4),  # forced chunks narrower than k
]


@interp
@pytest.mark.interp
@pytest.mark.parametrize("N,n,m,k,normalize,largest,chunk", TOPK_CASES)
def test_trace_cov_topk_triton(N, n, m, k, normalize, largest, chunk):
    from fastinf.kernels.trace_cov import trace_cov_topk_triton

    X, Y = _traces(N, n, m, seed=N * 7 + n)
    vals, idx = trace_cov_topk_triton(X, Y, k, normalize=normalize, largest=largest, chunk_size=chunk)
    rv, ri = ops.trace_cov_topk_reference(X, Y, k, normalize=normalize, largest=largest)
    assert vals.shape == idx.shape == (m, k) and vals.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx, ri)  # random data: no ties, same order
    torch.testing.assert_close(vals.double(), rv, rtol=1e-5, atol=1e-6)


@interp
@pytest.mark.interp
def test_trace_cov_topk_triton_two_draws_ties():
    """N = 2 with normalize: every correlation is ±1 (all ties); the values are still the top-k values and the
    indices point at columns with those values."""
    from fastinf.kernels.trace_cov import trace_cov_topk_triton

    X, Y = _traces(2, 21, 3, seed=9)
    full = ops.trace_cov_reference(X, Y, True)
    for largest in (True, False):
        vals, idx = trace_cov_topk_triton(X, Y, 4, normalize=True, largest=largest)
        rv, _ = ops.trace_cov_topk_reference(X, Y, 4, normalize=True, largest=largest)
        torch.testing.assert_close(vals.double(), rv)
        torch.testing.assert_close(full.gather(1, idx), rv)
        assert all(len(set(r.tolist())) == 4 for r in idx)


# ---------------------------------------------------------------------------------- top-k reference (CPU)
@pytest.mark.parametrize("normalize", [False, True])
def test_trace_cov_topk_reference_equals_full_topk(normalize):
    X, Y = _traces(13, 50, 6, seed=4)
    full = ops.trace_cov_reference(X, Y, normalize)
    for k, chunk in ((1, None), (7, 3), (50, 16), (50, None)):
        for largest in (True, False):
            v, i = ops.trace_cov_topk_reference(X, Y, k, normalize=normalize, largest=largest, chunk_size=chunk)
            fv, fi = torch.topk(full, k, dim=1, largest=largest)
            assert torch.equal(i, fi)
            torch.testing.assert_close(v, fv, rtol=1e-12, atol=1e-15)


def test_trace_cov_topk_reference_errors():
    X, Y = _traces(5, 12, 3, seed=6)
    for bad in (0, 13, True, 2.0):
        with pytest.raises(ValueError, match="k must be an int in"):
            ops.trace_cov_topk(X, Y, bad)
    X[:, 9] = 2.0  # in the last chunk: the error names the column as the full reference does
    with pytest.raises(ValueError) as ref_err:
        ops.trace_cov_reference(X, Y, True)
    with pytest.raises(ValueError) as got_err:
        ops.trace_cov_topk_reference(X, Y, 2, normalize=True, chunk_size=4)
    assert str(got_err.value) == str(ref_err.value) and "example 9" in str(ref_err.value)


# ------------------------------------------------------------------------------------------------ dispatch
def test_trace_cov_dispatch_cpu():
    X, Y = _traces(6, 10, 3, seed=8)
    out = ops.trace_cov(X, Y, True, block=4)
    assert out.dtype == torch.float64 and torch.equal(out, ops.trace_cov_reference(X, Y, True, block=4))
    v, i = ops.trace_cov_topk(X, Y, 3, largest=False)
    rv, ri = ops.trace_cov_topk_reference(X, Y, 3, largest=False)
    assert torch.equal(v, rv) and torch.equal(i, ri)
    for b in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match=f"backend '{b}' cannot run on cpu: tensors are on cpu"):
            ops.trace_cov(X, Y, backend=b)
        with pytest.raises(RuntimeError, match=f"fastinf.ops.trace_cov_topk: backend '{b}'"):
            ops.trace_cov_topk(X, Y, 2, backend=b)


@interp
@pytest.mark.interp
def test_trace_cov_auto_on_cuda_skips_float64(monkeypatch):
    """With a (fake) usable CUDA device and a (pretend) measured route, auto takes the Triton kernel for 16/32-bit
    inputs and the reference for float64 inputs or a float64 accumulation; the dispatch table's kernels are this
    module's. (The table's own routes are unmeasured today: the reference.)"""
    from fastinf.kernels import trace_cov as tk

    assert _dispatch.implementation("trace_cov", "triton") is tk.trace_cov_triton
    assert _dispatch.implementation("trace_cov_topk", "triton") is tk.trace_cov_topk_triton
    monkeypatch.setattr(_dispatch, "_why_unavailable", lambda b, device=None: None)
    monkeypatch.setattr(_dispatch, "_ensure_loaded", lambda b: None)
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    monkeypatch.delenv("FASTINF_BACKEND", raising=False)
    dev = torch.device("cuda", 0)  # a device object only: nothing runs on it
    x, y = torch.ones(3, 4), torch.ones(3, 2, dtype=torch.bfloat16)
    assert _dispatch.select("trace_cov", "auto", dev, (x, y, False), {})[0] == "torch"  # unmeasured
    measured = (_dispatch.Route("all", ("triton", "torch"), measured="pretend"),)
    for op in ("trace_cov", "trace_cov_topk"):
        entry = _dispatch.OpEntry(_dispatch.DISPATCH_TABLE[op].backends, measured)
        monkeypatch.setitem(_dispatch.DISPATCH_TABLE, op, entry)
    assert _dispatch.select("trace_cov", "auto", dev, (x, y, False), {})[0] == "triton"
    assert _dispatch.select("trace_cov", "auto", dev, (x.double(), y, False), {})[0] == "torch"
    assert _dispatch.select("trace_cov", "auto", dev, (x, y, True), {"dtype": torch.float64})[0] == "torch"
    assert _dispatch.select("trace_cov_topk", "auto", dev, (x, y, 2), {"normalize": True})[0] == "triton"
    assert _dispatch.select("trace_cov_topk", "auto", dev, (x, y.double(), 2), {})[0] == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        _dispatch.select("trace_cov_topk", "triton", dev, (x.double(), y, 2), {})


def test_trace_cov_on_cpu_stays_lean():
    """Importing fastinf and running both ops on CPU tensors imports no triton."""
    code = (
        "import sys, torch, fastinf; x = torch.randn(5, 4); "
        "fastinf.ops.trace_cov(x, x[:, :2], True); fastinf.ops.trace_cov_topk(x, x[:, :2], 2); "
        "assert 'triton' not in sys.modules, 'a CPU op imported triton'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


_AOT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastinf.kernels import trace_cov as tc

target = GPUTarget("cuda", int(sys.argv[1]), 32)
dt = "*bf16"  # the dtype the interpreter cannot run
ptrs = {p: "*fp32" for p in ("KX_ptr", "MX_ptr", "KY_ptr", "MY_ptr", "SX_ptr", "SY_ptr")}
strides = {s: "i32" for s in ("stride_xd", "stride_xn", "stride_yd", "stride_ym")}
kernels = [
    (tc._trace_cov_stats_kernel,
     {"A_ptr": dt, "MEAN_ptr": "*fp32", "M2_ptr": "*fp32", "N": "i32", "c": "i32", "stride_d": "i32",
      "stride_c": "i32", "BLOCK_D": "constexpr", "BLOCK_C": "constexpr"},
     {"BLOCK_D": 32, "BLOCK_C": 128}),
    (tc._trace_cov_kernel,
     {"X_ptr": dt, "Y_ptr": dt, **ptrs, "OUT_ptr": "*fp32", "N": "i32", "n": "i32", "m": "i32", "alpha": "fp32",
      **strides, "stride_om": "i32", "SCALE": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr",
      "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
     {"SCALE": True, "PRECISION": "tf32x3", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}),
    (tc._trace_cov_topk_kernel,
     {"X_ptr": dt, "Y_ptr": dt, **ptrs, "CAND_ptr": "*i64", "N": "i32", "n": "i32", "m": "i32", "alpha": "fp32",
      "k": "i32", "cols_per_split": "i32", **strides, "stride_cm": "i32", "SCALE": "constexpr",
      "NEGATE": "constexpr", "PRECISION": "constexpr", "LOW": "constexpr", "KEY_MIN": "constexpr",
      "KP": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
     {"SCALE": True, "NEGATE": True, "PRECISION": "tf32x3", "LOW": tc._LOW, "KEY_MIN": tc._INT64_MIN, "KP": 16,
      "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}),
]
for fn, sig, consts in kernels:
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": 4, "num_stages": 3})
    assert k.asm.get("cubin"), fn.__name__
    print(fn.__name__, "shared", k.metadata.shared)
"""


def test_trace_cov_kernels_compile_for_the_gpu(tmp_path):
    """Without a GPU: the three kernels (bfloat16 inputs, GPU-sized blocks) compile to sm_90 cubins with triton's
    own toolchain, so GPU-only lowering errors (bf16 loads, the int64 top-k merge, 3xTF32 wgmma) fail here."""
    pytest.importorskip("triton")
    r = subprocess.run(
        [sys.executable, "-c", _AOT, "90"],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("shared") == 3, r.stdout
