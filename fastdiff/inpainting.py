"""Inpainting denoisers under the denoiser protocol: a UNet trained for inpainting (SD's 9-channel
one; SD3's 33-channel transformer alike) reads, beside the noisy latents, the mask and the masked
picture's latents, as diffusers' inpainting pipelines give them at every step. FLUX.1-Fill's
transformer reads them the other way round, the mask as its f×f cells of pixels (f the VAE's scale
factor) on f² channels rather than shrunk to the latents' size (:func:`mask_cells`).

Each row carries them in its conditioning (``Conditioning.extras``: ``inpaint_mask`` [B, 1 or f², h,
w], ``inpaint_masked`` [B, C, h, w]), so they follow the rows wherever the rows go, guidance's
unconditional rows and a batch's images alike. An inpainting pipeline whose UNet is a plain one
(4 channels) needs no adapter: it blends the known region back after each step (``accelerate``).
"""

from __future__ import annotations

import torch

from .channel_inputs import ChannelInputsDenoiser
from .denoiser import Conditioning, Denoiser

MASK = "inpaint_mask"
MASKED = "inpaint_masked"


def mask_layout(pipe) -> str | None:
    """How `pipe`'s denoiser reads the mask and masked latents beside the latents: "shrunk" (SD's 9
    channels for 4, SD3's 33 for 16: the mask at the latents' size, then the masked latents), "cells"
    (FLUX.1-Fill's: the masked latents, then the mask's f×f cells, on 2×2 patches), or None."""
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    vae = getattr(pipe, "vae", None)
    if module is None or vae is None:
        return None
    channels, latent = module.config.in_channels, vae.config.latent_channels
    if channels == 2 * latent + 1:
        return "shrunk"
    if type(module).__name__ == "FluxTransformer2DModel" and channels == 4 * (2 * latent + pipe.vae_scale_factor ** 2):
        return "cells"
    return None


def reads_mask(pipe) -> bool:
    """Whether `pipe`'s denoiser reads the mask and masked latents beside the latents."""
    return mask_layout(pipe) is not None


def mask_cells(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A [B, 1, H, W] mask as FLUX.1-Fill reads it: each latent pixel's `factor`×`factor` cell of
    mask pixels on factor² channels, [B, factor², H/factor, W/factor]."""
    b, _, height, width = mask.shape
    cells = mask[:, 0].reshape(b, height // factor, factor, width // factor, factor)
    return cells.permute(0, 2, 4, 1, 3).reshape(b, factor * factor, height // factor, width // factor)


def with_inpainting(base: Denoiser, pipe) -> Denoiser:
    """`base` taking the mask and masked latents of its rows, where `pipe`'s UNet reads them."""
    return InpaintingDenoiser(base) if reads_mask(pipe) else base


def with_mask(cond: Conditioning, mask: torch.Tensor, masked: torch.Tensor) -> Conditioning:
    """`cond`'s rows carrying the mask and the masked picture's latents (one row each)."""
    return cond.with_extras(**{MASK: mask, MASKED: masked})


class InpaintingDenoiser(ChannelInputsDenoiser):
    """An inpainting denoiser: each row's latents, then its mask and masked latents (FLUX.1-Fill:
    its masked latents, then its mask cells), on the channels."""

    def __init__(self, base: Denoiser):
        self.layout = mask_layout(base.pipe)
        super().__init__(base, (MASKED, MASK) if self.layout == "cells" else (MASK, MASKED),
                         "their mask and masked latents (with_mask)", "an inpainting denoiser")
