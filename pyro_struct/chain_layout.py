"""How site values of a time chain map to the chain flow: globals ``(*batch, g)``, steps ``(*batch, T, k)``, for any length ``T``.

Sites of step ``t`` are named ``<stem><t>`` (:class:`~pyro_struct.chains.Chain`); the length of a
set of observations is read from the names present (``x_0..x_{T'-1}``), so one layout serves
chains of every length. Standardisation is per global coordinate and per step coordinate (shared
by all steps).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .layout import LevelMoments, SiteBlock, _permutation, _sum_to_batch, compress_tails

__all__ = ["ChainLayout"]


class ChainLayout(LevelMoments, nn.Module):
    """Site values <-> the chain flow's globals and steps (see the module docstring).

    Args:
        bn: the model's :class:`~pyro_struct.BayesNet`.
        template: the :class:`~pyro_struct.chains.ChainInverse`.

    Attributes:
        global_labels: global latent labels in the flow's order; stems: latent / observed chain stems.
    """

    moment_names = ("global", "step", "global_obs", "obs")

    def __init__(self, bn, template):
        super().__init__()
        chain = self.chain = template.chain
        self.traced_length = chain.length
        self.trace_sites = list(bn.latent_sites)
        self.global_sites = [SiteBlock(bn.sites[s]) for s in bn.latent_sites if s not in self._chain_sites()]
        self.global_obs_sites = [SiteBlock(bn.sites[s]) for s in bn.observed_sites if s not in self._chain_sites()]
        self.stems = [(stem, SiteBlock(bn.sites[chain.sites[stem][0]])) for stem in chain.latent_stems]
        self.obs_stems = [(stem, SiteBlock(bn.sites[chain.sites[stem][0]])) for stem in chain.observed_stems]
        self.global_labels = list(template.global_order)
        g_trace = [n for b in self.global_sites for n in bn.sites[b.name].nodes]
        dtype = torch.get_default_dtype()
        self.register_buffer("global_perm", _permutation(g_trace, self.global_labels, "global latent"))
        self.register_buffer("step_perm", torch.tensor(template.step_order, dtype=torch.long))
        for name, size in (("global", len(g_trace)), ("step", len(template.step_order)),
                           ("global_obs", sum(b.size for b in self.global_obs_sites)), ("obs", len(chain.obs_coords))):
            self.register_buffer(f"{name}_loc", torch.zeros(size, dtype=dtype))
            self.register_buffer(f"{name}_scale", torch.ones(size, dtype=dtype))

    def _chain_sites(self) -> set:
        return {s for names in self.chain.sites.values() for s in names}

    @property
    def num_globals(self) -> int:
        return len(self.global_labels)

    @property
    def step_dim(self) -> int:
        return len(self.step_perm)

    def site_names(self, length: int) -> list[str]:
        """Latent site names of a chain of ``length`` steps, in flat-vector order (the trace order at the
        traced length; otherwise the globals, then step by step)."""
        if length == self.traced_length:
            return list(self.trace_sites)
        return [b.name for b in self.global_sites] + [self.chain.site_name(s, t) for t in range(length) for s, _ in self.stems]

    # ------------------------------------------------------------ observed
    def length_of(self, values: Mapping[str, Any], where: str) -> int:
        """The chain length of observed values (the steps ``0..T-1`` of every observed stem must be there)."""
        if not self.obs_stems:
            return self.traced_length
        lengths = {}
        for stem, _ in self.obs_stems:
            T = 0
            while self.chain.site_name(stem, T) in values:
                T += 1
            lengths[stem] = T
        if len(set(lengths.values())) > 1 or not max(lengths.values()):
            raise ValueError(f"{where}: the chain's observed sites must cover steps 0..T-1 alike; got {lengths} steps per stem "
                             f"(pass {', '.join(self.chain.site_name(s, 0) for s, _ in self.obs_stems)}, ...)")
        return next(iter(lengths.values()))

    def _stack(self, stems, values, length: int, batch: torch.Size | None, where: str, what: str):
        """``(*batch, T, *shape)`` per stem, checking shapes; and the common batch shape."""
        ref, out, batches = self.global_loc, [], []
        for stem, b in stems:
            vs = [torch.as_tensor(values[self.chain.site_name(stem, t)], dtype=ref.dtype, device=ref.device) for t in range(length)]
            batches += [b.check_shape(v, where, what) for v in vs]
            out.append(vs)
        try:
            lead = torch.broadcast_shapes(*batches) if batches else torch.Size()
        except RuntimeError:
            raise ValueError(f"{where}: the batch shapes of the chain's sites do not broadcast") from None
        lead = lead if batch is None else torch.broadcast_shapes(lead, batch)
        stacked = [torch.stack([v.expand(lead + b.shape) for v in vs], len(lead)) for (stem, b), vs in zip(stems, out)]
        return stacked, torch.Size(lead)

    def observe(self, values: Mapping[str, Any], where: str = "posterior", check_finite: bool = True, compress: bool = True):
        """Observed values site -> ``(*batch, *shape)`` -> ``(global context (*batch, cg) or None, chain
        observations (*batch, T, ko), batch, T)``, standardised and (``compress``) tail-compressed. Errors name the site."""
        T = self.length_of(values, where)
        known = {b.name for b in self.global_obs_sites} | {self.chain.site_name(s, t) for s, _ in self.obs_stems for t in range(T)}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValueError(f"{where}: {unknown[0]!r} is not an observed site of the model (or not a step 0..{T - 1} of the chain)")
        for k in known:
            if values.get(k) is None:
                raise ValueError(f"{where}: missing observation for site {k!r}; pass {k}=...")
            if check_finite and not torch.isfinite(torch.as_tensor(values[k])).all():
                raise ValueError(f"{where}: the observation for site {k!r} has non-finite values; an amortised posterior needs finite observations")
        stacked, batch = self._stack(self.obs_stems, values, T, None, where, "observation")
        ref = self.global_loc
        glob = []
        for b in self.global_obs_sites:
            v = torch.as_tensor(values[b.name], dtype=ref.dtype, device=ref.device)
            batch = torch.broadcast_shapes(batch, b.check_shape(v, where, "observation"))
            glob.append(v)
        glob = [v.expand(batch + b.shape).reshape(batch + (b.size,)) for v, b in zip(glob, self.global_obs_sites)]
        # (compress=False: the raw standardised values, which the statistics are computed from)
        squash = compress_tails if compress else (lambda t: t)
        g_ctx = squash((torch.cat(glob, -1) - self.global_obs_loc) / self.global_obs_scale) if glob else None
        nb = len(batch)
        obs = [v.expand(batch + v.shape[nb:]).reshape(batch + (T, -1)) for v in stacked]
        obs = torch.cat(obs, -1) if obs else ref.new_zeros(batch + (T, 0))
        return g_ctx, squash((obs - self.obs_loc) / self.obs_scale), torch.Size(batch), T

    # ------------------------------------------------------------ latent
    def pack(self, values: Mapping[str, torch.Tensor], batch_shape: torch.Size, length: int):
        """Constrained latents -> standardised ``(y_globals (*batch, g), y_steps (*batch, T, k))`` and
        ``log|d value / d u|`` ``(*batch,)`` (``+inf`` outside a site's support)."""
        batch_shape, ref = torch.Size(batch_shape), self.global_loc
        ladj, glob, steps = ref.new_zeros(batch_shape), [], []
        pieces = [(b, torch.as_tensor(values[b.name], dtype=ref.dtype, device=ref.device).expand(batch_shape + b.shape), False)
                  for b in self.global_sites]
        stacked, _ = self._stack(self.stems, values, length, batch_shape, "log_prob", "the value")
        pieces += [(b, v, True) for (_, b), v in zip(self.stems, stacked)]
        for b, v, in_chain in pieces:
            u = b.transform.inv(v)
            site_ladj = _sum_to_batch(b.transform.log_abs_det_jacobian(u, v), batch_shape)
            outside = _sum_to_batch((~b.support.check(v)).to(ref.dtype), batch_shape) > 0
            ladj = ladj + torch.where(outside, torch.full_like(site_ladj, math.inf), site_ladj)
            u = torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
            (steps if in_chain else glob).append(u.reshape(batch_shape + ((length, -1) if in_chain else (-1,))))
        y_g = (torch.cat(glob, -1).index_select(-1, self.global_perm) - self.global_loc) / self.global_scale if glob else ref.new_zeros(batch_shape + (0,))
        y_s = (torch.cat(steps, -1).index_select(-1, self.step_perm) - self.step_loc) / self.step_scale
        return y_g, y_s, ladj

    def unpack(self, y_globals: torch.Tensor, y_steps: torch.Tensor):
        """Standardised ``(*batch, g)``, ``(*batch, T, k)`` -> constrained values site -> ``(*batch, *shape)``,
        the flat unconstrained vector ``(*batch, D_T)`` (order of :meth:`site_names`) and ``log|d value / d u|`` ``(*batch,)``."""
        batch, T = y_steps.shape[:-2], y_steps.shape[-2]
        u_g = (self.global_loc + self.global_scale * y_globals).index_select(-1, torch.argsort(self.global_perm))
        u_g = u_g.expand(batch + u_g.shape[-1:])
        u_s = (self.step_loc + self.step_scale * y_steps).index_select(-1, torch.argsort(self.step_perm))
        unconstrained, off = {}, 0
        for b in self.global_sites:
            unconstrained[b.name] = u_g[..., off: off + b.size].reshape(batch + b.shape)
            off += b.size
        off = 0
        for stem, b in self.stems:
            block = u_s[..., off: off + b.size].reshape(batch + (T,) + b.shape)
            off += b.size
            for t, u in enumerate(block.unbind(len(batch))):  # (unbind: one backward for all steps)
                unconstrained[self.chain.site_name(stem, t)] = u
        return self._constrain(unconstrained, batch, T)

    def _constrain(self, unconstrained: dict, batch: torch.Size, length: int):
        blocks = {b.name: b for b in self.global_sites}
        blocks.update({self.chain.site_name(s, t): b for s, b in self.stems for t in range(length)})
        values, flat, ladj = {}, [], None
        for name in self.site_names(length):
            u, t = unconstrained[name], blocks[name].transform
            v = t(u)
            lj = _sum_to_batch(t.log_abs_det_jacobian(u, v), batch)
            ladj = lj if ladj is None else ladj + lj
            values[name] = v
            flat.append(u.reshape(batch + (-1,)))
        return values, torch.cat(flat, -1), ladj

    def unflatten(self, flat: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """The flat unconstrained vector ``(*batch, D_T)`` -> unconstrained site values."""
        blocks = {b.name: b for b in self.global_sites}
        blocks.update({self.chain.site_name(s, t): b for s, b in self.stems for t in range(length)})
        out, off = {}, 0
        for name in self.site_names(length):
            b = blocks[name]
            out[name] = flat[..., off: off + b.size].reshape(flat.shape[:-1] + b.shape)
            off += b.size
        return out

    def block(self, name: str) -> SiteBlock:
        """The :class:`~pyro_struct.layout.SiteBlock` (shape, transform) of a latent site of any step."""
        for b in self.global_sites:
            if b.name == name:
                return b
        for stem, b in self.stems:
            if name.startswith(stem) and name[len(stem):].isdigit():
                return b
        raise KeyError(name)

    def latent_batch_shape(self, values: Mapping[str, Any], length: int, where: str = "log_prob") -> torch.Size:
        """The common batch shape of latent values site -> ``(*batch, *shape)`` for ``length`` steps."""
        for name in self.site_names(length):
            if name not in values:
                raise ValueError(f"{where}: missing value for latent site {name!r}; pass every latent site")
        shapes = [self.block(n).check_shape(torch.as_tensor(values[n]), where, "the value") for n in self.site_names(length)]
        try:
            return torch.Size(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            raise ValueError(f"{where}: the batch shapes of the latent values do not broadcast") from None

    def log_scale(self, length: int) -> torch.Tensor:
        """The standardisation's ``log|du/dy|`` for ``length`` steps."""
        return self.global_scale.log().sum() + length * self.step_scale.log().sum()

    # ------------------------------------------------------------ statistics
    @torch.no_grad()
    def set_statistics(self, simulations: Mapping[str, torch.Tensor]) -> None:
        """Standardise by simulations site -> ``(n, *shape)``: globals per coordinate, steps per coordinate pooled over ``t``."""
        self._reset()
        obs_names = [b.name for b in self.global_obs_sites] + [self.chain.site_name(s, t) for s, _ in self.obs_stems
                                                                for t in range(self.traced_length)]
        g_ctx, obs, batch, T = self.observe({k: simulations[k] for k in obs_names}, "standardisation", False, False)
        y_g, y_s, _ = self.pack({k: simulations[k] for k in self.site_names(T)}, batch, T)
        self._copy_moments((("global", y_g), ("step", y_s), ("global_obs", g_ctx), ("obs", obs)))

    @torch.no_grad()
    def set_observed_statistics(self, observations: Mapping[str, torch.Tensor]) -> None:
        """Standardise the context by observations (steps pooled); the latents are left unstandardised."""
        self._reset()
        g_ctx, obs, _, _ = self.observe(observations, "standardisation", False, False)
        self._copy_moments((("global_obs", g_ctx), ("obs", obs)))
