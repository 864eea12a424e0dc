"""Classifier-free guidance, full and residual (StreamDiffusion's RCFG).

g = guidance_scale, δ = delta, ε_c / ε_u = conditional / unconditional noise estimates,
S = a row's stored residual noise (the noise its latent is believed to carry).

| mode       | rows per call (n steps, F frames) | guided estimate                           |
|------------|-----------------------------------|-------------------------------------------|
| none       | n·F                               | ε = ε_c                                   |
| full       | 2·n·F                             | ε = ε_u + g·(ε_c − ε_u), optionally rescaled |
| self       | n·F                               | ε = δ·S + g·(ε_c − δ·S)                   |
| initialize | (n+1)·F                           | as self; the newest frame's S is a real ε_u |

At g = 1 every mode gives ε_c. Full guidance is applied to the model's raw outputs, as diffusers
does (the same as in ε, since ε̂ is affine in the output for a given x). Residual guidance works in
ε; its x̂0 follows from x = α·x̂0 + β·ε̂, i.e. x̂0_g = x̂0_c + (β/α)·(ε_c − ε_g). A row with α = 0
(a flow model's pure-noise step, σ = 1) says nothing about x0 through ε, so residual guidance leaves
it unguided. The residual S of a frame starts as the noise injected into it and is carried from step
to step by :func:`next_residual`.
"""

from __future__ import annotations

import torch

CFG_MODES = ("none", "full", "self", "initialize")


def check_mode(cfg: str) -> str:
    if cfg not in CFG_MODES:
        raise ValueError(f"cfg must be one of {CFG_MODES}, got {cfg!r}")
    return cfg


def full_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """o = o_u + g·(o_c − o_u), on raw model outputs (ε, v or flow velocity alike); then, for
    ``rescale`` φ > 0, :func:`rescale_guidance`."""
    guided = uncond + scale * (cond - uncond)
    return rescale_guidance(guided, cond, rescale) if rescale > 0 else guided


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al.'s fix for over-exposure at high guidance (diffusers' ``guidance_rescale`` φ):
    o' = φ·o·std(o_c)/std(o) + (1 − φ)·o, the standard deviations over each row's C, H, W."""
    dims = list(range(1, guided.dim()))
    scaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * scaled + (1 - rescale) * guided


def self_guidance(eps_cond: torch.Tensor, residual: torch.Tensor, scale: float, delta: float) -> torch.Tensor:
    """ε = δ·S + g·(ε_c − δ·S): the stored residual stands in for the unconditional estimate."""
    virtual_uncond = delta * residual
    return virtual_uncond + scale * (eps_cond - virtual_uncond)


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num/den, and 0 where den = 0 (rows leaving the stream, or flow rows at σ = 1)."""
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(den))


def guided_self(x0_cond, eps_cond, residual, scale, delta, beta_over_alpha):
    """(x̂0, ε̂) under residual guidance; rows with α = 0 (beta_over_alpha = 0) stay unguided."""
    eps = self_guidance(eps_cond, residual, scale, delta)
    eps = torch.where(beta_over_alpha > 0, eps, eps_cond)
    return x0_cond + beta_over_alpha * (eps_cond - eps), eps


def next_residual(residual, eps, injected, beta, c_skip, c_out, beta_over_alpha, ratio):
    """The residual noise a row carries after its step.

    The noise part β·S of a row goes through the same x̂0 estimator as the row:
    Δx = c_out·(β·S − β·ε)/α + c_skip·β·S, and reappears in the next row's units:
    S' = n + (α'/β')·Δx, where n is the noise the step puts back (LCM's re-noising draw, or ε̂
    for the deterministic step); `ratio` is α'/β' (0 where β' = 0).
    """
    delta_x = c_out * beta_over_alpha * (residual - eps) + c_skip * beta * residual
    return injected + ratio * delta_x
