"""Tier (b): the Triton kernels under TRITON_INTERPRET=1 against the PyTorch references, at small awkward
shapes (one example, rank 1, non-powers of two, masked tails, S and d not multiples of the block, several
programs, split-K, chunked passes, zero rows and all-zero steps). Plus the dispatcher's logic.

The interpreter runs on CPU tensors and computes bfloat16 wrongly, so the launchers upcast bf16 there;
real bf16 is checked in the GPU tier (tests/ops/test_gpu.py). Each case is kept tiny: the interpreter
executes every program instance in Python.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from fastinf import ops
from fastinf.ops import _dispatch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 set before triton is imported"
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# tolerance on ‖out − ref‖/‖ref‖: float32 inputs (3×TF32 on GPU, exact float32 here) and float16
# (16-bit tensor-core operands: A, B and the intermediates u, v, C are rounded to float16)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-5}  # bf16 is upcast here


# -------------------------------------------------------------------------------------------- LoRA
LORA_CASES = [
    # N, S, d_in, d_out, r, dtype, mask
    (1, 1, 1, 1, 1, torch.float32, None),
    (2, 37, 21, 19, 3, torch.float32, "float"),  # S not a multiple of the block, masked tail
    (1, 33, 17, 40, 17, torch.float16, "bool"),  # r over one rank tile, d_out over two d tiles
    (2, 20, 24, 24, 8, torch.bfloat16, None),
]


@interp
@pytest.mark.interp
@pytest.mark.parametrize("N,S,din,dout,r,dtype,mask", LORA_CASES)
def test_lora_per_sample_grads_triton(N, S, din, dout, r, dtype, mask):
    from fastinf.kernels.lora_per_sample_grads import lora_per_sample_grads_triton

    g = _gen(N * 1000 + S)
    x = torch.randn(N, S, din, generator=g).to(dtype)
    dy = torch.randn(N, S, dout, generator=g).to(dtype)
    A, B = torch.randn(r, din, generator=g), torch.randn(dout, r, generator=g)
    m = None
    if mask is not None:
        m = torch.rand(N, S, generator=g) > 0.3
        m[:, -1] = False  # the last row masked out
        m = m if mask == "bool" else m.float()
    got = lora_per_sample_grads_triton(x, dy, A, B, 0.7, m, return_sq_norms=True)
    ref = ops.lora_per_sample_grads_reference(x, dy, A, B, 0.7, m, return_sq_norms=True)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert torch.isfinite(a).all()
        assert _rel(a, b) < TOL[dtype]


@interp
@pytest.mark.interp
def test_lora_per_sample_grads_triton_strided_inputs():
    """Non-contiguous x / dy views (as a hook may hand over) are read through their strides."""
    from fastinf.kernels.lora_per_sample_grads import lora_per_sample_grads_triton

    g = _gen(7)
    x = torch.randn(19, 2, 12, generator=g).transpose(0, 1)  # (2, 19, 12), non-contiguous
    dy = torch.randn(2, 19, 30, generator=g)[:, :, 3:26]  # (2, 19, 23), strided rows
    A, B = torch.randn(2, 12, generator=g), torch.randn(23, 2, generator=g)
    got = lora_per_sample_grads_triton(x, dy, A, B, 2.0)
    ref = ops.lora_per_sample_grads_reference(x, dy, A, B, 2.0)
    assert max(_rel(a, b) for a, b in zip(got, ref, strict=True)) < 1e-5


@interp
@pytest.mark.interp
def test_lora_per_sample_grads_triton_v_pieces_and_v_pass():
    """Both ways of forming v = dy B (pieces from the dy pass, or a pass of its own for large r) give the
    reference's gradients; which one runs follows lora_v_pieces."""
    from fastinf.kernels import _common
    from fastinf.kernels.lora_per_sample_grads import lora_per_sample_grads_triton

    g = _gen(9)
    x, dy = torch.randn(2, 21, 40, generator=g), torch.randn(2, 21, 70, generator=g)
    A, B = torch.randn(8, 40, generator=g), torch.randn(70, 8, generator=g)
    ref = ops.lora_per_sample_grads_reference(x, dy, A, B, 1.5)
    base = {"BLOCK_S": 16, "BLOCK_R": 16, "BLOCK_D": 16, "num_warps": 1, "num_stages": 1}
    for bdy, pieces in ((16, False), (64, True)):
        assert _common.lora_v_pieces(8, bdy, 4) is pieces
        got = lora_per_sample_grads_triton(x, dy, A, B, 1.5, config={**base, "BLOCK_D_DY": bdy})
        assert max(_rel(a, b) for a, b in zip(got, ref, strict=True)) < 1e-5, bdy


# ----------------------------------------------------------------------------------------- DataInf
DATAINF_CASES = [
    # n, d, m, dtype, chunk_size, sq_norms
    (1, 1, 1, torch.float32, None, False),
    (37, 45, 3, torch.float32, None, False),  # several G tiles, masked tails everywhere
    (16, 300, 1, torch.float32, None, False),  # few tiles: the width is split (split-K) and summed
    (29, 50, 17, torch.float16, 8, True),  # chunked passes (accumulating epilogue), given ‖g‖², two m tiles
    (9, 33, 5, torch.bfloat16, None, False),
]


@interp
@pytest.mark.interp
@pytest.mark.parametrize("n,d,m,dtype,chunk,given_sq", DATAINF_CASES)
def test_datainf_inverse_sum_triton(n, d, m, dtype, chunk, given_sq):
    from fastinf.kernels.datainf_inverse_sum import datainf_inverse_sum_triton

    g = _gen(n * 100 + d)
    G = torch.randn(n, d, generator=g).to(dtype)
    T = torch.randn(m, d, generator=g).to(dtype)
    lam = 0.37
    sq = G.float().pow(2).sum(1) if given_sq else None
    got = datainf_inverse_sum_triton(G, T, lam, sq_norms=sq, chunk_size=chunk)
    ref = ops.datainf_inverse_sum_reference(G, T, lam, sq_norms=sq)
    assert got.shape == ref.shape and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _rel(got, ref) < TOL[dtype]


@interp
@pytest.mark.interp
def test_datainf_inverse_sum_triton_column_slices():
    """Blocks cut out of a wider (n, D) matrix (the estimators' layout) are strided views."""
    from fastinf.kernels.datainf_inverse_sum import datainf_inverse_sum_triton

    g = _gen(3)
    full_G, full_T = torch.randn(21, 40, generator=g), torch.randn(4, 40, generator=g)
    G, T = full_G[:, 5:30], full_T[:, 5:30]
    assert not G.is_contiguous()
    got = datainf_inverse_sum_triton(G, T, 0.2)
    assert _rel(got, ops.datainf_inverse_sum_reference(G, T, 0.2)) < 1e-5


# ------------------------------------------------------------------------------------------- RRInf
RRINF_CASES = [
    # steps*batch, n, m, batch, dtype, lr as a per-step tensor, reg
    (1, 1, 1, 1, torch.float32, False, 0.01),
    (12, 7, 5, 3, torch.float32, True, 0.01),  # a zero row, an all-zero step, per-step lr
    (10, 33, 9, 1, torch.float16, False, 0.0),  # several programs (columns split), no regularisation
    (8, 20, 3, 2, torch.bfloat16, True, 0.05),
]


@interp
@pytest.mark.interp
@pytest.mark.parametrize("T,n,m,b,dtype,lr_tensor,reg", RRINF_CASES)
def test_rrinf_row_updates_triton(T, n, m, b, dtype, lr_tensor, reg):
    from fastinf.kernels.rrinf_row_updates import rrinf_row_updates_triton

    g = _gen(T * 10 + n)
    rows = torch.randn(T, n, generator=g).to(dtype)
    if T > 1:
        rows[1] = 0.0  # a zero row is skipped
    if b > 1 and T >= 2 * b:
        rows[b : 2 * b] = 0.0  # a step with only zero rows leaves Ω unchanged
    targets = torch.randn(T, m, generator=g).to(dtype)
    omega = torch.randn(n, m, generator=g)
    lr = torch.rand(T // b, generator=g) * 0.1 + 0.01 if lr_tensor else 0.05
    got = rrinf_row_updates_triton(rows, targets, omega, lr, reg, b)
    ref = ops.rrinf_row_updates_reference(rows, targets, omega, lr, reg, b)
    assert got.shape == ref.shape and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert _rel(got, ref) < 1e-5
    assert not torch.equal(omega, got)  # the input is left untouched, a new tensor is returned


@interp
@pytest.mark.interp
def test_rrinf_row_updates_triton_first_step_from_zero():
    """METHODS.md §5: the first step from Ω = 0 on row ι is exactly 2η υ_ι φ_ι / ‖φ_ι‖²."""
    from fastinf.kernels.rrinf_row_updates import rrinf_row_updates_triton

    g = _gen(11)
    phi, ups = torch.randn(1, 6, generator=g), torch.randn(1, 2, generator=g)
    got = rrinf_row_updates_triton(phi, ups, torch.zeros(6, 2), 0.01, 0.3, 1)
    torch.testing.assert_close(got, 2 * 0.01 * phi[0, :, None] * ups[0][None, :] / phi.pow(2).sum())


@interp
@pytest.mark.interp
def test_rrinf_row_updates_triton_bad_lr_length():
    from fastinf.kernels.rrinf_row_updates import rrinf_row_updates_triton

    with pytest.raises(ValueError, match="lr has 2 entries"):
        rrinf_row_updates_triton(torch.ones(3, 2), torch.ones(3, 1), torch.zeros(2, 1), torch.ones(2), 0.0)


# ------------------------------------------------------------------------------------------ dispatch
def test_dispatch_table_shape():
    """Every public op has one implementation per backend at most, backends from BACKENDS, its PyTorch
    reference as the ``torch`` row, rows that name modules inside the ops' own layer (kernels, _ext or the op's
    module), and auto routes that obey the table's rules (check_table)."""
    assert set(_dispatch.DISPATCH_TABLE) == {
        "lora_per_sample_grads",
        "datainf_inverse_sum",
        "rrinf_row_updates",
        "trace_cov",
        "trace_cov_topk",
    }
    _dispatch.check_table()
    for op, entry in _dispatch.DISPATCH_TABLE.items():
        assert _dispatch.implementation(op, "torch") is getattr(ops, f"{op}_reference")
        for r in entry.backends:
            assert r.module.startswith(("fastinf.kernels.", "fastinf._ext.", f"fastinf.ops.{op.removesuffix('_topk')}"))
            assert r.supports is None or r.supports.count(":") == 1, r
        for rt in entry.routes:
            assert rt.when is None or callable(_dispatch._attr(rt.when)), rt


def test_unmeasured_routes_run_the_reference():
    """Nothing has been measured on a GPU yet: every route is the reference alone, and the table refuses a kernel
    in an auto order without a cited measurement."""
    for op, entry in _dispatch.DISPATCH_TABLE.items():
        for rt in entry.routes:
            assert rt.order == ("torch",) or rt.measured, (op, rt)
    bad = _dispatch.OpEntry(
        _dispatch.DISPATCH_TABLE["trace_cov"].backends, (_dispatch.Route("all", ("triton", "torch")),)
    )
    with pytest.raises(ValueError, match="needs the GPU measurement"):
        _dispatch.check_table({"trace_cov": bad})
    no_ref = _dispatch.OpEntry(
        _dispatch.DISPATCH_TABLE["trace_cov"].backends, (_dispatch.Route("all", ("triton",), measured="x.csv"),)
    )
    with pytest.raises(ValueError, match="must end with torch"):
        _dispatch.check_table({"trace_cov": no_ref})


def test_datainf_small_m_route():
    G, T1, T9 = torch.ones(3, 4), torch.ones(1, 4), torch.ones(9, 4)
    assert _dispatch.route("datainf_inverse_sum", (G, T1, 0.1)).shapes == "m <= 8"
    assert _dispatch.route("datainf_inverse_sum", (G, T9, 0.1)).shapes == "m > 8"
    assert _dispatch.route("datainf_inverse_sum").shapes == "m > 8"  # no inputs: the catch-all


@interp
@pytest.mark.interp
def test_dispatch_table_resolves_every_triton_row():
    """Each Triton row's module, function and check exist (the CUDA rows are checked without building)."""
    from fastinf._ext import ops as ext_ops

    for op, entry in _dispatch.DISPATCH_TABLE.items():
        for r in entry.backends:
            fn = _dispatch.implementation(op, r.name)
            assert callable(fn) and fn.__name__ == r.function, (op, r)
            if r.name == "cuda":
                assert fn is getattr(ext_ops, r.function)
            if r.supports is not None:
                assert callable(_dispatch._attr(r.supports)), r


@pytest.fixture
def fake_backends(monkeypatch):
    """A fake op whose cuda and triton kernels 'can run' on a (fake) CUDA device, loaded through the table; its
    route is 'measured' cuda > triton > torch."""
    calls = []
    fake = types.ModuleType("fastinf_fake_kernels")
    fake.cuda_fn = lambda x: calls.append("cuda")
    fake.triton_fn = lambda x: calls.append("triton")
    fake.torch_fn = lambda x: calls.append("torch")
    fake.no_f64 = lambda x: "float64 runs on the reference" if x.dtype == torch.float64 else None
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    table = {
        "fake_op": _dispatch.OpEntry(
            (
                _dispatch.Backend("cuda", fake.__name__, "cuda_fn", f"{fake.__name__}:no_f64"),
                _dispatch.Backend("triton", fake.__name__, "triton_fn"),
                _dispatch.Backend("torch", fake.__name__, "torch_fn"),
            ),
            (_dispatch.Route("all", ("cuda", "triton", "torch"), measured="a test's pretend measurement"),),
        )
    }
    monkeypatch.setattr(_dispatch, "DISPATCH_TABLE", table)
    monkeypatch.setattr(_dispatch, "BACKEND_SETUP", {})
    monkeypatch.setattr(_dispatch, "_why_unavailable", lambda b, device=None: None)
    monkeypatch.setattr(_dispatch, "_IMPLS", {})
    monkeypatch.setattr(_dispatch, "_LOADED", set())
    monkeypatch.setattr(_dispatch, "_LOAD_ERRORS", {})
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    monkeypatch.delenv("FASTINF_BACKEND", raising=False)
    return fake


def test_auto_prefers_cuda_then_triton_then_torch(fake_backends, caplog):
    dev = torch.device("cuda", 0)  # a device object only: nothing runs on it
    x32, x64 = torch.ones(1), torch.ones(1, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="fastinf.ops"):
        assert _dispatch.select("fake_op", "auto", dev, (x32,)) == ("cuda", fake_backends.cuda_fn)
        assert _dispatch.select("fake_op", "auto", dev, (x32,))[0] == "cuda"
        assert _dispatch.select("fake_op", "auto", dev, (x64,))[0] == "triton"  # cuda declines float64
        assert _dispatch.select("fake_op", "auto", torch.device("cpu"), (x32,)) == ("torch", fake_backends.torch_fn)
    msgs = [r.getMessage() for r in caplog.records if "fake_op" in r.getMessage()]
    assert len(msgs) == 3  # once per (op, backend, device type)
    assert "skipped cuda: float64 runs on the reference" in msgs[1]
    assert "skipped" not in msgs[2]  # on CPU the kernels are not tried
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cuda:0: float64 runs on the reference"):
        _dispatch.select("fake_op", "cuda", dev, (x64,))
    assert _dispatch.select("fake_op", "triton", dev, (x64,))[0] == "triton"


def _set_routes(monkeypatch, *routes):
    entry = _dispatch.DISPATCH_TABLE["fake_op"]
    monkeypatch.setitem(_dispatch.DISPATCH_TABLE, "fake_op", _dispatch.OpEntry(entry.backends, tuple(routes)))


def test_route_order_is_the_auto_order(fake_backends, monkeypatch):
    """auto follows the route's order, whatever it is, per shape class (a measured order may put torch first)."""
    dev = torch.device("cuda", 0)
    fake_backends.big = lambda x: x.numel() > 1
    _set_routes(
        monkeypatch,
        _dispatch.Route("numel > 1", ("triton", "cuda", "torch"), measured="m", when=f"{fake_backends.__name__}:big"),
        _dispatch.Route("the rest", ("torch",)),
    )
    assert _dispatch.select("fake_op", "auto", dev, (torch.ones(2),))[0] == "triton"
    assert _dispatch.select("fake_op", "auto", dev, (torch.ones(1),))[0] == "torch"
    assert _dispatch.select("fake_op", "cuda", dev, (torch.ones(1),))[0] == "cuda"  # explicit: any implementation
    monkeypatch.setitem(
        _dispatch.DISPATCH_TABLE, "fake_op", _dispatch.OpEntry(_dispatch.DISPATCH_TABLE["fake_op"].backends[1:], ())
    )
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cuda:0: no cuda kernel for fake_op"):
        _dispatch.select("fake_op", "cuda", dev, (torch.ones(1),))


def test_trace_cov_auto_on_cuda_never_builds_the_extension(monkeypatch):
    """trace_cov has no CUDA kernel: auto on a CUDA device never calls the CUDA setup (the JIT build), not even
    under a measured route that names cuda first; the current (unmeasured) route goes straight to the reference."""
    built = []
    monkeypatch.setattr(_dispatch, "BACKEND_SETUP", {"cuda": "builtins:print"})
    monkeypatch.setattr(_dispatch, "_ensure_loaded", lambda b: built.append(b) or "not loaded in this test")
    monkeypatch.setattr(_dispatch, "_why_unavailable", lambda b, device=None: None)
    monkeypatch.setattr(_dispatch, "_LOGGED", set())
    monkeypatch.delenv("FASTINF_BACKEND", raising=False)
    dev = torch.device("cuda", 0)
    X, Y = torch.randn(4, 3), torch.randn(4, 2)
    assert _dispatch.select("trace_cov", "auto", dev, (X, Y))[0] == "torch"
    assert built == []
    entry = _dispatch.DISPATCH_TABLE["trace_cov"]
    measured = _dispatch.Route("all", ("cuda", "triton", "torch"), measured="pretend")
    monkeypatch.setitem(_dispatch.DISPATCH_TABLE, "trace_cov", _dispatch.OpEntry(entry.backends, (measured,)))
    assert _dispatch.select("trace_cov", "auto", dev, (X, Y))[0] == "torch"
    assert built == ["triton"]  # triton was tried, cuda never


def test_load_failure_is_the_backends_reason(fake_backends, monkeypatch, caplog):
    """A backend whose setup (e.g. the CUDA build) fails is skipped by auto and named by an explicit request."""

    def failing_build():
        raise OSError("nvcc exploded")

    fake_backends.failing_build = failing_build
    monkeypatch.setattr(_dispatch, "BACKEND_SETUP", {"cuda": f"{fake_backends.__name__}:failing_build"})
    dev = torch.device("cuda", 0)
    with caplog.at_level(logging.WARNING, logger="fastinf.ops"):
        assert _dispatch.select("fake_op", "auto", dev, (torch.ones(1),))[0] == "triton"
    assert "nvcc exploded" in caplog.text
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run on cuda:0: .*OSError: nvcc exploded"):
        _dispatch.select("fake_op", "cuda", dev, (torch.ones(1),))


def test_env_override(fake_backends, monkeypatch):
    dev = torch.device("cuda", 0)
    monkeypatch.setenv("FASTINF_BACKEND", "triton")
    assert _dispatch.select("fake_op", "auto", dev, (torch.ones(1),))[0] == "triton"
    assert _dispatch.select("fake_op", "cuda", dev, (torch.ones(1),))[0] == "cuda"  # explicit beats env
    monkeypatch.setenv("FASTINF_BACKEND", "torch")
    assert _dispatch.select("fake_op", "auto", dev, (torch.ones(1),))[0] == "torch"
    monkeypatch.setenv("FASTINF_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTINF_BACKEND"):
        _dispatch.select("fake_op", "auto", dev, (torch.ones(1),))


def test_explicit_backend_on_cpu_names_device_and_reason():
    x = torch.ones(3, 4)
    for b in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match=f"backend '{b}' cannot run on cpu: tensors are on cpu"):
            ops.lora_per_sample_grads(x[None], x[None], torch.ones(2, 4), torch.ones(4, 2), backend=b)
        with pytest.raises(RuntimeError, match=b):
            ops.rrinf_row_updates(x, x, torch.zeros(4, 4), 0.1, 0.0, backend=b)


def test_backends_report_and_stay_lean():
    """backends() answers without importing triton or building anything (nor initialising CUDA where there
    is none; on a GPU it reads the device's compute capability)."""
    code = (
        "import sys, torch, fastinf; s = fastinf.ops.backends(); "
        "assert set(s) == {'cuda', 'triton', 'torch'} and s['torch'] == 'available', s; "
        "assert all(v == 'available' or v.startswith('unavailable: ') for v in s.values()), s; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'cpp_extension imported'; "
        "assert torch.cuda.is_available() or not torch.cuda.is_initialized(), 'cuda initialised'; "
        "x = torch.randn(3, 4); fastinf.ops.datainf_inverse_sum(x, x, 0.1); "
        "assert 'triton' not in sys.modules, 'a CPU op imported triton'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
