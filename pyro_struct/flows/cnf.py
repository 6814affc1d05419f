"""Structured continuous normalizing flow (StrCNF): a masked, time-gated neural ODE integrated with torchdiffeq.

After Weilbach et al. (2020), "Structured conditional continuous normalizing flows", and the
StrCNF of Chen et al. (2023): the velocity field ``dz/dt = f(z, x, t)`` is a StrNN whose masks
follow the inverse structure ``H`` plus the diagonal, and time enters through per-unit gates
so that it cannot open any connection the masks close. Optionally each latent carries
``augment`` extra dimensions (Weilbach et al.'s "local nuisance variables", after the augmented
neural ODEs of Dupont et al. 2019), whose density is handled by an auxiliary-variable bound.
By default one affine StrAF layer masked with ``H`` maps the noise before the ODE
(``base_layer="affine"``), so the field only corrects a structured location-scale map.

Example:
    >>> A = torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.bool)   # d=2 latents, 1 context column
    >>> flow = StructuredCNF(A, context_dim=1, hidden_sizes=(16, 16))
    >>> z, log_q = flow.rsample_and_log_prob(torch.randn(5, 1), n=3)
    >>> z.shape, log_q.shape
    (torch.Size([3, 5, 2]), torch.Size([3, 5]))
    >>> flow.last_stats["forward"]["evaluations"] == flow.num_passes > 0
    True
    >>> aug = StructuredCNF(A, context_dim=1, hidden_sizes=(16, 16), augment=3, time_gating="paper")
    >>> y, log_q_state, log_r = aug.rsample_state(torch.randn(5, 1), n=3)   # the state (z, a): 2 * (1 + 3) dims
    >>> y.shape, aug.log_prob(y[..., :2], torch.randn(5, 1)).shape
    (torch.Size([3, 5, 8]), torch.Size([3, 5]))
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..nn import StrNN, get_activation
from .base import ConditionalFlow, transitive_closure
from .straf import StrAF

__all__ = ["StructuredCNF", "augmented_adjacency"]

# Orders of torchdiffeq's adaptive Runge-Kutta solvers, for the initial step-size heuristic.
_ADAPTIVE_ORDERS = {"dopri8": 8, "dopri5": 5, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2}

_FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")

_TIME_GATINGS = ("paper", "gate_and_bias", "gate", "none")

_VELOCITY_MASKS = ("structure", "context_closure", "closure", "full")

_BASE_LAYERS = (None, "affine")

# The tolerance schedule reaches the final tolerances at this fraction of training.
_TIGHTEN_BY = 0.8

# Soft bound of the auxiliary model's log-scales (keeps an early step from producing a degenerate r).
_MAX_LOG_SCALE = 6.0


def augmented_adjacency(adjacency: torch.Tensor, augment: int) -> torch.Tensor:
    """The latent-level adjacency expanded to the augmented state ``[z, a]``.

    Args:
        adjacency: ``(d, d + c)`` bool, rows latents, columns latents then context (here usually
            with the latent diagonal set, as the velocity field's adjacency).
        augment: augmenting dimensions per latent (``A``).

    Returns:
        ``(D, D + c)`` bool with ``D = d * (1 + A)``; state unit ``u`` belongs to latent
        ``g(u) = u`` for ``u < d`` and ``(u - d) // A`` after (``a`` is laid out latent by latent).
        Entry ``(u, v)`` is ``adjacency[g(u), g(v)]`` (context columns: ``adjacency[g(u), d + k]``):
        a latent's augmenting dimensions see exactly what the latent sees, and with the diagonal
        set the latent sees its own augmenting dimensions.
    """
    A = torch.as_tensor(adjacency).bool()
    d = A.shape[0]
    group = torch.cat([torch.arange(d), torch.arange(d).repeat_interleave(int(augment))])
    cols = torch.cat([group, torch.arange(d, A.shape[1])])
    return A[group][:, cols]


class _Dynamics:
    """The augmented ODE right-hand side ``(y, l) -> (f(y, x, t), div_y f)`` of one solve.

    Holds the context and the Hutchinson probe of that solve, and counts its evaluations into
    ``flow._nfe[mode]`` (``mode`` switches to ``"backward"`` once the solve has returned, so the
    adjoint's backward solve is counted separately).
    """

    def __init__(self, flow: "StructuredCNF", x: torch.Tensor | None, probe: torch.Tensor | None, mode: str):
        self.flow = flow
        self.x = x
        self.probe = probe
        self.mode = mode

    def __call__(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        y, _ = state
        self.flow._nfe[self.mode] += 1
        f, div = self.flow._velocity_and_divergence(y, self.x, t, self.probe)
        return f, div


class StructuredCNF(ConditionalFlow):
    """A continuous normalizing flow whose velocity field respects an inverse structure.

    ``dy/dt = f(y, x, t)`` for ``t`` in ``[0, T]``: ``y(0) = e`` is standard normal noise and
    ``y(T)`` the sample. Without augmentation the state ``y`` is ``z``. ``f`` is a StrNN over
    the inputs ``[y, x]`` with adjacency ``A_f`` (:attr:`velocity_adjacency`): by default the
    latents and observations with a path to the latent in ``H`` (``velocity_mask``), and the latent
    diagonal (``A_f[i, i] = True``). Since ``H`` is strictly lower-triangular among latents,
    ``z_i(T)`` then depends only on ``eps_j`` and ``x_k`` that reach ``i`` by a path in ``H``.

    **Augmentation** (``augment = A > 0``; Weilbach et al. use 10, after Dupont et al.'s
    augmented neural ODEs). The state is ``y = [z, a]`` with ``A`` augmenting dimensions per
    latent (:attr:`state_dim` ``D = d (1 + A)``, ``a`` latent by latent). The mask is
    :func:`augmented_adjacency` of ``A_f`` (:attr:`state_adjacency`): a latent's augmenting
    dimensions see exactly what the latent sees, the latent sees its own augmenting dimensions,
    so ``z_i(T)`` still depends only on the noise and context of ``H``-ancestors of ``i``. The
    augmenting dimensions start from a fixed standard normal, ``e = [eps, e_a] ~ N(0, I_D)``, so
    ``log q(z, a | x)`` is exact, but the latents' marginal ``q(z | x) = ∫ q(z, a | x) da`` is not.
    It is **bounded** with an auxiliary inverse model ``r(a | z, x)`` (a diagonal Gaussian whose
    mean and log-scale come from a StrNN over ``[z, x]`` with the rows of ``A_f``, so ``a_i``'s
    parameters see what ``z_i`` sees; zero-initialised, i.e. ``r = N(0, I)`` at first):

    - ``rsample_and_log_prob`` (and ``forward``, through its log-determinant) returns
      ``ℓ = log q(z, a | x) - log r(a | z, x)`` at the jointly sampled ``(z, a)``; its expectation
      over ``a ~ q(a | z, x)`` is ``log q(z | x) + KL(q(a|z,x) || r(a|z,x)) >= log q(z | x)``;
    - ``log_prob(z, x)`` (and ``inverse``) returns the same expression at ``a ~ r(a | z, x)``
      (reparameterised): the ELBO over the augmenting dimensions, ``E_r[ℓ] <= log q(z | x)``; with
      ``aux_samples = K > 1`` the importance-weighted bound ``log (1/K) sum_k exp(ℓ_k)``, which
      tightens to ``log q(z | x)`` as ``K`` grows.

    Both are the exact log density ratio of the augmented space ``(z, a)`` against the extended
    target ``p(z, x) r(a | z, x)``, whose normaliser is ``p(x)``: every objective computed from them
    is that objective on the augmented space, hence sound. The reverse KL / negative ELBO is an
    upper bound of the latents' (minimising it fits ``r`` to ``q(a | z, x)``), the forward KL uses a
    lower bound of ``log q`` and is an upper bound of the latents' forward KL, so the symmetrised
    KL is an upper bound too, and importance weights ``p(z, x) r(a|z,x) / q(z, a|x)`` stay unbiased
    for ``p(x)``. Reported KLs are therefore upper bounds (tight when ``r = q(a | z, x)``).
    :meth:`rsample_state`, :meth:`state_log_prob`, :meth:`forward_state` / :meth:`inverse_state`
    expose the exact bijection on the state. With ``augment = 0`` everything is exact, as before.

    **Layers and time.** ``time_gating="paper"`` is Weilbach et al.'s eq. 3,
    ``h_l = sigma((W_l ⊙ M_l) h_{l-1} ⊙ eta_{l,1}(t)) + b_l ⊙ eta_{l,2}(t)`` (no activation after
    the last layer), with ``eta(t) = V tanh(u t + c) + w`` one small network of ``t`` giving every
    unit's two gates (initialised to ``eta = 1``). ``"gate_and_bias"`` is FFJORD's ConcatSquash
    ``((W ⊙ M) h + b) * sigmoid(a t + c) + g t``, ``"gate"`` the same without ``g t``, ``"none"`` an
    autonomous ODE. A per-unit gate scales a unit and so leaves the mask pattern intact, whereas
    concatenating ``t`` as an input would not.

    The log-determinant is integrated alongside: ``d/dt log|det dy/de| = div_y f = tr(df/dy)``.
    ``divergence="exact"`` (default) computes ``tr(df/dy)`` analytically as a sum over the
    masks' few diagonal paths ``y_u -> ... -> f_u`` (no loop over dimensions, no autograd, no
    double backward). ``"hutchinson"`` gives the unbiased estimate ``v^T (df/dy) v`` with one
    probe ``v`` per solve (Rademacher or Gaussian), from a forward-mode Jacobian-vector product.

    **Why the diagonal is in the mask.** Without it (``include_diagonal=False``) ``df/dz`` is
    strictly lower-triangular, so ``div f`` is identically zero: the flow is volume-preserving and
    ``z_i`` can only be ``eps_i`` shifted by a function of its parents. The option documents this.

    **Solver tolerances.** ``rtol``/``atol`` are the tolerances of every solve outside training.
    With ``tolerance_schedule=(rtol0, atol0)`` a training loop that calls
    :meth:`set_training_progress` (``pyro_struct.training.loop.train`` does, every step) solves
    with tolerances interpolated log-linearly from ``(rtol0, atol0)`` at the start to
    ``(rtol, atol)`` at 80% of training and after: loose (cheap) solves while the field is crude.
    Outside training (``module.eval()``, or progress ``None``) solves use ``(rtol, atol)``.

    Args:
        adjacency: ``(d, d + context_dim)`` bool tensor (strictly lower-triangular among latents).
        context_dim: number of context columns.
        hidden_sizes: widths of the hidden layers of ``f`` (widened if too narrow for the mask).
        activation: a smooth activation of :data:`pyro_struct.nn.ACTIVATIONS` (``"tanh"`` default).
        time_gating: ``"paper"`` (default), ``"gate_and_bias"``, ``"gate"`` or ``"none"``.
        T: end time; both directions integrate over the same interval ``[0, T]``.
        method: a torchdiffeq method (``"dopri5"`` default; ``"rk4"`` etc. with
            ``options={"step_size": ...}``).
        rtol, atol: solver tolerances (outside training, and at the end of a tolerance schedule).
        options: extra torchdiffeq solver options (e.g. ``step_size``, ``max_num_steps``).
        adjoint: use ``odeint_adjoint`` (memory O(1) in the number of steps).
        adjoint_options: options for the adjoint's backward solve (default: ``options``).
        divergence: ``"exact"`` or ``"hutchinson"``.
        hutchinson_noise: ``"rademacher"`` (default) or ``"gaussian"`` probes.
        include_diagonal: add the latent diagonal to ``f``'s mask (see above); keep ``True``.
        skip: add a masked, time-independent linear map ``[y, x] -> f`` (zero-initialised).
        mask_method: mask factorisation, ``"greedy"`` or ``"made"`` (``method`` is the ODE solver).
        augment: augmenting dimensions per latent (0: none, the exact flow).
        aux_hidden_sizes: hidden widths of the auxiliary model ``r(a | z, x)`` (``augment > 0``).
        aux_samples: importance samples ``K`` of ``log_prob``'s bound (``augment > 0``).
        init_scale: factor on the initial weights and bias of ``f``'s last layer; ``0`` (default)
            starts from the identity flow (``f = 0``): 8 NFE per solve at initialisation instead of
            15-21 (``benchmarks/results/flows.md``), at the same accuracy after training.
        tolerance_schedule: ``(rtol, atol)`` at the start of training (default ``(1e-3, 1e-3)``),
            or ``None`` (see above). Measured on the circuit (``benchmarks/results/NOTES.md``, CNF
            section): training at 1e-3 needs half the NFE of 1e-5 for the same symmetrised KL
            evaluated at 1e-5; the schedule keeps the last 20% of training at the final tolerances.
        velocity_mask: the latent-level mask of ``f`` (before the diagonal): ``"closure"`` (default:
            ``H``'s transitive closure, latents and observations), ``"context_closure"`` (``H`` among
            latents, and each latent sees every observation with a path to it in ``H``) or
            ``"structure"`` (``H`` itself). The sample's dependence pattern is the closure of ``H``
            in all three (see :meth:`_velocity_mask`), so the structural guarantee is the same. With
            ``H`` alone, information from an ancestor ``k`` hops up reaches a latent only by relaying
            through ``k`` latents *during* the solve; the closure lets every latent's velocity see
            the current values of all the variables its sample depends on, as Weilbach et al.'s
            ``L`` layers each masked with ``H`` let it see ancestors up to ``L`` hops away. Measured on
            the circuit at 60 ``skl`` steps (2 seeds): 22.3 / 18.5 nats against 29.0 / 31.7 for the
            context closure, at the same NFE (the context closure in turn beat ``H``: ``flows.md``).
            ``"full"`` is FFJORD's unconstrained field (every latent's velocity sees every latent and
            every observation, whatever ``H``): a baseline with no structural guarantee, since the
            sample then depends on all of them.
        base_layer: ``"affine"`` (default) maps the noise through one affine StrAF layer masked
            with ``H`` (:class:`~pyro_struct.flows.StrAF`, identity at first) before the ODE, so the
            field only has to correct a structured conditional location-scale map; ``None``: the ODE
            starts from the standard normal noise (the default before; every CNF table of
            ``benchmarks/results`` older than ``circuit_seeds_cnf_base.md`` was measured so). On the
            arithmetic circuit (300 CPU-s of ``skl``, ``circuit_seeds_cnf_base.md``) it takes the
            faithful CNF from 1.08 to 0.46 nats over 10 seeds, below FFJORD's field with the same
            layer at the end (0.53), with 40-50% fewer solver evaluations per solve
            (``cnf_base_layer.md``). The sample's dependence pattern is unchanged (the layer's ``u_i`` depends on the noise and context of ``H``-ancestors of
            ``i``). With ``velocity_mask="full"`` the layer sees every earlier latent and every
            observation, so the FFJORD baseline stays free of structure. With augmentation it
            maps the latents' noise only.
        base_hidden_sizes: hidden widths of the base layer's conditioner (default ``hidden_sizes``).

    The CNF is one ODE, so it has no ``num_layers`` option; :attr:`num_passes` is the number of
    network evaluations of the last sampling call (the solver's NFE, plus one pass of the
    auxiliary model with ``augment > 0``), ``None`` before any.

    Attributes:
        last_stats: ``{"forward": {"evaluations", "nfe"}, "inverse": {"evaluations", "nfe"}}``:
            network evaluations and the solver's function evaluations (NFE) of the latest call in
            each direction (absent before one).
        nfe: cumulative counts, keys ``"forward"``, ``"inverse"`` and ``"backward"`` (the
            evaluations of adjoint backward solves, made during ``.backward()``);
            :meth:`reset_nfe` zeroes them and clears :attr:`last_stats`.

    Shapes: ``eps``, ``z`` ``(*batch, d)``; the state ``y`` ``(*batch, D)``; ``x``
    ``(*batch, context_dim)`` or ``None`` (a context with fewer batch dimensions broadcasts).

    Adaptive solvers get their first step size from a gradient-free Hairer-Wanner estimate
    (two evaluations, counted in NFE; one, and the whole interval, where the field is negligible): torchdiffeq's own estimate is differentiable, which
    would leak a tolerance-sized dependence of ``z_i`` on every input into the autograd
    Jacobian and break its structural zeros. Later step sizes are already detached.
    """

    def __init__(
        self,
        adjacency: torch.Tensor,
        context_dim: int = 0,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        time_gating: str = "paper",
        T: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        options: dict | None = None,
        adjoint: bool = False,
        adjoint_options: dict | None = None,
        divergence: str = "exact",
        hutchinson_noise: str = "rademacher",
        include_diagonal: bool = True,
        skip: bool = False,
        mask_method: str = "greedy",
        augment: int = 0,
        aux_hidden_sizes: Sequence[int] = (32,),
        aux_samples: int = 1,
        init_scale: float = 0.0,
        tolerance_schedule: tuple[float, float] | None = (1e-3, 1e-3),
        velocity_mask: str = "closure",
        base_layer: str | None = "affine",
        base_hidden_sizes: Sequence[int] | None = None,
    ):
        super().__init__(adjacency, context_dim)
        if velocity_mask not in _VELOCITY_MASKS:
            raise ValueError(f"velocity_mask must be one of {_VELOCITY_MASKS}; got {velocity_mask!r}")
        if base_layer not in _BASE_LAYERS:
            raise ValueError(f"base_layer must be None or 'affine' (a StrAF affine layer before the ODE); got {base_layer!r}")
        self._check_options(activation, time_gating, T, divergence, hutchinson_noise, method, rtol, atol, augment,
                            aux_samples, init_scale, tolerance_schedule)
        import torchdiffeq  # noqa: F401  (fail here, with the name of the missing package, not mid-solve)

        d = self.dim
        A_f = self._velocity_mask(velocity_mask)
        if include_diagonal:
            A_f[:, :d] |= torch.eye(d, dtype=torch.bool)
        self.register_buffer("velocity_adjacency", A_f, persistent=False)
        self.augment = int(augment)
        self.state_dim = d * (1 + self.augment)
        A_state = augmented_adjacency(A_f, self.augment)
        self.register_buffer("state_adjacency", A_state, persistent=False)
        self.activation = activation.lower()
        self.time_gating = time_gating
        self.T = float(T)
        self.method = method
        self.rtol, self.atol = float(rtol), float(atol)
        self.tolerance_schedule = None if tolerance_schedule is None else tuple(float(v) for v in tolerance_schedule)
        self._progress: float | None = None
        self.options = dict(options or {})
        self.adjoint = bool(adjoint)
        self.adjoint_options = None if adjoint_options is None else dict(adjoint_options)
        self.divergence = divergence
        self.hutchinson_noise = hutchinson_noise
        self.include_diagonal = bool(include_diagonal)
        self.aux_samples = int(aux_samples)

        # the StrNN's masked pass, with the time gates as its post-linear hook
        self.net = StrNN(A_state, hidden_sizes, num_params=1, skip=skip, activation=self.activation,
                         mask_method=mask_method, require="smooth")
        self._build_gates(time_gating, float(init_scale))
        self.aux = self._build_auxiliary(A_f, aux_hidden_sizes) if self.augment else None
        self.base_layer = base_layer
        self.base = None if base_layer is None else self._build_base(
            velocity_mask, hidden_sizes if base_hidden_sizes is None else base_hidden_sizes, mask_method)

        self.register_buffer("_diag_paths", self._diagonal_paths(), persistent=False)
        self._nfe = {"forward": 0, "inverse": 0, "backward": 0}

    @staticmethod
    def _check_options(activation, time_gating, T, divergence, hutchinson_noise, method, rtol, atol, augment,
                       aux_samples, init_scale, tolerance_schedule) -> None:
        """Raise a ``ValueError`` naming the first bad argument."""
        get_activation(activation, width=1, require="smooth")  # fail before the masks are built
        if time_gating not in _TIME_GATINGS:
            raise ValueError(f"time_gating must be one of {_TIME_GATINGS}; got {time_gating!r}")
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T (the end time) must be a positive finite number; got {T!r}")
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson'; got {divergence!r}")
        if hutchinson_noise not in ("rademacher", "gaussian"):
            raise ValueError(f"hutchinson_noise must be 'rademacher' or 'gaussian'; got {hutchinson_noise!r}")
        if method not in _ADAPTIVE_ORDERS and method not in _FIXED_GRID_METHODS:
            raise ValueError(
                f"method must be a torchdiffeq solver: adaptive {sorted(_ADAPTIVE_ORDERS)} or fixed-grid "
                f"{list(_FIXED_GRID_METHODS)} (with options={{'step_size': ...}}); got {method!r}"
            )
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"rtol and atol must be positive; got rtol={rtol}, atol={atol}")
        if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
            raise ValueError(f"augment (augmenting dimensions per latent) must be an int >= 0; got {augment!r}")
        if isinstance(aux_samples, bool) or not isinstance(aux_samples, int) or aux_samples < 1:
            raise ValueError(f"aux_samples (importance samples of log_prob's bound) must be an int >= 1; got {aux_samples!r}")
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale) and init_scale >= 0):
            raise ValueError(f"init_scale must be a finite number >= 0; got {init_scale!r}")
        if tolerance_schedule is not None:
            ok = isinstance(tolerance_schedule, (tuple, list)) and len(tolerance_schedule) == 2
            if not ok or not all(isinstance(v, (int, float)) and v > 0 for v in tolerance_schedule):
                raise ValueError(
                    f"tolerance_schedule must be None or (rtol, atol) at the start of training, both > 0; "
                    f"got {tolerance_schedule!r}"
                )

    def _build_gates(self, time_gating: str, init_scale: float) -> None:
        """The time gates' parameters; scales the last layer's initial weights by ``init_scale``."""
        layers = self.net.layers
        widths = [layer.out_features for layer in layers]
        with torch.no_grad():
            layers[-1].weight.mul_(init_scale)
            layers[-1].bias.mul_(init_scale)
        if time_gating == "paper":
            # the biases move outside the activation (b ⊙ eta_2(t)); the layers keep none
            self.outer_bias = nn.ParameterList(nn.Parameter(layer.bias.detach().clone()) for layer in layers)
            for layer in layers:
                layer.bias = None
            self.eta_in = nn.Linear(1, 4)
            self.eta_out = nn.Linear(4, 2 * sum(widths))
            with torch.no_grad():
                self.eta_out.weight.zero_()
                self.eta_out.bias.fill_(1.0)
            self._gate_widths = widths
        elif time_gating != "none":
            self.gate_weight = nn.ParameterList(nn.Parameter(torch.empty(w).uniform_(-1.0, 1.0)) for w in widths)
            self.gate_bias = nn.ParameterList(nn.Parameter(torch.empty(w).uniform_(-1.0, 1.0)) for w in widths)
        if time_gating == "gate_and_bias":
            self.time_bias = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths)

    def _build_auxiliary(self, A_f: torch.Tensor, hidden_sizes: Sequence[int]) -> StrNN:
        """``r(a | z, x)``'s StrNN: rows the augmenting dimensions (each with its latent's row of
        ``A_f``), inputs ``[z, x]``, two outputs (mean, log-scale) per row; zero-initialised last
        layer, so ``r = N(0, I)`` at first (the exact ``q(a | z, x)`` of an identity flow)."""
        rows = A_f.repeat_interleave(self.augment, dim=0)
        aux = StrNN(rows, hidden_sizes, num_params=2, activation=self.activation, require="smooth")
        aux.layers[-1].reset_masked_parameters(zero_init=True)
        return aux

    def _build_base(self, velocity_mask: str, hidden_sizes: Sequence[int], mask_method: str) -> StrAF:
        """The affine StrAF layer ``eps -> u`` before the ODE, masked with ``H`` (so ``u_i`` depends on the
        noise and context of ``H``-ancestors only); for the FFJORD field (``"full"``) with every earlier
        latent and every observation, so that baseline stays free of structure. Identity at first."""
        A = self.adjacency
        if velocity_mask == "full":
            A = torch.ones_like(A)
            A[:, : self.dim] = torch.tril(A[:, : self.dim], -1)
        return StrAF(A, self.context_dim, num_layers=1, normalizer="affine", hidden_sizes=hidden_sizes,
                     mask_method=mask_method)

    def _velocity_mask(self, kind: str) -> torch.Tensor:
        """The velocity field's latent-level adjacency (before the diagonal): ``H`` itself, ``H`` with
        the transitive closure's context columns, or the whole transitive closure (or, ``"full"``,
        everything: the FFJORD baseline, outside what follows). All three give the
        sample ``z(T)`` exactly the closure's dependence pattern (a path in ``H`` is what an ODE
        propagates), so the structural guarantee is the same; they differ in how many hops information
        from ``x`` and the ancestors must travel through time inside the solve."""
        A = self.adjacency.clone()
        if kind == "full":  # FFJORD: no structure at all
            return torch.ones_like(A)
        if kind == "structure":
            return A
        C = transitive_closure(A, reflexive=False)
        if kind == "closure":
            return C
        A[:, self.dim:] = C[:, self.dim:]
        return A

    # ------------------------------------------------------------------ counts
    def reset_nfe(self) -> None:
        """Zero the cumulative and the latest function-evaluation counts."""
        for k in self._nfe:
            self._nfe[k] = 0
        self.last_stats.clear()

    @property
    def num_passes(self) -> int | None:
        """Network evaluations of the last sampling (``forward``) call; ``None`` before any."""
        stats = self.last_stats.get("forward")
        return None if stats is None else stats["evaluations"]

    @property
    def nfe(self) -> dict[str, int]:
        """Cumulative function evaluations: ``"forward"``, ``"inverse"`` and ``"backward"`` (adjoint solves)."""
        return dict(self._nfe)

    # ------------------------------------------------------------- tolerances
    def set_training_progress(self, progress: float | None) -> None:
        """Tell the flow how far training has come (``0`` start, ``1`` end; ``None``: not training).

        Only the tolerance schedule uses it; without one this does nothing.
        """
        self._progress = None if progress is None else min(max(float(progress), 0.0), 1.0)

    def current_tolerances(self) -> tuple[float, float]:
        """``(rtol, atol)`` of the next solve: the scheduled ones while training, else ``(rtol, atol)``."""
        if self.tolerance_schedule is None or self._progress is None or not self.training:
            return self.rtol, self.atol
        w = min(self._progress / _TIGHTEN_BY, 1.0)
        r0, a0 = self.tolerance_schedule
        return r0 ** (1 - w) * self.rtol ** w, a0 ** (1 - w) * self.atol ** w

    # ---------------------------------------------------------------- dynamics
    def _eta(self, t: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The paper gating's per-layer gates ``eta_1(t)``, ``eta_2(t)`` (each a list of ``(width_l,)``)."""
        out = self.eta_out(torch.tanh(self.eta_in(t.reshape(1, 1)))).reshape(-1)
        eta1, eta2 = out.split(sum(self._gate_widths))
        return list(eta1.split(self._gate_widths)), list(eta2.split(self._gate_widths))

    def _paper_gate(self, t: torch.Tensor):
        """Eq. 3's hook. The outer bias ``b_l ⊙ eta_2(t)`` of hidden layer ``l`` is added after its
        activation; as it does not depend on the inputs, it is carried into layer ``l + 1``'s linear
        output as ``(W_{l+1} ⊙ M_{l+1}) (b_l ⊙ eta_2(t))`` (exactly the same field, slopes unchanged)."""
        eta1, eta2 = self._eta(t)
        layers = self.net.layers
        last = len(layers) - 1
        carried = [None] + [
            nn.functional.linear(self.outer_bias[k - 1] * eta2[k - 1], layers[k].masked_weight) for k in range(1, last + 1)
        ]

        def gate_layer(k: int, p: torch.Tensor):
            if carried[k] is not None:
                p = p + carried[k]
            out = p * eta1[k]
            if k == last:
                out = out + self.outer_bias[k] * eta2[k]
            return out, eta1[k]

        return gate_layer

    def _gate(self, t: torch.Tensor):
        """The post-linear hook of the masked pass at time ``t``: layer ``k``'s per-unit time gate,
        returning the gated values and their slope (the gate) so the pass keeps the derivative."""
        if self.time_gating == "none":
            return None
        if self.time_gating == "paper":
            return self._paper_gate(t)

        def gate_layer(k: int, p: torch.Tensor):
            gate = torch.sigmoid(self.gate_weight[k] * t + self.gate_bias[k])
            out = p * gate
            if self.time_gating == "gate_and_bias":
                out = out + self.time_bias[k] * t
            return out, gate

        return gate_layer

    def _velocity_and_divergence(
        self, y: torch.Tensor, x: torch.Tensor | None, t: torch.Tensor, probe: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(y, x, t)`` ``(*batch, D)`` and its divergence (exact, or ``probe``'s estimate) ``(*batch,)``.

        Hutchinson: the Jacobian-vector product ``(df/dy) probe`` is carried forward through the
        layers at the cost of one more forward pass. Exact: see :meth:`_exact_divergence`.
        """
        D = self.state_dim
        t = t.to(y.dtype)
        inputs = y if x is None else torch.cat([y, x], -1)
        result = self.net.run(inputs, post=self._gate(t), need_slopes=probe is None, tangent=probe)
        f = result.output
        jvp = result.tangent
        skip = self.net.skip
        if skip is not None:
            S = skip.masked_weight
            f = f + nn.functional.linear(inputs, S)
            if probe is not None:
                jvp = jvp + nn.functional.linear(probe, S[:, :D])
        if probe is not None:
            div = (jvp * probe).sum(-1)
        else:
            div = self._exact_divergence(result.slopes[:-1], result.slopes[-1])
            if skip is not None:
                div = div + torch.diagonal(skip.masked_weight[:, :D]).sum()
            div = div.expand(f.shape[:-1])
        return f, div

    def _exact_divergence(self, slopes: list[torch.Tensor], out_gate: torch.Tensor | None) -> torch.Tensor:
        """``tr(df/dy)``: the sum over the masked network's diagonal paths ``y_u -> ... -> f_u``.

        ``df_u/dy_u = g_u * sum_paths W_L[u, k_H] s_H[k_H] ... W_2[k_2, k_1] s_1[k_1] W_1[k_1, u]``
        with ``s_l`` the hidden slopes and ``g`` the output gate (masked weights, so a path the
        masks close contributes an exact zero). With at most two hidden layers the sum over ``u``
        is taken once per evaluation, on the weights alone, and what is left per sample is a
        weighted sum of the slopes: ``s_1 . c`` with ``c[k] = sum_u g_u W_2[u, k] W_1[k, u]`` for
        one hidden layer, the bilinear form ``s_2^T C s_1`` with
        ``C = W_2 ⊙ (W_3^T diag(g) W_1[:, :D]^T)`` for two. That is one small matrix product per
        evaluation whatever the number of paths: on the circuit (683 paths at width 64) it took
        0.05 ms against 2.4 ms for gathering the slopes path by path, and with ``augment=10``
        (7,546 paths) 0.1 ms against 45 ms (``benchmarks/results/NOTES.md``, CNF section). Deeper
        networks sum over the paths enumerated once from the masks (:meth:`_diagonal_paths`).
        Returns ``(*batch,)`` (or ``()`` without hidden layers).
        """
        W = [layer.masked_weight for layer in self.net.layers]
        D = self.state_dim
        last = W[-1] if out_gate is None else W[-1] * out_gate.unsqueeze(-1)  # (D, H_L): g_u W_L[u, k]
        if len(W) == 1:
            return torch.diagonal(last[:, :D]).sum()
        first = W[0][:, :D]  # (H_1, D)
        if len(W) == 2:
            return slopes[0] @ (last * first.T).sum(0)
        if len(W) == 3:
            C = W[1] * (last.T @ first.T)  # (H_2, H_1)
            return ((slopes[0] @ C.T) * slopes[1]).sum(-1)
        return self._path_divergence(W, slopes, out_gate)

    def _path_divergence(self, W: list[torch.Tensor], slopes: list[torch.Tensor], out_gate: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_exact_divergence` for three or more hidden layers: a gather of the slopes and a
        product over the paths enumerated from the masks (``(*batch,)``)."""
        paths = self._diag_paths
        i = paths[0]
        coef = W[0][paths[1], i] * W[-1][i, paths[-1]]
        for l in range(1, len(W) - 1):
            coef = coef * W[l][paths[l + 1], paths[l]]
        if out_gate is not None:
            coef = coef * out_gate[i]
        for l, slope in enumerate(slopes):
            coef = coef * slope.index_select(-1, paths[l + 1])
        return coef.sum(-1)

    def _diagonal_paths(self) -> torch.Tensor:
        """Every path ``y_u -> k_1 -> ... -> k_H -> f_u`` through the masks: ``(H + 1, n_paths)`` long,
        row 0 the state unit ``u``, row ``l`` the unit of hidden layer ``l``."""
        D = self.state_dim
        masks = [layer.mask for layer in self.net.layers]
        if len(masks) == 1:
            i = torch.nonzero(torch.diagonal(masks[0][:, :D])).flatten()
            return i.unsqueeze(0)
        # reach[l][k, i]: hidden unit k of layer l + 1 has a path to output i
        reach = [masks[-1].T.clone()]
        for M in reversed(masks[1:-1]):
            reach.insert(0, (M.T.float() @ reach[0].float()) > 0)
        # start at (i, k_1) with y_i -> k_1 and k_1 able to reach f_i, then extend one layer at a time
        k1, i = torch.nonzero(masks[0][:, :D] & reach[0]).T
        paths = [i, k1]
        for l in range(1, len(masks) - 1):
            ok = masks[l].T[paths[-1]] & reach[l].T[paths[0]]  # (n_paths, width_l)
            p, k = torch.nonzero(ok).T
            paths = [q[p] for q in paths] + [k]
        return torch.stack(paths)

    def velocity(self, y: torch.Tensor, x: torch.Tensor | None = None, t: float | torch.Tensor = 0.0) -> torch.Tensor:
        """The velocity field ``f(y, x, t)``.

        ``y`` ``(*batch, D)`` (the state; ``D = d`` without augmentation) and ``x``
        ``(*batch, context_dim)`` (broadcast) -> ``(*batch, D)``.
        """
        y, x = self._validate(y, x, "y", self.state_dim)
        return self._velocity_and_divergence(y, x, torch.as_tensor(t, dtype=y.dtype, device=y.device), None)[0]

    def divergence_at(
        self,
        y: torch.Tensor,
        x: torch.Tensor | None = None,
        t: float | torch.Tensor = 0.0,
        probe: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``div_y f(y, x, t)`` ``(*batch,)`` of the state ``y`` ``(*batch, D)``: exact, or the
        Hutchinson estimate ``probe^T (df/dy) probe`` when a probe ``(*batch, D)`` is given."""
        y, x = self._validate(y, x, "y", self.state_dim)
        if probe is not None:
            probe = probe.expand(y.shape)
        return self._velocity_and_divergence(y, x, torch.as_tensor(t, dtype=y.dtype, device=y.device), probe)[1]

    # ------------------------------------------------------------------ solves
    def _probe(self, like: torch.Tensor) -> torch.Tensor | None:
        if self.divergence == "exact":
            return None
        if self.hutchinson_noise == "gaussian":
            return torch.randn_like(like)
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1

    @staticmethod
    def _rms(state: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # torchdiffeq's default norm for tuple states: the largest per-tensor RMS
        return torch.stack([s.pow(2).mean().sqrt() for s in state]).max()

    @torch.no_grad()
    def _first_step(self, func: _Dynamics, t0, t1, y0: tuple[torch.Tensor, ...], rtol: float, atol: float) -> float:
        """Hairer-Wanner initial step size (Solving ODEs I, II.4), without gradients.

        One change: where the field is negligible (``d1 < 1e-5``: it moves the state by less than
        1e-5 tolerances per unit time, e.g. a zero-initialised last layer) the first step is the
        whole interval. The textbook fallback ``h0 = 1e-6`` capped the first step at ``1e-4`` there,
        and dopri5's growth factor of 10 per step then cost ~6 steps (~40 NFE) for a zero field.
        """
        order = _ADAPTIVE_ORDERS[self.method] - 1  # torchdiffeq passes order - 1
        sign = 1.0 if t1 > t0 else -1.0
        interval = abs(float(t1 - t0))
        f0 = func(t0, y0)
        scale = tuple(atol + rtol * y.abs() for y in y0)
        d0 = self._rms(tuple(y / s for y, s in zip(y0, scale)))
        d1 = self._rms(tuple(f / s for f, s in zip(f0, scale)))
        if d1 < 1e-5:
            return interval
        h0 = 1e-6 if d0 < 1e-5 else float(0.01 * d0 / d1)
        y1 = tuple(y + sign * h0 * f for y, f in zip(y0, f0))
        f1 = func(t0 + sign * h0, y1)
        d2 = float(self._rms(tuple((b - a) / s for a, b, s in zip(f0, f1, scale)))) / h0
        if max(float(d1), d2) <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / max(float(d1), d2)) ** (1.0 / (order + 1))
        return min(100 * h0, h1, interval)

    def _solve(self, v: torch.Tensor, x: torch.Tensor | None, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate the state ``(v, 0)`` from ``0`` to ``T`` (``mode="forward"``) or ``T`` to ``0`` (``"inverse"``)."""
        from torchdiffeq import odeint, odeint_adjoint

        ends = [0.0, self.T] if mode == "forward" else [self.T, 0.0]
        t = torch.tensor(ends, dtype=v.dtype, device=v.device)
        y0 = (v, torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device))
        func = _Dynamics(self, x, self._probe(v), mode)
        start = self._nfe[mode]
        rtol, atol = self.current_tolerances()
        options = dict(self.options)
        if self.method in _ADAPTIVE_ORDERS and "first_step" not in options:
            options["first_step"] = self._first_step(func, t[0], t[1], y0, rtol, atol)
        try:
            if self.adjoint:
                params = tuple(p for p in self.parameters() if p.requires_grad)
                if x is not None and x.requires_grad:
                    params = params + (x,)
                adjoint_options = dict(self.options) if self.adjoint_options is None else dict(self.adjoint_options)
                adjoint_options.pop("norm", None)
                zs, ls = odeint_adjoint(
                    func, y0, t, rtol=rtol, atol=atol, method=self.method, options=options,
                    adjoint_options=adjoint_options, adjoint_params=params,
                )
            else:
                zs, ls = odeint(func, y0, t, rtol=rtol, atol=atol, method=self.method, options=options)
        finally:
            # evaluations after this point come from an adjoint backward solve
            func.mode = "backward"
        nfe = self._nfe[mode] - start
        # the auxiliary model's one pass counts as a network evaluation of the call, not of the solver
        self.last_stats[mode] = {"evaluations": nfe + (1 if self.augment else 0), "nfe": nfe}
        return zs[-1], ls[-1]

    # ----------------------------------------------------------- augmentation
    @staticmethod
    def _standard_normal_log_prob(e: torch.Tensor) -> torch.Tensor:
        """``log N(e; 0, I)`` ``(*batch,)`` of ``e`` ``(*batch, k)``."""
        return -0.5 * e.pow(2).sum(-1) - 0.5 * e.shape[-1] * math.log(2 * math.pi)

    def _auxiliary_params(self, z: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.aux(z if x is None else torch.cat([z, x], -1))  # (*batch, d * A, 2)
        mean, raw = out.unbind(-1)
        return mean, _MAX_LOG_SCALE * torch.tanh(raw / _MAX_LOG_SCALE)

    def auxiliary_log_prob(self, a: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``log r(a | z, x)`` ``(*batch,)`` of augmenting values ``a`` ``(*batch, d * A)`` given ``z`` ``(*batch, d)``."""
        self._require_augment("auxiliary_log_prob")
        z, x = self._validate(z, x, "z")
        mean, log_scale = self._auxiliary_params(z, x)
        return self._standard_normal_log_prob((a - mean) * torch.exp(-log_scale)) - log_scale.sum(-1)

    def auxiliary_sample(self, z: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised draw ``a ~ r(a | z, x)`` ``(*batch, d * A)`` and ``log r(a | z, x)`` ``(*batch,)``."""
        self._require_augment("auxiliary_sample")
        z, x = self._validate(z, x, "z")
        mean, log_scale = self._auxiliary_params(z, x)
        u = torch.randn_like(mean)
        return mean + torch.exp(log_scale) * u, self._standard_normal_log_prob(u) - log_scale.sum(-1)

    def _require_augment(self, what: str) -> None:
        if not self.augment:
            raise ValueError(f"{what} needs augmenting dimensions; this flow was built with augment=0")

    def _check_dtype(self, v: torch.Tensor) -> None:
        ref = self._reference()
        if ref.is_floating_point() and v.dtype != ref.dtype:
            raise ValueError(
                f"input dtype {v.dtype} does not match the flow's parameters ({ref.dtype}); convert one of them"
            )

    def _base_map(self, v: torch.Tensor, x: torch.Tensor | None, mode: str):
        """The base layer on the latent part of a state ``v`` ``(*batch, D)``: noise to the ODE's start
        (``mode="forward"``) or back (``"inverse"``); the augmenting part passes through. Returns the
        mapped state, its ``log|det|`` ``(*batch,)`` (or ``0.0``) and the layer's network evaluations."""
        if self.base is None:
            return v, 0.0, 0
        d = self.dim
        head, ld = (self.base if mode == "forward" else self.base.inverse)(v[..., :d], x)
        out = torch.cat([head, v[..., d:]], -1) if self.augment else head
        return out, ld, self.base.last_stats[mode]["evaluations"]

    def _state_forward(self, e: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """State noise ``e`` ``(*batch, D)`` -> ``y`` and ``log|det dy/de|``: the base layer, then the ODE."""
        self._check_dtype(e)
        v, ld0, passes = self._base_map(e, x, "forward")
        y, ld = self._solve(v, x, "forward")
        self.last_stats["forward"]["evaluations"] += passes  # _solve has just reset this call's stats
        return y, ld0 + ld

    def _state_inverse(self, y: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """State ``y`` ``(*batch, D)`` -> noise ``e`` and ``log|det de/dy|``: the ODE backwards, then the base layer's inverse."""
        self._check_dtype(y)
        v, ld = self._solve(y, x, "inverse")
        e, ld0, passes = self._base_map(v, x, "inverse")
        self.last_stats["inverse"]["evaluations"] += passes
        return e, ld + ld0

    def forward_state(self, e: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact bijection on the state: noise ``e`` ``(*batch, D)`` -> ``y`` ``(*batch, D)`` and
        ``log|det dy/de|`` ``(*batch,)`` (without augmentation the same as :meth:`forward`)."""
        e, x = self._validate(e, x, "e", self.state_dim)
        return self._state_forward(e, x)

    def inverse_state(self, y: torch.Tensor, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse bijection: state ``y`` ``(*batch, D)`` -> ``e`` ``(*batch, D)`` and ``log|det de/dy|``."""
        y, x = self._validate(y, x, "y", self.state_dim)
        return self._state_inverse(y, x)

    def state_log_prob(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The exact ``log q(z, a | x)`` ``(*batch,)`` of states ``y = [z, a]`` ``(*batch, D)``."""
        e, logdet = self.inverse_state(y, x)
        return self._standard_normal_log_prob(e) + logdet

    def rsample_state(self, x: torch.Tensor | None = None, n: int = 1):
        """Reparameterised states with their densities.

        Returns:
            ``y = [z, a]`` ``(n, *batch, D)``, the exact ``log q(z, a | x)`` ``(n, *batch)`` and
            ``log r(a | z, x)`` ``(n, *batch)`` (zeros without augmentation). It draws its noise as
            :meth:`rsample_and_log_prob` does (latent noise, then augmenting noise), so under the
            same seed that method returns ``z = y[..., :d]`` and ``log q(z, a | x) - log r(a | z, x)``.
        """
        x = self._check_context(x)
        eps, xs = self._noise(x, n)
        eps, xs = self._validate(eps, xs, "eps")
        return self._sample_state(eps, xs)

    def _sample_state(self, eps: torch.Tensor, x: torch.Tensor | None):
        """Latent noise ``eps`` ``(*batch, d)`` plus fresh augmenting noise -> ``(y, log q(y | x), log r(a | z, x))``."""
        d = self.dim
        e = eps
        if self.augment:
            e = torch.cat([eps, torch.randn(eps.shape[:-1] + (d * self.augment,), dtype=eps.dtype, device=eps.device)], -1)
        y, logdet = self._state_forward(e, x)
        log_q = self._standard_normal_log_prob(e) - logdet
        if not self.augment:
            return y, log_q, torch.zeros_like(log_q)
        return y, log_q, self.auxiliary_log_prob(y[..., d:], y[..., :d], x)

    def _forward(self, eps: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``eps`` ``(*batch, d)`` (and fresh augmenting noise) from ``t=0`` to ``T``.

        Returns:
            ``z`` ``(*batch, d)`` and ``log|det dz/deps| = ∫_0^T div f dt`` ``(*batch,)``; with
            augmentation the effective value ``base_log_prob(eps) - ℓ`` with ``ℓ`` the sample's
            bound (class docstring), so ``base_log_prob(eps) - logdet`` is what every caller needs.
        """
        if not self.augment:
            return self._state_forward(eps, x)
        y, log_q, log_r = self._sample_state(eps, x)
        return y[..., : self.dim], self.base_log_prob(eps) - (log_q - log_r)

    def _inverse(self, z: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``z`` ``(*batch, d)`` (with ``a ~ r(a | z, x)``) from ``t=T`` back to ``0``.

        Returns:
            ``eps`` ``(*batch, d)`` and ``log|det deps/dz| = -∫_0^T div f dt`` ``(*batch,)``; with
            augmentation the effective value ``ℓ - base_log_prob(eps)`` at ``a ~ r`` (class
            docstring), so ``base_log_prob(eps) + logdet`` is the ELBO over the augmenting dims.
        """
        if not self.augment:
            return self._state_inverse(z, x)
        a, log_r = self.auxiliary_sample(z, x)
        e, logdet = self._state_inverse(torch.cat([z, a], -1), x)
        eps = e[..., : self.dim]
        return eps, self._standard_normal_log_prob(e) + logdet - log_r - self.base_log_prob(eps)

    def log_prob(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """``log q(z | x)`` ``(*batch,)`` of ``z`` ``(*batch, d)``: exact without augmentation, else the
        bound of the class docstring (ELBO over the augmenting dims; importance-weighted with
        ``aux_samples > 1``)."""
        K = self.aux_samples if self.augment else 1
        if K == 1:
            return super().log_prob(z, x)
        z, x = self._validate(z, x, "z")
        zk = z.expand((K,) + z.shape)
        xk = None if x is None else x.expand((K,) + x.shape)
        bound = super().log_prob(zk, xk)
        return torch.logsumexp(bound, 0) - math.log(K)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, hidden={self.net.hidden_sizes}, T={self.T}, method={self.method!r}, "
            f"rtol={self.rtol}, atol={self.atol}, divergence={self.divergence!r}, adjoint={self.adjoint}, "
            f"time_gating={self.time_gating!r}, include_diagonal={self.include_diagonal}, augment={self.augment}, "
            f"base_layer={self.base_layer!r}"
        )
