"""Denoisers that read more of each row than its noisy latents on their input channels: an
inpainting model's mask and masked picture (:mod:`fastdiff.inpainting`), and FLUX.1 Canny / Depth's
control picture's latents (diffusers' ``FluxControlPipeline``, no side network: :func:`with_control_latents`).

Each row carries them in its conditioning's extras, so they follow the rows wherever the rows go
(guidance's unconditional rows, a batch's images); the adapter joins them to the latents before the
wrapped one runs. A Flux transformer then packs the joined grid into tokens channel by channel,
which is diffusers' concatenation of the packed parts.
"""

from __future__ import annotations

import torch

from .denoiser import Conditioning, Denoiser, DenoiserAround

CONTROL_LATENTS = "control_latents"


class ChannelInputsDenoiser(DenoiserAround):
    """`base` reading its rows' `keys` extras after the latents, in that order, on its channels.
    `reads` says what they are and `kind` what the denoiser is, for errors."""

    def __init__(self, base: Denoiser, keys: tuple, reads: str, kind: str):
        super().__init__(base)
        self.keys, self.reads, self.kind = tuple(keys), reads, kind

    @property
    def in_channels(self) -> int:   # the latents' own: the rest of the model's input is the rows'
        return self.pipe.vae.config.latent_channels

    def run(self, module, latents, t, cond, **residuals):
        if any(key not in cond.extras for key in self.keys):
            raise ValueError(f"cond: {self.kind}'s rows need {self.reads}; it runs in its pipeline's call")
        joined = torch.cat([latents, *(cond.extras[key].to(latents.dtype) for key in self.keys)], 1)
        return self.base.run(module, joined, t, cond.without(self.keys), **residuals)


def reads_control_latents(pipe) -> bool:
    """Whether `pipe`'s transformer reads a control picture's latents beside the latents (FLUX.1
    Canny / Depth: twice the latent channels per 2×2 patch)."""
    transformer, vae = getattr(pipe, "transformer", None), getattr(pipe, "vae", None)
    return (type(transformer).__name__ == "FluxTransformer2DModel" and vae is not None
            and transformer.config.in_channels == 4 * 2 * vae.config.latent_channels)


def with_control_latents(base: Denoiser, pipe) -> Denoiser:
    """`base` taking its rows' control latents, where `pipe`'s transformer reads them."""
    if not reads_control_latents(pipe):
        return base
    return ChannelInputsDenoiser(base, (CONTROL_LATENTS,), "their control picture's latents",
                                 "a control-latents denoiser")


def with_control(cond: Conditioning, latents: torch.Tensor) -> Conditioning:
    """`cond`'s rows carrying their control picture's latents (one row each)."""
    return cond.with_extras(**{CONTROL_LATENTS: latents})
