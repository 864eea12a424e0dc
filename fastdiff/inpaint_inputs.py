"""An inpainting call's mask and masked picture, checked and made as diffusers' inpainting pipelines
make them: the mask binarised at the image's size and shrunk to the latents' (nearest), the masked
picture (the image where the mask is below 0.5) encoded — or given as latents — and both repeated
for the batch; with ``padding_mask_crop``, the region around the mask cut out first and the
pictures made pasted back into the given one. A UNet trained for inpainting reads them with every row (:mod:`fastdiff.inpainting`);
a plain UNet has the known region blended back after each step (:meth:`MaskInputs.blend_after_steps`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checks import check_int
from .images import check_finite, preprocessed
from .inpainting import mask_cells, mask_layout, with_mask


@dataclass
class MaskInputs:
    mask: torch.Tensor                 # [n, 1, H, W] in {0, 1}: 1 where the picture is made anew
    masked: torch.Tensor               # the masked pictures [n, 3, H, W], or their latents as given
    masked_are_latents: bool
    layout: str | None                 # how the denoiser reads the mask (inpainting.mask_layout); None: blended back
    mask_rows: torch.Tensor | None = None   # the mask as the denoiser reads it, one row per image of the call
    overlay: Callable | None = None    # a picture made → pasted into the given one (padding_mask_crop)

    @property
    def reads_mask(self) -> bool:
        """The denoiser reads the mask (else the known region is blended back after each step)."""
        return self.layout is not None

    @property
    def encodes_image(self) -> bool:
        """The pipeline encodes the image whatever the strength (FLUX.1-Fill's draws its latents first)."""
        return self.layout == "cells"

    @staticmethod
    def encode(codec, pixels: torch.Tensor, batch: int, generator) -> torch.Tensor:
        """Latents of `pixels` (a draw of the posterior) repeated for a batch of `batch`, as the
        inpainting pipelines encode: one generator per picture given, when a list is."""
        if isinstance(generator, (list, tuple)):
            latents = torch.cat([codec.encode(pixels[i:i + 1], sample=True, generator=generator[i])
                                 for i in range(pixels.shape[0])])
        else:
            latents = codec.encode(pixels, sample=True, generator=generator)
        return latents.repeat(batch // latents.shape[0], 1, 1, 1)

    def rows(self, codec, cond, uncond, batch: int, latent_shape: tuple, generator):
        """(cond, uncond), carrying the mask and masked latents where the UNet reads them. The masked
        picture is encoded whether or not (the pipelines draw from the generator for it either way)."""
        device, dtype = cond.embeds.device, cond.embeds.dtype
        if self.layout == "cells":
            mask = mask_cells(self.mask, codec.scale_factor).to(device, dtype)
        else:
            mask = torch.nn.functional.interpolate(self.mask, size=tuple(latent_shape[-2:])).to(device, dtype)
        if self.masked_are_latents:
            masked = self.masked.to(device, dtype)
            config = codec.vae.config
            if config.get("shift_factor") is not None:   # SD3's pipeline shifts and scales given latents too
                masked = (masked - config.shift_factor) * config.scaling_factor
            masked = masked.repeat(batch // masked.shape[0], 1, 1, 1)
        else:
            masked = self.encode(codec, self.masked.to(device), batch, generator)
        self.mask_rows = mask.repeat(batch // mask.shape[0], 1, 1, 1)
        if not self.reads_mask:
            return cond, uncond
        return with_mask(cond, self.mask_rows, masked), with_mask(uncond, self.mask_rows, masked)

    def blend_after_steps(self, scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps, callback=None,
                          denoiser=None):
        """A step-end callback keeping the known region: after step i the latents outside the mask are
        the image's, noised to the next timestep (clean after the last), then `callback`'s. The
        callback's latents are as the pipeline shows them, packed by `denoiser` (Flux's tokens)."""
        mask, timesteps = self.mask_rows, [float(t) for t in timesteps]
        kind = scheduler.timesteps.dtype   # DDIM's index its table; Euler's are looked up by value
        flow = hasattr(scheduler, "scale_noise")   # flow matching (SD3) noises by interpolation

        def blend(pipe, i, t, tensors):
            known = clean
            if i < len(timesteps) - 1:
                at = torch.tensor([timesteps[i + 1]], dtype=kind)
                known = scheduler.scale_noise(clean, at, noise) if flow else scheduler.add_noise(clean, noise, at)
            latents = tensors["latents"] if denoiser is None else denoiser.unpack(tensors["latents"], clean.shape[1:])
            blended = (1 - mask) * known + mask * latents
            out = {"latents": blended if denoiser is None else denoiser.pack(blended)}
            if callback is None:
                return out
            given = callback(pipe, i, t, out)
            return {**out, **given} if isinstance(given, dict) else given
        return blend


def mask_crop(pipe, padding_mask_crop, image, mask_image, height: int, width: int, output_type) -> dict:
    """``padding_mask_crop`` as the image processors take it: the region around the mask, widened by
    that many pixels, cut out and resized to `height` × `width` ({} without one); the pipeline's
    conditions (PIL pictures in, PIL pictures out) checked."""
    if padding_mask_crop is None or mask_image is None:
        return {}
    from PIL import Image

    check_int(padding_mask_crop, "padding_mask_crop", 0)
    for name, value in (("image", image), ("mask_image", mask_image)):
        if not isinstance(value, Image.Image):
            raise ValueError(f"padding_mask_crop: {name} must be a PIL image to crop around the mask, got "
                             f"{type(value).__name__}")
    if output_type != "pil":
        raise ValueError(f"padding_mask_crop: output_type must be 'pil' (the pictures are pasted into the given "
                         f"one), got {output_type!r}")
    return {"resize_mode": "fill",
            "crops_coords": pipe.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)}


def mask_inputs(pipe, mask_image, masked_image_latents, pixels: torch.Tensor, height: int, width: int,
                crop: dict, image) -> MaskInputs:
    """The call's mask (required) and masked picture at `height` × `width` (cut as `crop` says,
    from :func:`mask_crop`), checked; `image` the picture the call was given."""
    name = type(pipe).__name__
    if mask_image is None:
        raise ValueError(f"mask_image is required by {name}")
    mask = preprocessed(pipe.mask_processor, mask_image, "mask_image", height, width, **crop)
    overlay = None
    if crop:   # the pictures made go back into the given one, where its crop was cut
        coords = crop["crops_coords"]
        overlay = lambda made: pipe.image_processor.apply_overlay(mask_image, image, made, coords)  # noqa: E731
    layout = mask_layout(pipe)
    if masked_image_latents is None:
        return MaskInputs(mask, pixels * (mask < 0.5), False, layout, overlay=overlay)
    if layout == "cells":
        raise ValueError(f"masked_image_latents: fastdiff takes {name}'s mask and picture (mask_image, image), not "
                         "its packed masked latents")
    factor, channels = pipe.vae_scale_factor, pipe.vae.config.latent_channels
    want = (channels, height // factor, width // factor)
    if not isinstance(masked_image_latents, torch.Tensor) or masked_image_latents.dim() != 4 \
            or tuple(masked_image_latents.shape[1:]) != want:
        raise ValueError(f"masked_image_latents must be a tensor of shape [n, {want[0]}, {want[1]}, {want[2]}], got "
                         f"{tuple(getattr(masked_image_latents, 'shape', ())) or type(masked_image_latents).__name__}")
    check_finite(masked_image_latents, "masked_image_latents")
    return MaskInputs(mask, masked_image_latents, True, layout, overlay=overlay)
