"""DataInf (Kwon et al., ICLR 2024; METHODS.md §3).

Per block group (default: per block) with damping λ, the inverse of the damped Fisher is replaced
by the average of rank-one inverses (Sherman–Morrison):

    h(t) = (1/(nλ)) Σ_i [ t − (g_iᵀ t / (λ + ‖g_i‖²)) g_i ],     I(i, j) = − Σ_groups h(t_j)ᵀ g_i.

Two exactly equal forms:

* ``"streaming"``: h(T) for all m tests by one pass over the training gradients in row chunks (per
  chunk: the norms ‖g_i‖², the products g_iᵀT and the rank-one accumulation S = Σ_i (g_iᵀT)/(λ+‖g_i‖²) g_i,
  fused), then scores by one more pass. Never holds an n×n matrix; cost ≈ 3·m·n·D.
* ``"gram"``: P = T Φ, K = ΦᵀΦ, I = −(1/λ)[P − (P diag(1/(λ + K_ii))) K / n]; cost ≈ n²D + m·n·D + m·n².
  Cheaper when m is large relative to the block width; holds one n×n Gram at a time. In-memory training
  sets on one process only.

``form="auto"`` picks the cheaper one by that flop count, and the streaming form whenever n exceeds
``gram_max_n``, the training set is a GradientStore, or the rows are split over ranks. ``topk`` and
``self_influence`` always stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..distributed import all_reduce_sum
from ..gradients.gradient_set import GradientSet
from ..ops import datainf_inverse_sum
from .base import Estimator, EstimatorOptions, register

__all__ = ["DataInf"]


@dataclass
class DataInfOptions(EstimatorOptions):
    blockwise: bool = field(default=True, metadata={"help": "one λ_l and one rank-one sum per block (the method)"})
    form: str = field(default="auto", metadata={"help": "'auto' | 'gram' | 'streaming'"})
    gram_max_n: int = field(default=16384, metadata={"help": "never use the Gram form above this n"})
    pairwise_max_n: int = field(
        default=100_000,
        metadata={
            "help": "self_influence needs every pair of training examples (O(n²·D) work, about n/chunk passes): "
            "refused above this n"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in ("auto", "gram", "streaming"):
            raise ValueError(f"form must be 'auto', 'gram' or 'streaming', got {self.form!r}")
        if not isinstance(self.gram_max_n, int) or self.gram_max_n < 1:
            raise ValueError(f"gram_max_n must be a positive int, got {self.gram_max_n!r}")
        if not isinstance(self.pairwise_max_n, int) or self.pairwise_max_n < 1:
            raise ValueError(f"pairwise_max_n must be a positive int, got {self.pairwise_max_n!r}")


@register
class DataInf(Estimator):
    """DataInf influence; block-wise by default (``blockwise=False`` treats all blocks as one).

    Passes over the training gradients (streaming form):

    * ``fit``: 0 with an explicit ``damping``; with ``damping="auto"``, 0 on a GradientStore that recorded
      its per-block sums of squares when written (:meth:`GradientStore.block_sq_sums`; any rank split),
      else 1 (in memory, or an older store: the rank-one weights 1/(λ + ‖g_i‖²) need λ before the
      accumulation can start).
    * ``score(test, reduce="mean")``: 2 — one fused pass (norms, g_iᵀt̄ and the rank-one accumulation,
      S all-reduced across ranks), then one scoring pass. So fit + score(reduce="mean") is 2 passes with an
      explicit λ, and with ``"auto"`` on such a store; 3 with ``"auto"`` in memory or on an older store.
      ``score`` (reduce=None) and ``topk``: 2 likewise.
    * ``self_influence``: −(1/λ)[‖g_i‖² − (1/n) Σ_k (g_iᵀg_k)² / (λ + ‖g_k‖²)] needs every pair of training
      examples: O(n²·D) work, 1 + ⌈n_rank/chunk⌉ passes (each inner pass reads all n rows, on every rank).
      Refused above ``pairwise_max_n`` (default 100 000) with a ValueError.

    Memory: O(chunk·D + m·D + output) (the accumulator S is m×D); ``self_influence`` O(chunk·D + chunk² + n).
    The Gram form (in-memory, one process, n ≤ ``gram_max_n``) holds one n×n matrix.
    """

    name = "datainf"
    Options = DataInfOptions

    def _fit(self) -> None:
        self.groups_ = self.block_groups()
        if self.options.form == "gram" and (self._train_store is not None or self.distributed_):
            raise ValueError(
                "DataInf: form='gram' needs every training gradient in memory on one process (an n×n Gram); "
                "use form='streaming' (or 'auto') for a GradientStore or a distributed run"
            )
        # an explicit λ costs nothing; a rule takes the sums of squares (one pass, none on a store that
        # recorded them; 'dof' also a streamed Gram) before the accumulation can start
        self.lam_ = {tuple(g): self.damping_for(g) for g in self.groups_}

    @property
    def lambdas_(self) -> dict[str, float]:
        return {k: self.lam_[tuple(g)] for g in self.groups_ for k in g}

    # --------------------------------------------------------------------------- streaming
    def _whole_block_kernel(self) -> bool:
        """The fused CUDA/Triton op on whole in-memory blocks (one process, training set on a GPU)."""
        return (
            self._train_store is None
            and not self.distributed_
            and self.device_.type == "cuda"
            and all(len(g) == 1 for g in self.groups_)
        )

    def _test_side(self, test: GradientSet) -> dict[str, torch.Tensor]:
        n = self.n_
        out: dict[str, torch.Tensor] = {}
        if self._whole_block_kernel():
            chunk = self._chunk(test.n)
            self._count_pass(n)
            for (k,) in self.groups_:
                lam = self.lam_[(k,)]
                out[k] = datainf_inverse_sum(
                    self.train_[k], test[k], lam, backend=self.options.backend, chunk_size=chunk
                )
            return out
        # one pass: per chunk, the norms, g_iᵀt and the rank-one accumulation of every group
        S = {k: torch.zeros_like(test[k]) for k in test.names}
        chunk = self._chunk(test.n)
        pbuf = torch.empty(test.n * chunk, dtype=self.compute_dtype_, device=self.device_)  # reused: no churn
        for _, _, ch in self._pass(chunk):
            c = ch.n
            for g in self.groups_:
                lam = self.lam_[tuple(g)]
                sqn = torch.linalg.vector_norm(ch[g[0]], dim=1).square_()  # (c,)
                P = torch.mm(test[g[0]], ch[g[0]].T, out=pbuf[: test.n * c].view(test.n, c))  # (m, c)
                for k in g[1:]:
                    sqn += torch.linalg.vector_norm(ch[k], dim=1).square_()
                    P.addmm_(test[k], ch[k].T)
                C = P.div_(sqn.add_(lam))
                for k in g:
                    S[k].addmm_(C, ch[k])
        for g in self.groups_:
            lam = self.lam_[tuple(g)]
            for k in g:
                Sk = all_reduce_sum(S[k]) if self.distributed_ else S[k]
                out[k] = (test[k] - Sk / n) / lam
        return out

    # --------------------------------------------------------------------------- gram
    def _use_gram(self, m: int) -> bool:
        if self._train_store is not None or self.distributed_:
            return False
        form, n = self.options.form, self.n_
        if form != "auto":
            return form == "gram"
        if n > self.options.gram_max_n:
            return False
        D = self.train_.dim
        return n * n * D + m * n * D + m * n * n < 3 * m * n * D

    def _score(self, test: GradientSet) -> torch.Tensor:
        if not self._use_gram(test.n):
            return super()._score(test)
        train, n = self.train_, self.n_
        self._count_pass(n)
        out = None
        for g in self.groups_:
            lam = self.lam_[tuple(g)]
            blocks = {k: train[k].to(self.compute_dtype_) for k in g}
            sqn = sum(torch.linalg.vector_norm(blocks[k], dim=1).square() for k in g)
            P = sum(test[k] @ blocks[k].T for k in g)  # (m, n)
            K = sum(blocks[k] @ blocks[k].T for k in g)  # (n, n)
            I_g = (P - (P / (lam + sqn)) @ K / n) / lam
            out = I_g if out is None else out.add_(I_g)
        return out.neg_()

    def self_influence(self, *, gather: bool = False) -> torch.Tensor:
        """−(1/λ)[‖g_i‖² − (1/n) Σ_k K_ik² / (λ + K_kk)] summed over groups, K_ik = g_iᵀg_k: every pair of
        training examples (O(n²·D)), chunk by chunk. Distributed: this rank's rows (all n with ``gather``);
        each rank's inner passes read all n rows.

        Raises:
            ValueError: n above ``pairwise_max_n``.
        """
        self._check_fitted()
        n = self.n_
        if n > self.options.pairwise_max_n:
            raise ValueError(
                f"DataInf: self_influence needs every pair of training examples (O(n²·D) work, about n/chunk "
                f"passes over the training gradients); n = {n} exceeds pairwise_max_n = "
                f"{self.options.pairwise_max_n}. Raise pairwise_max_n to run it anyway, or use the self-influence "
                "of hessian_free or diagonal_fisher (linear in n)"
            )
        a, b = self.rows_
        out = torch.zeros(b - a, dtype=self.compute_dtype_, device=self.device_)
        chunk = self._self_chunk_size()
        for s, e, ch in self._pass(chunk):
            for g in self.groups_:
                lam = self.lam_[tuple(g)]
                sqn = sum(torch.linalg.vector_norm(ch[k], dim=1).square() for k in g)  # (c,)
                acc = torch.zeros_like(sqn)
                for _, _, other in self._pass(chunk, 0, n):
                    w = 1.0 / (lam + sum(torch.linalg.vector_norm(other[k], dim=1).square() for k in g))
                    Kc = sum(ch[k] @ other[k].T for k in g)  # (c, c')
                    acc += Kc.square_() @ w
                out[s - a : e - a] -= (sqn - acc / n) / lam
        return self._gather_cols(out, gather)
