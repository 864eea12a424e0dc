"""The denoiser protocol: one call shape over UNets and DiT transformers.

    output = denoiser(latents[B], t[B], cond[B])

`cond` is a :class:`Conditioning`: the text embeddings plus whatever extra per-row inputs the
family needs (SDXL's pooled text embeddings and size/crop time ids, SD3's pooled projections).
Each family adapter also knows how to encode prompts with its pipeline's text encoders. Everything
above this module (sampling, stream, engines) talks to :class:`Denoiser`, never to a model class;
:func:`denoiser_for` is the one place that looks at what a pipeline holds.

The adapters call the module held in ``.module``; an engine replaces that module with a compiled
one taking the same arguments.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch


@dataclass
class Conditioning:
    """Per-row conditioning: `embeds` [B, L, D] and extra tensors, each with B rows first."""

    embeds: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(fn(self.embeds), {k: fn(v) for k, v in self.extras.items()})

    def tile(self, times: int) -> "Conditioning":
        """Rows repeated `times` over: [c0..cB-1, c0..cB-1, ...] (slot-major stream rows)."""
        return self._map(lambda v: v.repeat(times, *([1] * (v.dim() - 1))))

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        keys = parts[0].extras.keys()
        return Conditioning(torch.cat([p.embeds for p in parts]),
                            {k: torch.cat([p.extras[k] for p in parts]) for k in keys})


def check_prompts(prompts, name: str, tokenizers, allow_empty: bool) -> list[str]:
    """A prompt or list of prompts, each non-empty (unless allowed) and within the tokenizers' length."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompts!r}")
    for p in prompts:
        if not allow_empty and not p.strip():
            raise ValueError(f"{name} must not be empty")
        for tok in tokenizers:
            if tok is None:
                continue
            n_tokens = len(tok(p, truncation=False).input_ids)
            if n_tokens > tok.model_max_length:
                raise ValueError(f"{name} is {n_tokens} tokens long; the tokenizer takes at most "
                                 f"{tok.model_max_length} (start and end tokens included): {p[:60]!r}...")
    return list(prompts)


def check_size(denoiser: "Denoiser", codec, height, width) -> tuple[int, int]:
    """Image size in pixels: the model's native size by default, else a multiple of what it can take
    (the VAE's factor, times the transformer's patch size)."""
    config = denoiser.original.config
    multiple = codec.scale_factor * (config.get("patch_size", 1) or 1)
    default = config.sample_size * codec.scale_factor
    height, width = height or default, width or default
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    return height, width


class Denoiser(abc.ABC):
    """Base adapter: the pipeline, its denoiser module, and the dtype/device its rows use."""

    family = "base"

    def __init__(self, pipe, module: torch.nn.Module):
        self.pipe = pipe
        self.original = module   # the PyTorch module: its parameters say where rows must live
        self.module = module     # what runs; an engine may replace it

    @property
    def dtype(self) -> torch.dtype:
        return next(self.original.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.original.parameters()).device

    @property
    def in_channels(self) -> int:
        return self.original.config.in_channels

    @property
    def tokenizers(self):
        return [getattr(self.pipe, name, None) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]

    @abc.abstractmethod
    def encode_prompt(self, prompts: list[str], negative_prompts: list[str] | None,
                      height: int, width: int) -> tuple[Conditioning, Conditioning]:
        """(conditional, unconditional) conditioning, one row per prompt."""

    @abc.abstractmethod
    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's raw output for each row (ε, v or flow velocity, as its scheduler says)."""


class UNetDenoiser(Denoiser):
    """UNet2DConditionModel of SD 1.x / 2.x pipelines."""

    family = "unet"

    def encode_prompt(self, prompts, negative_prompts, height, width):
        cond, uncond = self.pipe.encode_prompt(
            prompts, self.device, 1, True, negative_prompts)
        return Conditioning(cond), Conditioning(uncond)

    def __call__(self, latents, t, cond):
        return self.module(latents, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]


class SDXLDenoiser(UNetDenoiser):
    """UNet2DConditionModel with SDXL's added conditions (pooled text embeddings + time ids)."""

    family = "sdxl"

    def encode_prompt(self, prompts, negative_prompts, height, width):
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative_prompts)
        n = len(prompts)
        if self.pipe.config.get("requires_aesthetics_score", False):
            ids, neg_ids = [height, width, 0, 0, 6.0], [height, width, 0, 0, 2.5]
        else:
            ids = neg_ids = [height, width, 0, 0, height, width]
        to_rows = lambda v: torch.tensor([v] * n, dtype=cond.dtype, device=cond.device)
        return (Conditioning(cond, {"text_embeds": pooled, "time_ids": to_rows(ids)}),
                Conditioning(uncond, {"text_embeds": uncond_pooled, "time_ids": to_rows(neg_ids)}))

    def __call__(self, latents, t, cond):
        return self.module(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.extras,
                           return_dict=False)[0]


class SD3Denoiser(Denoiser):
    """SD3Transformer2DModel (MMDiT) of Stable Diffusion 3 pipelines, a flow-matching model."""

    family = "sd3"

    def encode_prompt(self, prompts, negative_prompts, height, width):
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative_prompts)
        return (Conditioning(cond, {"pooled_projections": pooled}),
                Conditioning(uncond, {"pooled_projections": uncond_pooled}))

    def __call__(self, latents, t, cond):
        return self.module(hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.extras["pooled_projections"], return_dict=False)[0]


def denoiser_for(pipe) -> Denoiser:
    """The adapter for a pipeline's denoiser: SD 1.x/2.x UNet, SDXL UNet, or SD3 transformer."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        if unet.config.get("addition_embed_type") == "text_time":
            return SDXLDenoiser(pipe, unet)
        if unet.config.get("addition_embed_type") is None:
            return UNetDenoiser(pipe, unet)
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and type(transformer).__name__ == "SD3Transformer2DModel":
        return SD3Denoiser(pipe, transformer)
    raise ValueError(f"pipe: {type(pipe).__name__} has no supported denoiser; supported are "
                     "UNet2DConditionModel (SD 1.x/2.x, SDXL) and SD3Transformer2DModel (SD3)")
