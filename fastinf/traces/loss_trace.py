"""``LossTrace``: per-example losses along a sequence of weights (training checkpoints or SGLD draws)."""

from __future__ import annotations

import torch

__all__ = ["LossTrace"]


class LossTrace:
    """Losses of n examples at T weight settings, plus what the trace-based estimators need.

    Args:
        losses: (T, n) — row t = the loss of every example at checkpoint / draw t.
        checkpoints_gram: (T, T) Gram matrix Γ = ΘΘᵀ of the checkpoints' trainable parameters
            (Z0-Inf needs it; BIF does not). Must be symmetric positive semi-definite.
        chains: (T,) integer chain id of each draw (BIF diagnostics); None = one chain.
        reference: (n,) losses at the reference weights w* (BIF subtracts it before accumulating).

    Raises ``ValueError``/``TypeError`` on shape, dtype, non-finite values or a Gram that is not
    T × T, symmetric and PSD.
    """

    def __init__(
        self,
        losses: torch.Tensor,
        checkpoints_gram: torch.Tensor | None = None,
        *,
        chains: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> None:
        losses = torch.as_tensor(losses)
        if not losses.is_floating_point():
            raise TypeError(f"losses must have a floating dtype, got {losses.dtype}")
        if losses.dim() != 2:
            raise ValueError(f"losses must be (T, n), got shape {tuple(losses.shape)}")
        T, n = losses.shape
        if T == 0 or n == 0:
            raise ValueError(f"losses is empty: shape {tuple(losses.shape)}")
        bad = ~torch.isfinite(losses)
        if bool(bad.any()):
            t, i = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"losses: non-finite value at checkpoint/draw {t}, example {i}")
        if checkpoints_gram is not None:
            g = torch.as_tensor(checkpoints_gram, dtype=torch.float64)
            if g.shape != (T, T):
                raise ValueError(f"checkpoints_gram must be (T, T) = ({T}, {T}), got {tuple(g.shape)}")
            if not bool(torch.isfinite(g).all()):
                raise ValueError("checkpoints_gram has non-finite entries")
            scale = float(g.abs().max()) or 1.0
            if float((g - g.T).abs().max()) > 1e-8 * scale:
                raise ValueError("checkpoints_gram is not symmetric")
            w = torch.linalg.eigvalsh((g + g.T) / 2)
            if float(w.min()) < -1e-8 * max(float(w.max()), 1e-300) * T:
                raise ValueError(
                    f"checkpoints_gram is not positive semi-definite (smallest eigenvalue {float(w.min()):.3g})"
                )
            checkpoints_gram = g
        if chains is not None:
            chains = torch.as_tensor(chains, dtype=torch.long).reshape(-1)
            if chains.shape != (T,):
                raise ValueError(f"chains must have one id per row (T = {T}), got {tuple(chains.shape)}")
        if reference is not None:
            reference = torch.as_tensor(reference, dtype=losses.dtype).reshape(-1)
            if reference.shape != (n,):
                raise ValueError(f"reference must have one loss per example (n = {n}), got {tuple(reference.shape)}")
            if not bool(torch.isfinite(reference).all()):
                raise ValueError("reference losses contain NaN or inf")
        self.losses = losses
        self.checkpoints_gram = checkpoints_gram
        self.chains = chains
        self.reference = reference

    @property
    def T(self) -> int:
        return self.losses.shape[0]

    @property
    def n(self) -> int:
        return self.losses.shape[1]

    def subset(self, index) -> LossTrace:
        """The same trace restricted to some examples."""
        idx = torch.arange(self.n)[index]
        return LossTrace(
            self.losses[:, idx],
            self.checkpoints_gram,
            chains=self.chains,
            reference=None if self.reference is None else self.reference[idx],
        )

    def __repr__(self) -> str:
        extra = ", gram" if self.checkpoints_gram is not None else ""
        if self.chains is not None:
            extra += f", chains={int(self.chains.unique().numel())}"
        return f"LossTrace(T={self.T}, n={self.n}{extra})"
