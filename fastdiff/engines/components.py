"""What can be exported: each pipeline component described as data.

A :class:`Component` names its inputs and outputs, says which axes are the batch and the image
size, builds sample inputs for a shape profile, and holds ``graph``: a module with positional
tensor inputs and tensor outputs that every exporter traces. The export and build code stay
generic; everything family-specific is here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..denoiser import denoiser_for

COMPONENTS = ("denoiser", "vae_encoder", "vae_decoder", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Input:
    """One graph input. ``shape`` uses "B" for the batch and "H"/"W" for the image size divided by
    the component's ``size_divisor``; ``dtype`` None means the model's floating dtype."""

    name: str
    shape: tuple
    dtype: torch.dtype | None = None


@dataclass
class Component:
    name: str                 # one of COMPONENTS
    kind: str                 # what the graph is: "unet", "sdxl-unet", "sd3", "vae-kl-encoder", ...
    module: torch.nn.Module   # the PyTorch module whose weights the graph runs
    graph: torch.nn.Module    # positional tensors in, tensors out: what exporters trace
    inputs: list[Input]
    outputs: list[str]
    size_divisor: int         # image pixels per unit of "H"/"W" (the VAE factor for latents; 1 for images)
    feeds: Callable           # (args, kwargs of the module's own call) -> {input name: tensor}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def input_shape(self, spec: Input, batch: int, height: int, width: int) -> tuple[int, ...]:
        sizes = {"B": batch, "H": height // self.size_divisor, "W": width // self.size_divisor}
        return tuple(sizes.get(d, d) for d in spec.shape)

    def sample_inputs(self, batch: int, height: int, width: int, dtype: torch.dtype | None = None,
                      device=None) -> tuple[torch.Tensor, ...]:
        """Random inputs of the given batch and image size (token ids in the vocabulary's range)."""
        generator = torch.Generator().manual_seed(0)
        tensors = []
        for spec in self.inputs:
            shape = self.input_shape(spec, batch, height, width)
            if spec.dtype == torch.int64:
                high = getattr(self.module.config, "vocab_size", 2)
                value = torch.randint(0, high, shape, generator=generator)
            elif spec.name == "timestep":
                value = torch.rand(shape, generator=generator) * 999
            else:
                value = torch.randn(shape, generator=generator)
            tensors.append(value.to(device=device, dtype=spec.dtype or dtype or self.dtype))
        return tuple(tensors)

    def uses_size(self) -> bool:
        return any("H" in spec.shape for spec in self.inputs)


# -- graphs: positional in, tensors out -------------------------------------------------------------
class UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class SDXLUNetGraph(UNetGraph):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


class SD3Graph(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=hidden_states, timestep=timestep, return_dict=False,
                                encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections)[0]


class VAEEncoderGraph(torch.nn.Module):
    """AutoencoderKL: the posterior's moments (mean and log-variance, stacked on channels), so the
    caller can take its mode or draw a sample; AutoencoderTiny: the latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.tiny = type(vae).__name__ == "AutoencoderTiny"

    def forward(self, images):
        out = self.vae.encode(images)
        return out.latents if self.tiny else out.latent_dist.parameters


class VAEDecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class TextEncoderGraph(torch.nn.Module):
    """CLIP text towers: the last and penultimate hidden states (SDXL and SD3 read the latter) and the
    pooled output (projected for CLIPTextModelWithProjection)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-1], out.hidden_states[-2], out[0] if out[0].dim() == 2 else out[1]


# -- feeds: the module's own call → named graph inputs ---------------------------------------------
def _binder(module):
    """(args, kwargs) of a call of `module` → {parameter name: value} (the signature is read once)."""
    signature = inspect.signature(module.forward)
    return lambda args, kwargs: signature.bind(*args, **kwargs).arguments


def _rows(t, batch: int) -> torch.Tensor:
    """Timesteps as float32 [B] (diffusers accepts a scalar, a 0-d or a [B] tensor)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return t.reshape(1).expand(batch) if t.dim() == 0 else t.to(torch.float32)


def _unet_feeds(unet, with_added: bool):
    bind = _binder(unet)

    def feeds(args, kwargs):
        a = bind(args, kwargs)
        sample = a["sample"]
        named = {"sample": sample, "timestep": _rows(a["timestep"], sample.shape[0]).to(sample.device),
                 "encoder_hidden_states": a["encoder_hidden_states"]}
        if with_added:
            added = a["added_cond_kwargs"]
            named.update(text_embeds=added["text_embeds"], time_ids=added["time_ids"])
        return named
    return feeds


def _sd3_feeds(transformer):
    bind = _binder(transformer)

    def feeds(args, kwargs):
        a = bind(args, kwargs)
        x = a["hidden_states"]
        return {"hidden_states": x, "timestep": _rows(a["timestep"], x.shape[0]).to(x.device),
                "encoder_hidden_states": a["encoder_hidden_states"], "pooled_projections": a["pooled_projections"]}
    return feeds


def _single(name):
    return lambda args, kwargs: {name: args[0] if args else next(iter(kwargs.values()))}


# -- per pipeline ------------------------------------------------------------------------------------
def _vae_factor(vae) -> int:
    config = vae.config
    blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def _denoiser_component(pipe) -> Component:
    adapter = denoiser_for(pipe)
    module, factor = adapter.original, _vae_factor(pipe.vae)
    config = module.config
    channels = config.in_channels
    if adapter.family == "sd3":
        text_length = 77 + 256   # the CLIP tokens + T5's max_sequence_length (zeros without T5)
        return Component(
            "denoiser", "sd3", module, SD3Graph(module),
            [Input("hidden_states", ("B", channels, "H", "W")), Input("timestep", ("B",), torch.float32),
             Input("encoder_hidden_states", ("B", text_length, config.joint_attention_dim)),
             Input("pooled_projections", ("B", config.pooled_projection_dim))],
            ["out"], factor, _sd3_feeds(module))
    text_length = pipe.tokenizer.model_max_length
    inputs = [Input("sample", ("B", channels, "H", "W")), Input("timestep", ("B",), torch.float32),
              Input("encoder_hidden_states", ("B", text_length, config.cross_attention_dim))]
    if adapter.family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs += [Input("text_embeds", ("B", pooled)), Input("time_ids", ("B", 6))]
        return Component("denoiser", "sdxl-unet", module, SDXLUNetGraph(module), inputs, ["out"], factor,
                         _unet_feeds(module, True))
    return Component("denoiser", "unet", module, UNetGraph(module), inputs, ["out"], factor,
                     _unet_feeds(module, False))


def component(pipe, name: str) -> Component:
    """The description of `pipe`'s component `name` (one of :data:`COMPONENTS`)."""
    if name not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {name!r}")
    if name == "denoiser":
        return _denoiser_component(pipe)
    if name.startswith("vae"):
        vae = getattr(pipe, "vae", None)
        if vae is None:
            raise ValueError(f"component: {type(pipe).__name__} has no vae")
        return vae_component(vae, name)
    encoder = getattr(pipe, name, None)
    if encoder is None:
        raise ValueError(f"component: {type(pipe).__name__} has no {name}")
    tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"))
    return Component(name, "clip-text", encoder, TextEncoderGraph(encoder),
                     [Input("input_ids", ("B", tokenizer.model_max_length), torch.int64)],
                     ["last_hidden_state", "penultimate_hidden_state", "pooled"], 1, _single("input_ids"))


def vae_component(vae, name: str) -> Component:
    """The encoder or decoder half (`name` "vae_encoder" / "vae_decoder") of an AutoencoderKL or
    AutoencoderTiny."""
    tiny = type(vae).__name__ == "AutoencoderTiny"
    factor, latents = _vae_factor(vae), vae.config.latent_channels
    kind = "vae-tiny" if tiny else "vae-kl"
    if name == "vae_encoder":
        out = "latents" if tiny else "moments"
        return Component(name, kind + "-encoder", vae, VAEEncoderGraph(vae), [Input("images", ("B", 3, "H", "W"))],
                         [out], 1, _single("images"))
    if name == "vae_decoder":
        return Component(name, kind + "-decoder", vae, VAEDecoderGraph(vae),
                         [Input("latents", ("B", latents, "H", "W"))], ["images"], factor, _single("latents"))
    raise ValueError(f"component must be 'vae_encoder' or 'vae_decoder', got {name!r}")


def available_components(pipe) -> list[str]:
    """The names of :data:`COMPONENTS` that `pipe` holds."""
    names = ["denoiser", "vae_encoder", "vae_decoder"]
    names += [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    return names
