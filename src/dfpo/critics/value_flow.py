"""DFPO's distributional critic: a value flow.

A velocity field ``v(z, tau | h)`` carries base noise ``eps ~ N(0, sigma0^2)`` at ``tau = 0`` to samples of the
return at ``tau = 1``; inference is one Euler step, ``Z = eps + v(eps, 0 | h)``, from sorted stratified noise, so
the ``K`` samples are quantiles at levels ``(k + 1/2) / K``.

How it is trained depends on what its targets are. A trainer gives each token the ``K`` targets of ONE trajectory
(distributional GAE; with ``lam = 1`` all ``K`` equal the observed return), so the return's distribution from a
state is only visible pooled over trajectories. Flow matching onto one trajectory's targets then learns the
marginal field, whose single Euler step lands on the *mean* (the distribution collapses), whatever the coupling.
The default loss therefore fits the one-step samples by quantile regression at their levels (the ``quantile``
anchor, whose minimiser is the pooled quantile function), keeps the field straight along the one-step lines
(``velocity`` consistency, so that more Euler steps give the same samples), and calibrates the tails against the
pooled distribution (:mod:`dfpo.core.risk`). Flow matching between sorted noise and sorted targets (the 1-D
optimal-transport coupling) is kept as ``cfm_weight``: it is what to use when every token has ``K`` i.i.d. draws
of its own return distribution, and an ablation in the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dfpo.core.masked import explained_variance, masked_mean
from dfpo.core.risk import cvar, risk_loss
from dfpo.core.value_losses import flow_matching, quantile_huber, quantile_levels
from dfpo.critics.base import CriticContext, DistributionalTargets, register

COUPLINGS = ("sorted", "independent")
UNCERTAINTY_WEIGHTS = ("valueflows", "inverse", "none")
ANCHORS = ("mean", "quantile", "td", "none")
CONSISTENCIES = ("endpoint", "velocity", "none")
SOLVERS = ("euler", "heun")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(valid)}")


def _rand(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    uniform: Callable[[tuple[int, ...]], Tensor] | None,
    device: torch.device | None,
    dtype: torch.dtype,
) -> Tensor:
    """U(0, 1) draws of ``shape``: from ``uniform`` if given, else ``torch.rand`` with ``generator``."""
    if uniform is None:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    draws = uniform(shape)
    if tuple(draws.shape) != tuple(shape):
        raise ValueError(f"uniform({shape}) returned a tensor of shape {tuple(draws.shape)}")
    return draws.to(device=device, dtype=dtype)


def stratified_noise(
    shape: tuple[int, ...],
    num_samples: int,
    std: float = 1.0,
    jitter: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    uniform: Callable[[tuple[int, ...]], Tensor] | None = None,
) -> Tensor:
    """Sorted Gaussian noise at stratified levels, ``[*shape, K]``.

    ``eps_k = std * Phi^-1(u_k)`` with ``u_k = (k + 1/2) / K`` (midpoints), or with ``jitter`` a uniform draw
    inside each stratum ``[k / K, (k + 1) / K)``, independently per position: still ascending in ``k``, so it keeps
    the sorted coupling while covering the whole noise line during training. ``uniform(shape)``, if given, supplies
    the U(0, 1) draws instead of ``torch.rand`` with ``generator``.
    """
    k = torch.arange(num_samples, device=device, dtype=dtype)
    if jitter:
        offset = _rand((*shape, num_samples), generator, uniform, device, dtype)
        u = (k + offset) / num_samples
    else:
        u = ((k + 0.5) / num_samples).expand(*shape, num_samples)
    u = u.clamp(1e-4, 1.0 - 1e-4)  # Phi^-1 is infinite at 0 and 1
    return std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


class ValueFlowCritic(DistributionalTargets, nn.Module):
    """Velocity field of a value flow, conditioned on the critic backbone's hidden state at each token.

    Architecture (per token, then per sample): ``h -> LayerNorm -> Linear -> SiLU -> Linear`` gives an input
    bias and a FiLM scale/shift for each residual block; ``(z, tau)`` are embedded with Fourier features and a
    linear layer; ``num_blocks`` residual MLP blocks are modulated by the FiLM parameters; a final linear layer
    initialised to zero makes the initial flow the identity (``Z = eps``, ``V = 0``). The per-token part is
    computed once and shared by the ``K`` samples, so a sample costs about ``2 * num_blocks * width^2`` MACs.

    All internal arithmetic is in units of ``return_scale``: samples are ``return_scale * z``.

    Args:
        hidden_size: backbone hidden size ``H``.
        width: width of the per-sample network.
        num_blocks: residual blocks.
        num_frequencies: Fourier frequencies for ``z`` and ``tau`` (``pi/4 * 2^j``).
        return_scale: typical return magnitude (1 for {0, 1} rewards).
        noise_std: ``sigma0`` of the base noise, in units of ``return_scale``; the flow starts as the identity, so
            this is the initial spread of the samples (0.25: the initial samples are not wider than a 0/1 return).
        value_range: optional ``(low, high)`` feasible return range; :meth:`sample` and :meth:`targets` clamp
            to it.
        num_samples, sample_steps: ``K`` samples per token and Euler steps of :meth:`outputs`.
        loss_options: keyword options of :meth:`loss` used by :meth:`training_loss`.

    In the :class:`dfpo.critics.base.Critic` protocol it outputs ``samples`` (``K`` sorted one-step samples) and
    trains on distributional GAE targets.
    """

    def __init__(
        self,
        hidden_size: int,
        width: int = 128,
        num_blocks: int = 2,
        num_frequencies: int = 6,
        return_scale: float = 1.0,
        noise_std: float = 0.25,
        value_range: tuple[float, float] | None = None,
        num_samples: int = 16,
        sample_steps: int = 1,
        loss_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.width, self.num_blocks = width, num_blocks
        self.num_samples, self.sample_steps = num_samples, sample_steps
        self.loss_options = {"sample_steps": sample_steps, **(loss_options or {})}
        self.return_scale, self.noise_std, self.value_range = return_scale, noise_std, value_range
        self.register_buffer(
            "frequencies", (math.pi / 4) * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32), persistent=False
        )
        self.condition = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width), nn.SiLU())
        self.film = nn.Linear(width, width * (1 + 2 * num_blocks))
        # Per-token affine part of the field, v = a(h) z + b(h) + net(z, tau, h): a Gaussian-shaped return
        # distribution is exact with the net at zero, so the net only models the shape beyond it.
        self.affine = nn.Linear(width, 2)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)
        self.embed = nn.Linear(2 + 4 * num_frequencies, width)
        self.block_in = nn.ModuleList(nn.Linear(width, width) for _ in range(num_blocks))
        self.block_out = nn.ModuleList(nn.Linear(width, width) for _ in range(num_blocks))
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # -- the field -------------------------------------------------------------------------------------------

    def _features(self, x: Tensor) -> Tensor:
        angles = x.unsqueeze(-1) * self.frequencies
        return torch.cat([x.unsqueeze(-1), angles.sin(), angles.cos()], dim=-1)

    def velocity(self, z: Tensor, tau: Tensor | float, cond: Tensor) -> Tensor:
        """``v(z, tau | h)`` in normalised units.

        Args:
            z: ``[..., K]`` positions along the flow (normalised by ``return_scale``).
            tau: flow time, a float or a tensor broadcastable to ``z``.
            cond: ``[..., (1 + 2 * num_blocks) * width + 2]`` from :meth:`conditioning`.
        Returns:
            ``[..., K]``.
        """
        tau = torch.as_tensor(tau, dtype=z.dtype, device=z.device).expand_as(z)
        film = cond[..., :-2].unsqueeze(-2).split(self.width, dim=-1)  # each [..., 1, width]
        slope, offset = cond[..., -2:-1], cond[..., -1:]
        x = torch.nn.functional.silu(self.embed(torch.cat([self._features(z), self._features(tau)], -1)) + film[0])
        for b in range(self.num_blocks):
            y = self.block_in[b](x) * (1.0 + film[1 + 2 * b]) + film[2 + 2 * b]
            x = x + self.block_out[b](torch.nn.functional.silu(y))
        return self.out(x).squeeze(-1) + slope * z + offset

    def conditioning(self, hidden: Tensor) -> Tensor:
        """Per-token conditioning ``[..., H] -> [..., (1 + 2 * num_blocks) * width + 2]``."""
        c = self.condition(hidden)
        return torch.cat([self.film(c), self.affine(c)], dim=-1)

    def _integrate(self, eps: Tensor, cond: Tensor, steps: int, solver: str) -> Tensor:
        z = eps
        dt = 1.0 / steps
        for n in range(steps):
            v = self.velocity(z, n * dt, cond)
            if solver == "heun":
                v = 0.5 * (v + self.velocity(z + dt * v, (n + 1) * dt, cond))
            z = z + dt * v
        return z

    # -- inference -------------------------------------------------------------------------------------------

    def sample(
        self,
        hidden: Tensor,
        num_samples: int = 32,
        steps: int = 1,
        solver: str = "euler",
        stratified: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Return samples ``[..., H] -> [..., K]``; stratified samples are sorted, sample k at level (k + 1/2) / K.

        One Euler step by default (``Z = eps + v(eps, 0 | h)``); ``steps > 1`` or ``solver="heun"`` integrate
        more finely (ablations). Stratified noise makes the ``K`` samples quantiles at levels ``(k + 1/2) / K``;
        ``stratified=False`` draws i.i.d. noise instead. Clamped to ``value_range`` if one is set.
        """
        _check("solver", solver, SOLVERS)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        shape = tuple(hidden.shape[:-1])
        if stratified:
            eps = stratified_noise(shape, num_samples, self.noise_std, device=hidden.device, dtype=hidden.dtype)
        else:
            eps = self.noise_std * torch.randn(
                (*shape, num_samples), generator=generator, device=hidden.device, dtype=hidden.dtype
            )
        z = self._integrate(eps, self.conditioning(hidden), steps, solver) * self.return_scale
        if stratified:
            # The exact flow is monotone in eps; a coarse Euler step can swap near neighbours. Sorting is the
            # monotone rearrangement (it never increases the error against the true quantiles) and keeps sample k
            # at quantile level k, which distributional GAE relies on.
            z = torch.sort(z, dim=-1).values
        if self.value_range is not None:
            z = z.clamp(*self.value_range)
        return z

    def value(self, hidden: Tensor, num_samples: int = 32) -> Tensor:
        """``V = mean_k Z^k`` of one-step stratified samples, ``[..., H] -> [...]``."""
        return self.sample(hidden, num_samples).mean(-1)

    # -- training --------------------------------------------------------------------------------------------

    def loss(
        self,
        hidden: Tensor,
        target_samples: Tensor,
        mask: Tensor,
        *,
        coupling: str = "sorted",
        noise_jitter: bool = True,
        uncertainty_weight: str = "valueflows",
        uncertainty_c: float = 0.3,
        anchor: str = "quantile",
        anchor_weight: float = 1.0,
        anchor_samples: Tensor | None = None,
        anchor_kappa: float = 0.02,
        consistency: str = "velocity",
        consistency_weight: float = 0.1,
        consistency_steps: int = 4,
        risk_weight: float = 0.1,
        risk_alpha: float = 0.1,
        risk_beta: float = 0.1,
        cvar_weight: float = 1.0,
        gain_weight: float = 1.0,
        shape_weight: float = 0.0,
        sample_steps: int = 1,
        shift_weight: float = 0.0,
        curvature_weight: float = 0.0,
        risk_targets: str = "pooled",
        cfm_weight: float = 0.0,
        generator: torch.Generator | None = None,
        uniform: Callable[[tuple[int, ...]], Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The critic's training loss.

        ``L = cfm_weight * L_cfm + anchor_weight * L_anchor + consistency_weight * L_geo + risk_weight * L_risk``
        (defaults: the quantile anchor, velocity consistency 0.1, pooled risk terms 0.1, no flow matching; see the
        module docstring for why):

        - ``L_cfm``: flow matching on straight paths ``x_tau = (1 - tau) eps_(k) + tau Zhat_(k)``,
          ``u = Zhat_(k) - eps_(k)``, ``tau ~ U(0, 1)``, weighted per token by the uncertainty weight
          ``w = sigmoid(-c / sigma) + 1/2`` (``valueflows``; ``inverse`` is ``3/2 - sigmoid(-c / sigma)``;
          ``none`` is 1), ``sigma`` the std of the critic's current one-step samples (no grad).
          ``coupling="sorted"`` pairs sorted noise with sorted targets; ``"independent"`` pairs i.i.d. noise
          with targets in random order, under which flow matching alone collapses one-step samples to the mean.
        - ``L_anchor``: ``quantile``: quantile Huber (``anchor_kappa``, small against the return spread) of the
          one-step samples at levels ``(k + 1/2) / K`` onto all targets, weighted per token by the uncertainty
          weight, whose minimiser is the quantile function of the targets pooled over trajectories; ``mean``:
          squared error of the one-step mean onto the target mean; ``td``: the same flow matching onto
          ``anchor_samples`` (one-step TD targets ``r_t + gamma Z_{t+1}``); ``none``.
        - ``L_geo``: ``endpoint``: one-step samples onto the stop-gradient ``consistency_steps``-step Euler
          solution from the same noise; ``velocity``: ``v`` along the one-step line equals the (stop-gradient)
          one-step displacement ``v(eps, 0)``; ``none``.
        - ``L_risk``: :func:`dfpo.core.risk.risk_loss` of the sorted one-step samples against the targets,
          ``risk_targets="pooled"`` (calibrated across trajectories) or ``"token"`` (each token's own targets).

        The anchor, consistency and risk terms see the samples the critic gives at inference: one Euler step, or
        ``sample_steps`` steps (an ablation; :meth:`sample` with the same ``steps``).

        Args:
            hidden: ``[..., H]`` critic hidden states, with grad.
            target_samples: ``[..., K]`` target return samples (distributional GAE), no grad; any ``K >= 2``.
            mask: ``[...]`` 1 on positions that count.
            anchor_samples: ``[..., K]`` for ``anchor="td"``.
            generator: the generator of the loss's random draws (flow-matching times, noise jitter).
            uniform: ``uniform(shape) -> Tensor`` of U(0, 1) draws, used instead of ``generator`` for every draw:
                a trainer that splits a batch over processes passes draws keyed by each row's place in the global
                batch, so that the loss does not depend on the split.
        Returns:
            ``(loss, metrics)`` with ``critic/loss``, each term, ``critic/value_mean``, ``critic/dist_std``,
            ``critic/cvar`` (CVaR at ``risk_alpha``), ``critic/explained_var``, ``critic/uncertainty_weight``.
        """
        _check("coupling", coupling, COUPLINGS)
        _check("uncertainty_weight", uncertainty_weight, UNCERTAINTY_WEIGHTS)
        _check("anchor", anchor, ANCHORS)
        _check("consistency", consistency, CONSISTENCIES)
        num_samples = target_samples.shape[-1]
        if num_samples < 2:
            raise ValueError(f"target_samples needs K >= 2 samples in its last dim, got shape {target_samples.shape}")
        if anchor == "td" and anchor_samples is None:
            raise ValueError('anchor="td" needs anchor_samples (one-step TD targets); or use anchor="mean"')

        cond = self.conditioning(hidden)
        shape = tuple(target_samples.shape[:-1])
        targets = target_samples.detach() / self.return_scale

        # One-step samples from midpoint noise, with grad: the critic's distribution as it is used.
        eps_mid = stratified_noise(shape, num_samples, self.noise_std, device=hidden.device, dtype=hidden.dtype)
        if sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {sample_steps}")
        one_step = self._integrate(eps_mid, cond, sample_steps, "euler")
        sigma = one_step.detach().std(-1) * self.return_scale
        if uncertainty_weight == "valueflows":
            weight = torch.sigmoid(-uncertainty_c / sigma.clamp_min(1e-6)) + 0.5
        elif uncertainty_weight == "inverse":
            weight = 1.5 - torch.sigmoid(-uncertainty_c / sigma.clamp_min(1e-6))
        else:
            weight = None

        draws = (generator, uniform)
        metrics: dict[str, float] = {}
        total = hidden.new_zeros(())
        if cfm_weight != 0.0:
            cfm, _ = self._flow_matching(cond, targets, mask, weight, coupling, noise_jitter, draws)
            total = total + cfm_weight * cfm
            metrics["critic/cfm_loss"] = float(cfm.detach())

        if anchor == "mean":
            anchor_loss = masked_mean((one_step.mean(-1) - targets.mean(-1)) ** 2, mask)
        elif anchor == "quantile":
            levels = quantile_levels(num_samples, hidden.device, hidden.dtype)
            anchor_loss, _ = quantile_huber(one_step, targets, mask, kappa=anchor_kappa, taus=levels, weight=weight)
        elif anchor == "td":
            anchor_targets = anchor_samples.detach() / self.return_scale
            anchor_loss, _ = self._flow_matching(cond, anchor_targets, mask, weight, coupling, noise_jitter, draws)
        if anchor != "none":
            total = total + anchor_weight * anchor_loss
            metrics["critic/anchor_loss"] = float(anchor_loss.detach())

        if consistency != "none":
            geo = self._consistency(consistency, eps_mid, one_step, cond, consistency_steps, draws)
            geo = masked_mean(geo, mask)
            total = total + consistency_weight * geo
            metrics["critic/consistency_loss"] = float(geo.detach())

        if risk_weight != 0.0:
            risk, risk_metrics = risk_loss(
                one_step, targets, mask, risk_alpha, risk_beta, cvar_weight, gain_weight, shape_weight,
                shift_weight, curvature_weight, risk_targets,
            )  # fmt: skip
            total = total + risk_weight * risk
            metrics.update(risk_metrics)

        with torch.no_grad():
            dist = one_step * self.return_scale
            value = dist.mean(-1)
            metrics.update(
                {
                    "critic/loss": float(total),
                    "critic/value_mean": float(masked_mean(value, mask)),
                    "critic/dist_std": float(masked_mean(sigma, mask)),
                    "critic/cvar": float(masked_mean(cvar(dist, risk_alpha), mask)),
                    "critic/explained_var": float(explained_variance(value, target_samples.mean(-1), mask)),
                    "critic/uncertainty_weight": 1.0 if weight is None else float(masked_mean(weight, mask)),
                }
            )
        return total, metrics

    def _flow_matching(
        self,
        cond: Tensor,
        targets: Tensor,
        mask: Tensor,
        weight: Tensor | None,
        coupling: str,
        jitter: bool,
        draws: tuple[torch.Generator | None, Callable[[tuple[int, ...]], Tensor] | None],
    ) -> tuple[Tensor, dict[str, float]]:
        shape, num_samples = tuple(targets.shape[:-1]), targets.shape[-1]
        generator, uniform = draws
        kw = {"device": targets.device, "dtype": targets.dtype}
        full = (*shape, num_samples)
        if coupling == "sorted":
            eps = stratified_noise(shape, num_samples, self.noise_std, jitter, generator, uniform=uniform, **kw)
            x1 = torch.sort(targets, dim=-1).values
        else:
            if uniform is None:
                eps = self.noise_std * torch.randn(full, generator=generator, **kw)
            else:  # Gaussian by the inverse CDF of the given uniform draws
                u = _rand(full, generator, uniform, **kw).clamp(1e-6, 1.0 - 1e-6)
                eps = self.noise_std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
            order = _rand(full, generator, uniform, **kw).argsort(-1)
            x1 = targets.gather(-1, order)
        tau = _rand(full, generator, uniform, **kw)
        x_tau = (1.0 - tau) * eps + tau * x1
        return flow_matching(self.velocity(x_tau, tau, cond), x1 - eps, mask, weight)

    def _consistency(
        self,
        form: str,
        eps: Tensor,
        one_step: Tensor,
        cond: Tensor,
        steps: int,
        draws: tuple[torch.Generator | None, Callable[[tuple[int, ...]], Tensor] | None],
    ) -> Tensor:
        """Per-token geometric consistency ``[...]`` (see :meth:`loss`)."""
        if form == "endpoint":
            with torch.no_grad():
                solution = self._integrate(eps, cond.detach(), steps, "euler")
            return ((one_step - solution) ** 2).mean(-1)
        v0 = one_step - eps
        tau = _rand(tuple(eps.shape), *draws, device=eps.device, dtype=eps.dtype)
        # the one-step displacement is the target, not a learner: pulling it towards the field would move the
        # one-step samples off the quantiles the anchor fits (and widen narrow distributions)
        v0 = v0.detach()
        v_tau = self.velocity(eps + tau * v0, tau, cond)
        return ((v_tau - v0) ** 2).mean(-1)

    # -- the Critic protocol -----------------------------------------------------------------------------------

    def outputs(self, hidden: Tensor) -> dict[str, Tensor]:
        return {"samples": self.sample(hidden, self.num_samples, steps=self.sample_steps)}

    def training_loss(
        self, hidden: Tensor, targets: Tensor, mask: Tensor, old: dict[str, Tensor], context: CriticContext
    ) -> tuple[Tensor, dict[str, float]]:
        return self.loss(hidden, targets, mask, uniform=context.uniform, **self.loss_options)


@register("flow")
def flow_critic(
    hidden_size: int, width: int = 64, return_scale: float = 1.0, value_range: tuple[float, float] | None = None,
    samples: int = 16, sample_steps: int = 1, risk_weight: float = 0.1, risk_targets: str = "pooled",
    flow: dict | None = None,
) -> ValueFlowCritic:  # fmt: skip
    """DFPO's value flow: ``samples`` one-step samples per token; ``flow``: more options of
    :meth:`ValueFlowCritic.loss` (checked by the caller)."""
    options = {"risk_weight": risk_weight, "risk_targets": risk_targets, **(flow or {})}
    return ValueFlowCritic(
        hidden_size, width, return_scale=return_scale, value_range=value_range, num_samples=samples,
        sample_steps=sample_steps, loss_options=options,
    )  # fmt: skip
