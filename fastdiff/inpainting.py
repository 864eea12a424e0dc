"""Inpainting denoisers under the denoiser protocol: a UNet trained for inpainting (SD's 9-channel
one; SD3's 33-channel transformer alike) reads, beside the noisy latents, the mask and the masked picture's latents, as diffusers' inpainting
pipelines give them at every step.

Each row carries them in its conditioning (``Conditioning.extras``: ``inpaint_mask`` [B, 1, h, w],
``inpaint_masked`` [B, C, h, w]), so they follow the rows wherever the rows go, guidance's
unconditional rows and a batch's images alike. An inpainting pipeline whose UNet is a plain one
(4 channels) needs no adapter: it blends the known region back after each step (``accelerate``).
"""

from __future__ import annotations

import torch

from .denoiser import Conditioning, Denoiser, DenoiserAround

MASK = "inpaint_mask"
MASKED = "inpaint_masked"


def reads_mask(pipe) -> bool:
    """Whether `pipe`'s denoiser reads the mask and masked latents beside the latents (SD's 9
    channels for 4, SD3's 33 for 16)."""
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    vae = getattr(pipe, "vae", None)
    if module is None or vae is None:
        return False
    return module.config.in_channels == 2 * vae.config.latent_channels + 1


def with_inpainting(base: Denoiser, pipe) -> Denoiser:
    """`base` taking the mask and masked latents of its rows, where `pipe`'s UNet reads them."""
    return InpaintingDenoiser(base) if reads_mask(pipe) else base


def with_mask(cond: Conditioning, mask: torch.Tensor, masked: torch.Tensor) -> Conditioning:
    """`cond`'s rows carrying the mask and the masked picture's latents (one row each)."""
    return Conditioning(cond.embeds, {**cond.extras, MASK: mask, MASKED: masked}, cond.route)


class InpaintingDenoiser(DenoiserAround):
    """An inpainting denoiser: each row's latents, then its mask and masked latents, on the channels."""

    @property
    def in_channels(self) -> int:   # the latents' own: the rest of the UNet's input is the rows'
        return self.pipe.vae.config.latent_channels

    def run(self, module, latents, t, cond, **residuals):
        if MASK not in cond.extras or MASKED not in cond.extras:
            raise ValueError("cond: an inpainting UNet's rows need their mask and masked latents (with_mask); "
                             "it runs in an inpainting pipeline's call")
        plain = Conditioning(cond.embeds, {k: v for k, v in cond.extras.items() if k not in (MASK, MASKED)},
                             cond.route)
        joined = torch.cat([latents, cond.extras[MASK].to(latents.dtype), cond.extras[MASKED].to(latents.dtype)], 1)
        return self.base.run(module, joined, t, plain, **residuals)
