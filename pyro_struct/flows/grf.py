"""Graphical residual flows (Mouton & Kroon): masked, Lipschitz-constrained residual blocks over a DAG.

Each block is ``z <- z + g(z; x)`` where ``g`` is a masked MLP whose output ``j`` sees only
``z_j``, the parents of ``z_j`` in the structure ``H`` and the context columns ``H`` allows.
Every masked weight acting on ``z`` is spectrally normalised to a coefficient below one (mask
first, then normalise), so ``Lip(g) < 1`` and each block is invertible. Because ``H`` is
strictly lower-triangular in sampling order, the Jacobian of a block is lower-triangular and
``log|det| = sum_j log(1 + dg_j/dz_j)`` exactly; the diagonal is computed analytically.

Example:
    >>> A = torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)  # d=3, 1 context
    >>> flow = GraphicalResidualFlow(A, context_dim=1, num_layers=2, hidden_sizes=(16,))
    >>> z, log_q = flow.rsample_and_log_prob(torch.randn(5, 1), n=4)
    >>> z.shape, log_q.shape
    (torch.Size([4, 5, 3]), torch.Size([4, 5]))
    >>> flow.log_prob(z, torch.randn(5, 1)).shape  # inverse by a per-block Newton solve
    torch.Size([4, 5])
    >>> len(flow.last_stats["inverse"]["blocks"]), flow.num_passes
    (2, 2)
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from .. import dag
from ..masks import factorize
from ..nn import ACTIVATIONS, MaskedMLP
from .base import ConditionalFlow

__all__ = ["GraphicalResidualFlow", "spectral_norm_bound", "default_num_layers", "BLOCK_MASKS"]

#: the residual blocks' latent-level masks: ``H`` itself (one edge per block), or its transitive closure
BLOCK_MASKS = ("structure", "closure")

#: residual blocks every latent gets once its information has arrived (SIReN-VAE used 4 blocks
#: in all; a structure whose latents see all their ancestors directly gets exactly that)
BLOCKS_PER_LATENT = 4
#: the default's cap: each block costs a masked network pass (and fixed-point iterations to invert),
#: so at a fixed budget 21 blocks on magic-niab (depth 18) reached 0.18 nats where 8 reached 0.010
#: and 4 0.0075; on ecoli70 (depth 14) 8 blocks reached 0.029, 17 0.073 and 4 0.20
#: (``benchmarks/results/lgbn_skl120_grf_*``, 120 s of skl)
MAX_DEFAULT_BLOCKS = 8


def default_num_layers(adjacency: torch.Tensor) -> int:
    """Residual blocks by default for a flow adjacency ``(d, d + c)``.

    ``propagation_depth(adjacency) + 3``: a block moves information one edge of ``H`` further, so
    the deepest latent is complete (has all it needs from the observations and its latent ancestors,
    through its parents) after ``propagation_depth`` blocks (:func:`pyro_struct.dag.propagation_depth`);
    the 3 blocks after that give it the 4 updates SIReN-VAE's GRFs had (4 blocks on a dense
    structure, 8 on the faithful arithmetic circuit), capped at :data:`MAX_DEFAULT_BLOCKS` (8: on a
    deeper ``H`` such as ecoli70's (14) or magic-niab's (18) the cap was faster *and* more accurate at
    a fixed budget than the full rule, although the deepest latents then see only part of what ``H``
    gives them). At least 1 (``d = 0``).
    """
    if not adjacency.shape[0]:
        return 1
    return min(dag.propagation_depth(adjacency) + BLOCKS_PER_LATENT - 1, MAX_DEFAULT_BLOCKS)


# ----------------------------------------------------------------------------- spectral bound
def spectral_norm_bound(weight: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """A certified upper bound on the largest singular value of a matrix (Gram iteration).

    Power iteration approaches ``sigma_max`` from *below*, so normalising by it can leave a
    weight slightly above the target norm. Gram iteration (Delattre et al., 2023) approaches
    it from *above*: with ``G_0 = W`` and ``G_{t+1} = G_t^T G_t``,
    ``sigma_max(W) <= ||G_t||_F^(1 / 2^t)`` for every ``t``, and the gap shrinks like
    ``rank^(1 / 2^(t+1))`` in the worst case (repeated top singular values) and much faster
    when the top singular value is separated. Each step is rescaled by its Frobenius norm
    (tracked in log space) so nothing overflows, and the result is inflated by a few units of
    rounding so it stays an upper bound in floating point. Differentiable and stateless.

    Args:
        weight: ``(m, n)`` matrix.
        iterations: number of Gram steps ``t`` (0 gives the Frobenius norm).

    Returns:
        A scalar tensor ``>= torch.linalg.matrix_norm(weight, ord=2)``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix; got shape {tuple(weight.shape)}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0; got {iterations}")
    if weight.numel() == 0:
        return weight.new_zeros(())
    # start from the orientation whose Gram matrix G^T G is the smaller one
    G = weight if weight.shape[0] >= weight.shape[1] else weight.T
    finfo = torch.finfo(weight.dtype)
    log_scale = weight.new_zeros(())
    for _ in range(iterations):
        norm = torch.linalg.matrix_norm(G).clamp_min(finfo.tiny)
        G = G / norm
        log_scale = 2.0 * (log_scale + norm.log())
        G = G.T @ G
    log_bound = (log_scale + torch.linalg.matrix_norm(G).clamp_min(finfo.tiny).log()) / 2.0**iterations
    # rounding in the matmuls perturbs the bound by O(n eps) relative at most
    margin = 1.0 + 8.0 * max(weight.shape) * finfo.eps
    return log_bound.exp() * margin


# ------------------------------------------------------------------------------ residual block
class _ResidualBlock(MaskedMLP):
    """One residual map ``g(z; x)`` with masked, spectrally normalised weights.

    Layer 0 takes ``[z, x]``; only its ``z`` columns are normalised (the context is fixed
    during inversion, so it does not enter the Lipschitz constant in ``z``). Every later layer
    is normalised whole. With each normalised weight of norm ``<= c`` and activations with
    ``|f'| <= 1``, ``Lip_z(g) <= c^L <= c < 1``.
    """

    def __init__(self, masks, dim: int, lipschitz: float, activation: str, spectral_iterations: int):
        super().__init__(masks, activation, require="lipschitz")
        self.dim = dim
        self.lipschitz = lipschitz
        self.spectral_iterations = spectral_iterations

    def _normalise(self, k: int, W: torch.Tensor) -> torch.Tensor:
        # mask first (masked_weight), then normalise; shrink only when above the coefficient
        Wz = W[:, : self.dim] if k == 0 else W
        factor = (spectral_norm_bound(Wz, self.spectral_iterations) / self.lipschitz).clamp_min(1.0)
        return torch.cat([Wz / factor, W[:, self.dim :]], 1) if k == 0 else W / factor

    def effective_weights(self, transform=None) -> list[torch.Tensor]:
        """Per layer the masked, spectrally normalised weight (layer 0: ``(h1, d + c)``, its ``z`` columns
        normalised); the weights every pass of this block uses."""
        return super().effective_weights(self._normalise if transform is None else transform)

    def evaluate(self, y, x, weights):
        """``g(y; x)`` ``(*batch, d)`` and every hidden layer's activation slope ``(*batch, h_l)``."""
        inputs = y if x is None else torch.cat([y, x], -1)
        result = self.run(inputs, weights=weights, need_slopes=True)
        return result.output, result.slopes[:-1]

    def jacobian_diagonal(self, weights, derivatives) -> torch.Tensor:
        """``dg_j/dy_j`` ``(*batch, d)`` from the weights and activation slopes, without autograd.

        ``J = W_L D_{L-1} W_{L-1} ... D_1 W_1`` (``D_l`` diagonal); one hidden layer reduces to
        ``diag_j = sum_k W_2[j, k] f'(a_k) W_1[k, j]``, a single matmul. Deeper nets carry
        ``D_l W_l ... D_1 W_1`` of shape ``(*batch, h_l, d)``: O(h d) per sample per layer.
        """
        W1 = weights[0][:, : self.dim]
        if not derivatives:
            return W1.diagonal()
        if len(derivatives) == 1:
            return derivatives[0] @ (weights[1].T * W1)
        T = derivatives[0].unsqueeze(-1) * W1
        for W, da in zip(weights[1:-1], derivatives[1:]):
            T = da.unsqueeze(-1) * (W @ T)
        return torch.einsum("jk,...kj->...j", weights[-1], T)

    def jacobian(self, weights, derivatives) -> torch.Tensor:
        """The full Jacobian ``dg/dy`` ``(*batch, d, d)`` (lower-triangular in sampling order)."""
        W1 = weights[0][:, : self.dim]
        if not derivatives:
            return W1
        T = derivatives[0].unsqueeze(-1) * W1
        for W, da in zip(weights[1:-1], derivatives[1:]):
            T = da.unsqueeze(-1) * (W @ T)
        return weights[-1] @ T


# ---------------------------------------------------------------------------------------- flow
class GraphicalResidualFlow(ConditionalFlow):
    """Graphical residual flow (Mouton & Kroon): ``num_layers`` masked residual blocks over ``H``.

    Base-to-latent direction (explicit): ``z = eps``, then for each block
    ``z <- z + g_k(z; x)``, with ``log|det dz/deps| = sum_k sum_j log(1 + dg_kj/dz_j)``.
    Latent-to-base direction: for blocks in reverse, solve ``y + g_k(y; x) = z`` per block
    without gradients (diagonal Newton with a fixed-point fallback, or plain fixed point),
    then reattach the solution ``y*`` to the graph so that it carries exactly the
    implicit-function gradient ``dy = (I + J_g)^{-1} (dz - dg/dtheta dtheta)``; ``log_prob(z, x)``
    thus has correct gradients in the parameters, ``z`` and ``x``. Two ways (``inverse_gradient``):

    - ``"triangular"``: one Newton step through the full lower-triangular Jacobian
      ``I + J_g(y*)`` held constant (a batched triangular solve; O(batch d^2) memory).
    - ``"unrolled"``: ``depth(H) + 1`` differentiable diagonal-Newton steps
      ``y <- y - (y + g(y) - z) / (1 + diag J_g(y*))``. Their derivative is a series in the
      strictly lower-triangular ``D^{-1} L``, which is nilpotent and vanishes after the longest
      path, so the gradient is again exact (O(batch h) memory per step, ``depth + 1`` passes).

    Args:
        adjacency: ``(d, d + context_dim)`` bool tensor, strictly lower-triangular among latents.
        context_dim: number of context columns.
        num_layers: number of residual blocks. A block moves information one edge of its mask
            further, so ``None`` (default) uses :func:`default_num_layers` of the block mask:
            ``min(propagation_depth + 3, 8)`` (:func:`pyro_struct.dag.propagation_depth`), enough for
            the deepest latent to see its parents complete and then get 3 more updates: 4 for the
            closure (default) or a dense structure, 8 for ``H`` on the faithful arithmetic circuit
            and on ecoli70. With SIReN-VAE's fixed 4 blocks of ``H`` the faithful circuit GRF lost
            to dense (``benchmarks/results/grf_depth.md``).
        hidden_sizes: hidden widths of each block's MLP; a layer narrower than ``d`` is widened
            to ``d`` (the greedy factorisation needs one unit per distinct row, with a warning).
        lipschitz: spectral-norm coefficient ``c`` in ``(0, 1)`` for every masked weight acting
            on ``z``; ``Lip(g) <= c``.
        activation: ``"lipswish"`` (default), ``"tanh"``, ``"elu"`` or ``"softplus"`` (all
            with ``|f'| <= 1``).
        spectral_iterations: Gram-iteration steps of the certified norm bound
            (:func:`spectral_norm_bound`).
        inverse_method: ``"newton"`` (diagonal Newton, safeguarded by fixed-point steps) or
            ``"fixed_point"`` (``y <- z - g(y)``, contraction with rate ``Lip(g)``).
        inverse_tol: stop when ``max |y + g(y) - z| <= inverse_tol * max(1, max |z|)`` (absolute
            for ``|z| <= 1``, relative beyond, so large latents do not stall on rounding);
            ``None`` picks ``1e-10`` in float64 and ``1e-5`` otherwise.
        inverse_max_iter: iteration cap per block (a warning is issued if it is hit before
            ``inverse_tol``).
        inverse_gradient: ``"triangular"`` (default) or ``"unrolled"``, how the solved inverse is
            made differentiable (both exact; see above).
        mask_method: mask factorisation, ``"greedy"`` or ``"made"``.
        block_mask: each block's latent-level mask (before the diagonal): ``"closure"`` (default:
            ``H``'s transitive closure, latents and context, so every latent sees all its ancestors
            in every block) or ``"structure"`` (``H``: information moves one edge per block). The
            flow's Jacobian ``dz/deps`` has the closure's pattern either way (a composition of
            ``H``-masked blocks reaches ``k`` hops after ``k`` blocks), so the structural guarantee is
            the same; the closure needs only :data:`BLOCKS_PER_LATENT` blocks
            (:func:`default_num_layers`), a step then costs what a dense GRF's does. With 180 s of
            ``skl`` (``benchmarks/results/lgbn_grf_closure_*``) the closure's 4 blocks reached
            0.0085 / 0.0092 nats (forward / reverse KL) on ecoli70 and 0.0014 / 0.0017 on
            magic-niab, against 0.0081 / 0.0077 and 0.0036 / 0.0036 for ``H``'s 8 blocks and
            0.0075 / 0.0072 and 0.0023 / 0.0021 for dense.

    Attributes:
        last_stats: ``"forward"``: ``evaluations`` (one per block); ``"inverse"`` (after each
            :meth:`inverse`, hence :meth:`log_prob`): ``evaluations`` (calls of a block's ``g``
            in the solves, all blocks), ``converged`` (all blocks), ``residual`` (the largest
            final residual) and ``blocks``, one dict per block in block order with
            ``iterations``, ``evaluations``, ``residual`` (final ``max |y + g(y) - z|``),
            ``converged`` and ``block``.

    Shapes: ``eps``, ``z`` ``(*batch, d)``; ``x`` ``(*batch, context_dim)`` or ``None``.
    """

    def __init__(
        self,
        adjacency: torch.Tensor,
        context_dim: int = 0,
        num_layers: int | None = None,
        hidden_sizes: Sequence[int] = (64,),
        lipschitz: float = 0.97,
        activation: str = "lipswish",
        spectral_iterations: int = 8,
        inverse_method: str = "newton",
        inverse_tol: float | None = None,
        inverse_max_iter: int = 100,
        inverse_gradient: str = "triangular",
        mask_method: str = "greedy",
        block_mask: str = "closure",
    ):
        super().__init__(adjacency, context_dim)
        if block_mask not in BLOCK_MASKS:
            raise ValueError(f"block_mask must be one of {list(BLOCK_MASKS)}; got {block_mask!r}")
        self.block_mask = block_mask
        # the blocks' latent-level mask: H, or its transitive closure (the pattern the sample has anyway)
        A_block = self.adjacency if block_mask == "structure" else dag.transitive_closure(self.adjacency, reflexive=False)
        lipschitz = float(lipschitz)
        if not 0.0 < lipschitz < 1.0:
            raise ValueError(
                f"lipschitz must lie strictly between 0 and 1 (each residual block must be a contraction "
                f"to be invertible); got {lipschitz}"
            )
        if num_layers is None:
            num_layers = default_num_layers(A_block)
        if isinstance(num_layers, bool) or int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"num_layers (residual blocks) must be a positive integer; got {num_layers!r}")
        if not isinstance(activation, str) or not getattr(ACTIVATIONS.get(activation.lower()), "lipschitz", False):
            lipschitz_names = sorted(k for k, cls in ACTIVATIONS.items() if cls.lipschitz)
            raise ValueError(
                f"activation must be one of {lipschitz_names} (derivative bounded by 1 in absolute "
                f"value, with an analytic derivative for the log-determinant); got {activation!r}"
            )
        if inverse_method not in ("newton", "fixed_point"):
            raise ValueError(f"inverse_method must be 'newton' or 'fixed_point'; got {inverse_method!r}")
        if inverse_gradient not in ("triangular", "unrolled"):
            raise ValueError(f"inverse_gradient must be 'triangular' or 'unrolled'; got {inverse_gradient!r}")
        if int(inverse_max_iter) != inverse_max_iter or inverse_max_iter < 1:
            raise ValueError(f"inverse_max_iter must be a positive integer; got {inverse_max_iter!r}")
        if inverse_tol is not None and not inverse_tol > 0:
            raise ValueError(f"inverse_tol must be positive (or None for a dtype default); got {inverse_tol!r}")
        if int(spectral_iterations) != spectral_iterations or spectral_iterations < 0:
            raise ValueError(f"spectral_iterations must be a non-negative integer; got {spectral_iterations!r}")
        d = self.dim
        self.lipschitz = lipschitz
        self.activation = activation.lower()
        self.inverse_method = inverse_method
        self.inverse_tol = inverse_tol
        self.inverse_max_iter = int(inverse_max_iter)
        self.inverse_gradient = inverse_gradient
        self.depth = dag.depth(A_block)
        # output j of g sees z_j itself, its parents in the block mask and the context columns it allows
        A_g = A_block.clone()
        A_g[:, :d] |= torch.eye(d, dtype=torch.bool)
        masks = factorize(A_g, list(hidden_sizes), method=mask_method, widen=True)
        self.hidden_sizes = [m.shape[0] for m in masks[:-1]]
        self.blocks = nn.ModuleList(
            _ResidualBlock(masks, d, lipschitz, self.activation, int(spectral_iterations)) for _ in range(int(num_layers))
        )

    # ------------------------------------------------------------------ introspection
    @property
    def num_layers(self) -> int:
        """Number of residual blocks."""
        return len(self.blocks)

    @property
    def num_passes(self) -> int:
        """Sampling is explicit: one block evaluation per block, whatever the depth."""
        return self.num_layers

    def normalised_weights(self) -> list[list[torch.Tensor]]:
        """Per block, per layer, the masked and spectrally normalised weight acting on ``z``
        (for layer 0 its ``z`` columns ``(h1, d)``); each has spectral norm ``<= lipschitz``."""
        return [[W[:, : self.dim] if k == 0 else W for k, W in enumerate(block.effective_weights())]
                for block in self.blocks]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_layers={self.num_layers}, hidden_sizes={self.hidden_sizes}, "
            f"lipschitz={self.lipschitz}, activation={self.activation!r}, inverse_method={self.inverse_method!r}"
        )

    # ---------------------------------------------------------------------- transforms
    def _forward(self, eps: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` ``(*batch, d)`` and ``log|det dz/deps|`` ``(*batch,)`` (explicit, one pass per block)."""
        z = eps
        logdet = eps.new_zeros(eps.shape[:-1])
        for block in self.blocks:
            weights = block.effective_weights()
            g, derivatives = block.evaluate(z, x, weights)
            logdet = logdet + torch.log1p(block.jacobian_diagonal(weights, derivatives)).sum(-1)
            z = z + g
        self.last_stats["forward"] = {"evaluations": self.num_layers}
        return z, logdet

    def _inverse(self, z: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``eps`` ``(*batch, d)`` and ``log|det deps/dz|`` ``(*batch,)`` by a per-block solve.

        Records ``last_stats["inverse"]``; warns if a block hits ``inverse_max_iter``.
        """
        tol = self.inverse_tol
        if tol is None:
            tol = 1e-10 if z.dtype == torch.float64 else 1e-5
        if z.numel():
            tol = tol * max(1.0, float(z.detach().abs().max()))
        needs_grad = torch.is_grad_enabled() and (
            z.requires_grad
            or (x is not None and x.requires_grad)
            or any(p.requires_grad for p in self.parameters())
        )
        y = z
        logdet = z.new_zeros(z.shape[:-1])
        stats = []
        for k in reversed(range(self.num_layers)):
            block = self.blocks[k]
            weights = block.effective_weights() if needs_grad else None
            with torch.no_grad():
                fixed = block.effective_weights() if weights is None else [W.detach() for W in weights]
                x_fixed = None if x is None else x.detach()
                y_star, derivatives, info = self._solve(block, fixed, y.detach(), x_fixed, tol)
            info["block"] = k
            stats.append(info)
            if needs_grad:
                y = self._reattach(block, weights, fixed, derivatives, y_star, y, x)
                _, derivatives = block.evaluate(y, x, weights)
                diagonal = block.jacobian_diagonal(weights, derivatives)
            else:
                y = y_star
                diagonal = block.jacobian_diagonal(fixed, derivatives)
            logdet = logdet - torch.log1p(diagonal).sum(-1)
        blocks = stats[::-1]
        self.last_stats["inverse"] = {
            "evaluations": sum(b["evaluations"] for b in blocks),
            "converged": all(b["converged"] for b in blocks),
            "residual": max(b["residual"] for b in blocks),
            "blocks": blocks,
        }
        return y, logdet

    def _reattach(self, block, weights, fixed, derivatives, y_star, z, x) -> torch.Tensor:
        """``y*`` (solved without gradients) as a differentiable function of (theta, z, x) with
        the implicit-function derivative; its value changes only by a further Newton refinement."""
        if self.inverse_gradient == "triangular":
            # one Newton step through the exact triangular Jacobian, held constant
            M = block.jacobian(fixed, derivatives)
            M = M + torch.eye(self.dim, dtype=M.dtype, device=M.device)
            g, _ = block.evaluate(y_star, x, weights)
            residual = y_star + g - z
            M = M.expand(residual.shape + (self.dim,))
            step = torch.linalg.solve_triangular(M, residual.unsqueeze(-1), upper=False).squeeze(-1)
            return y_star - step
        # diagonal Newton steps with the diagonal held constant: d y_{t+1} = -D^{-1} L d y_t + ...,
        # and (D^{-1} L)^(depth + 1) = 0 because L has H's strictly lower-triangular pattern
        scale = 1.0 + block.jacobian_diagonal(fixed, derivatives)
        y = y_star
        for _ in range(self.depth + 1):
            g, _ = block.evaluate(y, x, weights)
            y = y - (y + g - z) / scale
        return y

    def _solve(self, block: _ResidualBlock, weights, z: torch.Tensor, x, tol: float):
        """Solve ``y + g(y; x) = z`` for ``y`` without gradients.

        Newton: ``y <- y - F(y) / (1 + diag J_g(y))`` with ``F(y) = y + g(y) - z``. The Jacobian is
        triangular, so this converges quadratically once a latent's parents have; a sample whose
        residual norm does not decrease falls back to the fixed-point step ``y <- z - g(y)``,
        which shrinks ``||F||_2`` by at least ``Lip(g) < 1`` per step, so the solve always converges.

        Returns:
            ``y`` ``(*batch, d)``, the activation derivatives at ``y`` and a stats dict.
        """
        y = z
        g, derivatives = block.evaluate(y, x, weights)
        residual = y + g - z
        evaluations = 1
        iterations = 0
        newton = self.inverse_method == "newton"
        while True:
            error = float(residual.abs().max()) if residual.numel() else 0.0
            if not math.isfinite(error):
                raise FloatingPointError(
                    f"the inverse solve of block diverged (non-finite residual) at iteration {iterations}; "
                    f"check the inputs z for non-finite values"
                )
            if error <= tol or iterations >= self.inverse_max_iter:
                break
            iterations += 1
            if newton:
                diagonal = block.jacobian_diagonal(weights, derivatives)
                y_new = y - residual / (1.0 + diagonal)
            else:
                y_new = y - residual
            g_new, derivatives_new = block.evaluate(y_new, x, weights)
            evaluations += 1
            residual_new = y_new + g_new - z
            if newton:
                norm_old = residual.norm(dim=-1)
                worse = (residual_new.norm(dim=-1) >= norm_old) & (norm_old > 0)
                if worse.any():
                    y_fp = y - residual
                    g_fp, derivatives_fp = block.evaluate(y_fp, x, weights)
                    evaluations += 1
                    residual_fp = y_fp + g_fp - z
                    pick = worse.unsqueeze(-1)
                    y_new = torch.where(pick, y_fp, y_new)
                    residual_new = torch.where(pick, residual_fp, residual_new)
                    derivatives_new = [torch.where(pick, a, b) for a, b in zip(derivatives_fp, derivatives_new)]
            y, residual, derivatives = y_new, residual_new, derivatives_new
        converged = error <= tol
        if not converged:
            warnings.warn(
                f"GraphicalResidualFlow inverse: a block stopped at inverse_max_iter={self.inverse_max_iter} "
                f"with residual {error:.3g} > inverse_tol={tol:.3g}; raise inverse_max_iter, loosen "
                f"inverse_tol or use a smaller lipschitz coefficient",
                RuntimeWarning,
                stacklevel=3,
            )
        info = {"iterations": iterations, "evaluations": evaluations, "residual": error, "converged": converged}
        return y, derivatives, info
