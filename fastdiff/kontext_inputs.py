"""A FLUX.1 Kontext call's size and context picture, made as diffusers' ``FluxKontextPipeline``
makes them: the image drawn at ``max_area`` pixels of the asked (or native) aspect ratio, and the
context picture resized to the training resolution nearest its aspect ratio (unless
``_auto_resize=False``), encoded (the posterior's mode; latents given as they are) and carried by
each row (``Conditioning.extras["context_latents"]``), whose tokens the transformer reads after the
image's (:class:`fastdiff.denoiser.FluxDenoiser`)."""

from __future__ import annotations

import torch

from .checks import check_int
from .denoiser import CONTEXT, Conditioning
from .images import check_finite, preprocessed

KONTEXT_ARGS = ("max_area", "_auto_resize")


def kontext_size(pipe, height, width, max_area) -> tuple[int, int]:
    """The pipeline's size for a call: `max_area` pixels at the asked aspect ratio, in whole tokens."""
    native = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = height or native, width or native
    check_int(max_area, "max_area", 1)
    ratio, multiple = width / height, pipe.vae_scale_factor * 2
    width, height = round((max_area * ratio) ** 0.5), round((max_area / ratio) ** 0.5)
    height, width = height // multiple * multiple, width // multiple * multiple
    if not height or not width:
        raise ValueError(f"max_area={max_area} leaves no whole token at this aspect ratio")
    return height, width


def context_pixels(pipe, image, auto_resize: bool) -> torch.Tensor:
    """The context picture as the pipeline preprocesses it, [n, 3, h, w] in [-1, 1]."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    first = image[0] if isinstance(image, list) else image
    try:
        height, width = pipe.image_processor.get_default_height_width(first)
    except (ValueError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(f"image must be an image (PIL, array or tensor) or a list of them: {error}") from None
    if auto_resize:   # Kontext was trained at a few sizes: the one nearest the picture's aspect ratio
        _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    multiple = pipe.vae_scale_factor * 2
    height, width = height // multiple * multiple, width // multiple * multiple
    pixels = preprocessed(pipe.image_processor, pipe.image_processor.resize(image, height, width), "image",
                          height, width)
    check_finite(pixels, "image")
    return pixels


def context_latents(pipe, codec, image, auto_resize: bool) -> torch.Tensor:
    """The context picture's latents: a tensor of the VAE's latent channels as it is (the pipeline
    takes such a one as latents), else the picture preprocessed and encoded (the posterior's mode)."""
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == pipe.vae.config.latent_channels:
        check_finite(image, "image")
        return image
    return codec.encode(context_pixels(pipe, image, auto_resize))


def with_context(latents: torch.Tensor, cond: Conditioning, uncond: Conditioning):
    """(cond, uncond), each row carrying the context picture's latents: one picture for all rows,
    or one per image of the call."""
    rows = len(cond)
    if rows % latents.shape[0]:
        raise ValueError(f"image: {latents.shape[0]} context pictures for {rows} images; give one, or a number "
                         "that divides them")
    latents = latents.to(cond.embeds.device, cond.embeds.dtype).repeat(rows // latents.shape[0], 1, 1, 1)
    return cond.with_extras(**{CONTEXT: latents}), uncond.with_extras(**{CONTEXT: latents})
