"""One denoising step for a batch of rows, each row at its own timestep.

All coefficients are per-row tensors broadcastable to the latents ([R, 1, 1, 1]). A row is
x = α·x0 + β·ε; the model's output is first turned into the pair (x̂0, ε̂), and the step works
on that pair whatever the model predicts.
"""

from __future__ import annotations

import torch


def to_x0_eps(output: torch.Tensor, x: torch.Tensor, alpha, beta, prediction_type: str):
    """The pair (x̂0, ε̂) implied by a model output; always x = α·x̂0 + β·ε̂.

    epsilon: ε̂ = out, x̂0 = (x − β·ε̂)/α.
    v_prediction (v = α·ε − β·x0, with α² + β² = 1): x̂0 = α·x − β·v, ε̂ = α·v + β·x.
    flow (velocity u = ε − x0, x = (1−σ)·x0 + σ·ε): x̂0 = x − σ·u, ε̂ = x + (1−σ)·u — no division,
    so the pure-noise row σ = 1 (α = 0) is fine.
    """
    if prediction_type == "epsilon":
        return (x - beta * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * x - beta * output, alpha * output + beta * x
    if prediction_type == "flow":
        return x - beta * output, x + alpha * output
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'flow', got {prediction_type!r}")


def consistency_x0(x0: torch.Tensor, x: torch.Tensor, c_skip, c_out) -> torch.Tensor:
    """LCM's boundary-conditioned estimate: c_out·x̂0 + c_skip·x (c_skip=0, c_out=1 leaves x̂0)."""
    return c_out * x0 + c_skip * x


def advance(x0: torch.Tensor, noise: torch.Tensor, alpha_next, beta_next) -> torch.Tensor:
    """x' = α'·x̂0 + β'·n.

    With n = ε̂ this is the deterministic DDIM step (η = 0), which is also Euler's step in σ and,
    for flow models (α = 1−σ), flow-matching Euler x' = x + (σ' − σ)·u. With n = fresh or stored
    Gaussian noise it is LCM's re-noising to the next timestep.
    """
    return alpha_next * x0 + beta_next * noise


def injected_noise(eps: torch.Tensor, noise: torch.Tensor, eps_share, noise_share) -> torch.Tensor:
    """n = √(1−γ²)·ε̂ + γ·z: what a step puts back, from the model's ε̂ and fresh noise z (γ = 0:
    DDIM's ε̂; γ = 1: LCM's z)."""
    return eps_share * eps + noise_share * noise
