"""FLUX.1's layout: its latents as tokens, their ids, its shifted schedule, its graph for exporters.

Flux reads its latents as tokens, one per 2×2 patch ([B, C, H, W] → [B, H/2·W/2, 4C], "packed"),
each token's place given by ids (rotary embeddings). The protocol's rows stay unpacked: the step
math, a stream's buffers, the VAE and the noise see Flux's latents as they see any other family's,
and the adapter packs the rows on the way in and unpacks the model's velocity on the way out. Only
the front doors meet the packed layout, where diffusers' Flux pipelines show latents to a user
(given latents, a step-end callback, ``output_type="latent"``): the adapter's ``pack`` and
``unpack`` (:class:`fastdiff.denoiser.FluxDenoiser`, which uses what is here).

Guidance-distilled models (FLUX.1-dev) take the guidance scale as an input: each row carries it
(``extras["guidance"]``, the front doors set it through the ``guidance`` encoding option). True
classifier-free guidance over a negative prompt (the pipeline's ``true_cfg_scale``) is fastdiff's
ordinary guidance over the negative prompt's rows. Flux's schedule shifts its sigmas by the
image's token count (``mu``): :func:`schedule_arguments`.
"""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2·W/2, 4C], each 2×2 patch one token (channels first within it)."""
    b, c, h, w = latents.shape
    return patches_to_tokens(latents.reshape(b, c, h // 2, 2, w // 2, 2))


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`pack`'s inverse, for latents `height` × `width`."""
    return tokens_to_patches(tokens, height // 2, width // 2).flatten(4).flatten(2, 3)


def patches_to_tokens(patches: torch.Tensor) -> torch.Tensor:
    """[B, C, H/2, 2, W/2, 2] → [B, H/2·W/2, 4C]."""
    return patches.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)


def tokens_to_patches(tokens: torch.Tensor, rows, cols) -> torch.Tensor:
    """[B, rows·cols, 4C] → [B, C, rows, 2, cols, 2]."""
    return tokens.unflatten(1, (rows, cols)).unflatten(3, (-1, 2, 2)).permute(0, 3, 1, 4, 2, 5)


def image_ids(rows, cols, device, dtype, first: int = 0) -> torch.Tensor:
    """Each token's (first, row, column) for `rows` × `cols` tokens, as the transformer reads them
    (`first` 1 for a Kontext context picture's)."""
    r = torch.arange(rows, device=device, dtype=torch.float32)[:, None].expand(rows, cols)
    c = torch.arange(cols, device=device, dtype=torch.float32)[None, :].expand(rows, cols)
    return torch.stack([torch.full_like(r, first), r, c], dim=-1).flatten(0, 1).to(dtype)


def schedule_arguments(scheduler, num_inference_steps: int, sigmas, latent_height: int, latent_width: int):
    """(sigmas, mu) a Flux pipeline sets its scheduler with: the sigmas given, else evenly from 1 to
    1/n; `mu` the shift its token count asks (linear from ``base_shift`` at ``base_image_seq_len``
    tokens to ``max_shift`` at ``max_image_seq_len``; the scheduler uses it where it shifts
    dynamically)."""
    if sigmas is None and not scheduler.config.get("use_flow_sigmas", False):
        n = num_inference_steps
        sigmas = [1.0 - i * (1.0 - 1.0 / n) / (n - 1) for i in range(n)] if n > 1 else [1.0]
    config = scheduler.config
    base, most = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    tokens = (latent_height // 2) * (latent_width // 2)
    slope = (high - low) / (most - base)
    return sigmas, tokens * slope + low - slope * base


class FluxGraph(torch.nn.Module):
    """What exporters trace of a Flux transformer: the transformer on a grid of patches [B, C, H/2, 2, W/2, 2], the tokens and their ids made
    inside, its velocity given back as patches alike: the input's sizes are the grid's, so an
    exported graph's size follows the image's with no floor division to prove. `controls`: how many
    of a ControlNet's double- and single-block samples it takes after its own inputs, each a grid
    [B, H/2, W/2, D] (`repeat`: XLabs' few samples repeated over the blocks)."""

    def __init__(self, transformer, guided: bool, controls: tuple[int, int] = (0, 0), repeat: bool = False):
        super().__init__()
        self.transformer = transformer
        self.guided = guided
        self.controls, self.repeat = controls, repeat

    def forward(self, patches, timestep, encoder_hidden_states, pooled_projections, *rest):
        rows, cols = patches.shape[2], patches.shape[4]
        guidance, grids = (rest[0], rest[1:]) if self.guided else (None, rest)
        control = {}
        if any(self.controls):
            samples = [grid.flatten(1, 2) for grid in grids]
            doubles = self.controls[0]
            control = dict(controlnet_block_samples=samples[:doubles] or None,
                           controlnet_single_block_samples=samples[doubles:] or None,
                           controlnet_blocks_repeat=self.repeat)
        out = self.transformer(
            hidden_states=patches_to_tokens(patches), timestep=timestep, guidance=guidance,
            pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
            txt_ids=patches.new_zeros(encoder_hidden_states.shape[1], 3),
            img_ids=image_ids(rows, cols, patches.device, patches.dtype), return_dict=False, **control)[0]
        return tokens_to_patches(out, rows, cols)


class FluxControlNetGraph(torch.nn.Module):
    """What exporters trace of a Flux ControlNet: the net on the latents' grid of patches and its
    control condition (the picture's latents as patches alike, or its pixels), its samples given
    back unscaled as grids [B, H/2, W/2, D], double blocks' first."""

    def __init__(self, net, guided: bool, union: bool, reads_latents: bool):
        super().__init__()
        self.net, self.guided, self.union, self.reads_latents = net, guided, union, reads_latents

    def forward(self, patches, condition, timestep, encoder_hidden_states, pooled_projections, *rest):
        rows, cols = patches.shape[2], patches.shape[4]
        guidance = rest[0] if self.guided else None
        mode = rest[-1] if self.union else None
        blocks, singles = self.net(
            hidden_states=patches_to_tokens(patches),
            controlnet_cond=patches_to_tokens(condition) if self.reads_latents else condition, controlnet_mode=mode,
            timestep=timestep, guidance=guidance, pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states, txt_ids=patches.new_zeros(encoder_hidden_states.shape[1], 3),
            img_ids=image_ids(rows, cols, patches.device, patches.dtype), return_dict=False)
        return tuple(sample.unflatten(1, (rows, cols)) for sample in [*(blocks or ()), *(singles or ())])
