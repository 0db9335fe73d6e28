"""Tier (a): the ops' PyTorch references against independent float64 formulas; dispatch behaviour."""

import os
import subprocess
import sys

import pytest
import torch

from fastinf import ops


def test_datainf_inverse_sum_reference_matches_loop():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(9, 5, generator=g, dtype=torch.float64)
    T = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lam = 0.3
    H = torch.zeros_like(T)
    for j in range(3):
        for i in range(9):
            c = (T[j] @ G[i]) / (lam + G[i] @ G[i])
            H[j] += (T[j] - c * G[i]) / (9 * lam)
    for chunk in (None, 1, 4):
        torch.testing.assert_close(ops.datainf_inverse_sum_reference(G, T, lam, chunk_size=chunk), H)
    torch.testing.assert_close(ops.datainf_inverse_sum(G, T, lam, backend="torch"), H)
    # half precision inputs accumulate in float32
    out = ops.datainf_inverse_sum_reference(G.to(torch.bfloat16), T.to(torch.bfloat16), lam)
    assert out.dtype == torch.float32


def test_datainf_inverse_sum_bad_input():
    with pytest.raises(ValueError, match="lam"):
        ops.datainf_inverse_sum_reference(torch.ones(2, 3), torch.ones(1, 3), 0.0)
    with pytest.raises(ValueError, match="width"):
        ops.datainf_inverse_sum_reference(torch.ones(2, 3), torch.ones(1, 4), 0.1)


def test_rrinf_row_updates_reference_matches_loop():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(12, 5, generator=g, dtype=torch.float64)
    rows[3] = 0.0  # a zero row is skipped
    targets = torch.randn(12, 2, generator=g, dtype=torch.float64)
    lr, reg = 0.05, 0.01
    for b in (1, 3):
        om = torch.zeros(5, 2, dtype=torch.float64)
        for s in range(12 // b):
            upd, cnt = torch.zeros_like(om), 0
            for r in range(s * b, (s + 1) * b):
                phi = rows[r]
                if phi.norm() == 0:
                    continue
                cnt += 1
                upd += 2 * torch.outer(phi, phi @ om - targets[r]) / (phi @ phi)
            if cnt:
                om = om - lr * (upd / cnt + 2 * reg * om)
        got = ops.rrinf_row_updates_reference(rows, targets, torch.zeros(5, 2, dtype=torch.float64), lr, reg, b)
        torch.testing.assert_close(got, om)


def test_explicit_backend_that_cannot_run_raises():
    x = torch.ones(2, 3)
    for b in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match=b):
            ops.datainf_inverse_sum(x, x, 0.1, backend=b)
    with pytest.raises(ValueError, match="backend"):
        ops.datainf_inverse_sum(x, x, 0.1, backend="fast")
    state = ops.backends()
    assert state["torch"] == "available"
    assert set(state) == {"cuda", "triton", "torch"}
    if not torch.cuda.is_available():
        assert state["cuda"].startswith("unavailable")


def test_import_is_lean():
    code = (
        "import sys, fastinf, torch; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(), 'cuda initialised'; "
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'cpp_extension imported'"
    )
    env = {**os.environ}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("masked", [False, True])
def test_lora_per_sample_grads_reference_matches_autograd(masked):
    g = torch.Generator().manual_seed(2)
    N, S, din, dout, r, scale = 3, 5, 7, 6, 2, 0.75
    x = torch.randn(N, S, din, generator=g, dtype=torch.float64)
    A = torch.randn(r, din, generator=g, dtype=torch.float64)
    B = torch.randn(dout, r, generator=g, dtype=torch.float64)
    target = torch.randn(N, S, dout, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, S, generator=g) > 0.4).double() if masked else None
    for i in range(N):  # an independent per-example autograd loop
        Ai, Bi = A.clone().requires_grad_(), B.clone().requires_grad_()
        y = scale * (x[i] @ Ai.T) @ Bi.T
        per_pos = ((y - target[i]) ** 2).sum(-1)
        loss = (per_pos * mask[i]).sum() if masked else per_pos.sum()
        loss.backward()
        dy = 2 * (y.detach() - target[i])
        gA, gB, sq = ops.lora_per_sample_grads_reference(
            x[i : i + 1], dy[None], A, B, scale, None if mask is None else mask[i : i + 1], return_sq_norms=True
        )
        torch.testing.assert_close(gA[0], Ai.grad)
        torch.testing.assert_close(gB[0], Bi.grad)
        torch.testing.assert_close(sq[0], Ai.grad.pow(2).sum() + Bi.grad.pow(2).sum())


def test_lora_per_sample_grads_shapes_checked():
    x, dy = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="must be"):
        ops.lora_per_sample_grads(x, dy, torch.randn(2, 5), torch.randn(5, 2))
    with pytest.raises(ValueError, match="mask"):
        ops.lora_per_sample_grads(x, dy, torch.randn(2, 4), torch.randn(5, 2), 1.0, torch.ones(2, 4))
    gA, gB = ops.lora_per_sample_grads(x.bfloat16(), dy.bfloat16(), torch.randn(2, 4), torch.randn(5, 2))
    assert gA.dtype == torch.float32 and gA.shape == (2, 2, 4) and gB.shape == (2, 5, 2)
    with pytest.raises(ValueError, match="u = A x must be"):
        ops.lora_per_sample_grads(x, dy, torch.randn(2, 4), torch.randn(5, 2), u=torch.randn(2, 3, 3))


def test_lora_per_sample_grads_hooked_u():
    """u = A x passed in (the capture hook's lora_A output) is used as given: the same gradients as u=None, and
    a different u changes gB (so the argument is not ignored)."""
    g = torch.Generator().manual_seed(4)
    x, dy = (
        torch.randn(2, 6, 5, generator=g, dtype=torch.float64),
        torch.randn(2, 6, 3, generator=g, dtype=torch.float64),
    )
    A, B = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 6, generator=g) > 0.3
    want = ops.lora_per_sample_grads(x, dy, A, B, 0.5, mask)
    got = ops.lora_per_sample_grads(x, dy, A, B, 0.5, mask, u=x @ A.T)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    other = ops.lora_per_sample_grads(x, dy, A, B, 0.5, mask, u=2 * (x @ A.T))
    torch.testing.assert_close(other[1], 2 * want[1])
    torch.testing.assert_close(other[0], want[0])  # gA does not depend on u


@pytest.mark.skipif(not os.environ.get("FASTINF_REQUIRE_BACKENDS"), reason="FASTINF_REQUIRE_BACKENDS not set")
def test_required_backends_load():
    """bench/gpu_check.sh sets FASTINF_REQUIRE_BACKENDS=cuda,triton: a backend that cannot load (a failed CUDA
    build, no GPU) fails here instead of turning every test of it into a skip."""
    from fastinf.ops import _dispatch

    for b in [s.strip() for s in os.environ["FASTINF_REQUIRE_BACKENDS"].split(",") if s.strip()]:
        why = _dispatch._why_unavailable(b) or _dispatch._ensure_loaded(b)
        assert why is None, f"backend {b!r} is required (FASTINF_REQUIRE_BACKENDS) but cannot run: {why}"
