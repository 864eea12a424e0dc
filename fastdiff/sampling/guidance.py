"""Classifier-free guidance, full and residual (StreamDiffusion's RCFG).

g = guidance_scale, δ = delta, ε_c / ε_u = conditional / unconditional noise estimates,
S = a row's stored residual noise (the noise its latent is believed to carry).

| mode       | rows per call (n steps, F frames) | guided estimate                           |
|------------|-----------------------------------|-------------------------------------------|
| none       | n·F                               | ε = ε_c                                   |
| full       | 2·n·F                             | ε = ε_u + g·(ε_c − ε_u)                   |
| self       | n·F                               | ε = δ·S + g·(ε_c − δ·S)                   |
| initialize | (n+1)·F                           | as self; the newest frame's S is a real ε_u |

At g = 1 every mode gives ε_c. The residual S of a frame starts as the noise injected into it and
is carried from step to step by :func:`next_residual`.
"""

from __future__ import annotations

import torch

CFG_MODES = ("none", "full", "self", "initialize")


def check_mode(cfg: str) -> str:
    if cfg not in CFG_MODES:
        raise ValueError(f"cfg must be one of {CFG_MODES}, got {cfg!r}")
    return cfg


def full_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε = ε_u + g·(ε_c − ε_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def self_guidance(eps_cond: torch.Tensor, residual: torch.Tensor, scale: float, delta: float) -> torch.Tensor:
    """ε = δ·S + g·(ε_c − δ·S): the stored residual stands in for the unconditional estimate."""
    virtual_uncond = delta * residual
    return virtual_uncond + scale * (eps_cond - virtual_uncond)


def carry_ratio(alpha_next: torch.Tensor, beta_next: torch.Tensor) -> torch.Tensor:
    """α'/β', and 0 for rows that leave the stream (β' = 0)."""
    return torch.where(beta_next > 0, alpha_next / beta_next.clamp_min(1e-12), torch.zeros_like(beta_next))


def next_residual(residual, eps, injected, alpha, beta, c_skip, c_out, ratio):
    """The residual noise a row carries after its step.

    The noise part β·S of a row goes through the same x̂0 estimator as the row:
    Δx = c_out·(β·S − β·ε)/α + c_skip·β·S, and reappears in the next row's units:
    S' = n + (α'/β')·Δx, where n is the noise the step puts back (LCM's re-noising draw, or ε̂
    for the deterministic step); `ratio` is :func:`carry_ratio`.
    """
    delta_x = c_out * (beta * residual - beta * eps) / alpha + c_skip * beta * residual
    return injected + ratio * delta_x
