"""What can be exported: each pipeline component described as data.

A :class:`Component` names its inputs and outputs, says which axes are the batch and the image
size, builds sample inputs for a shape profile, and holds ``graph``: a module with positional
tensor inputs and tensor outputs that every exporter traces. The export and build code stay
generic; everything family-specific is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..control_nets import controlnets_of
from ..controlnet import with_controlnet
from ..denoiser import Denoiser, ModelInput, denoiser_for

COMPONENTS = ("denoiser", "vae_encoder", "vae_decoder", "text_encoder", "text_encoder_2")
CONTROLNET = "controlnet"   # a ControlNet pipeline's nets are components "controlnet/0", "controlnet/1"...


Input = ModelInput   # one named graph input; the denoiser families describe theirs


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
    returns: Callable | None = None   # (outputs, args, kwargs) -> the module's own return; None: (first,)
    state: dict = field(default_factory=dict)   # constants the graph holds besides weights (IP-Adapter scales)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def input_shape(self, spec: Input, batch: int, height: int, width: int) -> tuple[int, ...]:
        sizes = {"H": height // self.size_divisor, "W": width // self.size_divisor}

        def size(symbol):
            if symbol == "B":
                return batch
            axis = size_axis(symbol)
            if axis is None:
                return symbol
            name, times, over = axis
            return -(-sizes[name] * times // over)   # rounded up, as a UNet's strided levels are
        return tuple(size(d) for d in spec.shape)

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
        return any(size_axis(d) is not None for spec in self.inputs for d in spec.shape)


def size_axis(symbol) -> tuple[str, int, int] | None:
    """("H" or "W", times, over) of a size symbol ("H", "H/4", "W*8"), None for anything else."""
    if not isinstance(symbol, str) or symbol[:1] not in ("H", "W"):
        return None
    if len(symbol) == 1:
        return symbol, 1, 1
    if symbol[1] not in "/*" or not symbol[2:].isdigit():
        raise ValueError(f"size symbol {symbol!r}: write H, H/k or H*k (W alike)")
    k = int(symbol[2:])
    return (symbol[0], 1, k) if symbol[1] == "/" else (symbol[0], k, 1)


# -- graphs: positional in, tensors out (the denoisers' are their families', in fastdiff.denoiser) ---------
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
        # last_hidden_state is after CLIP's final LayerNorm (hidden_states[-1] is before it)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


# -- feeds: the module's own call → named graph inputs ----------------------------------------------
def _single(name):
    return lambda args, kwargs: {name: args[0] if args else next(iter(kwargs.values()))}


# -- per pipeline ------------------------------------------------------------------------------------
def _vae_factor(vae) -> int:
    config = vae.config
    blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def denoiser_component(adapter: Denoiser, module: torch.nn.Module | None = None,
                       text_length: int | None = None) -> Component:
    """The description of a denoiser `module` of `adapter`'s family (default the pipeline's own):
    any module of the family, a pruned sub-network too, can become an engine."""
    spec = adapter.graph_spec(module, text_length)
    module = module if module is not None else adapter.original
    return Component("denoiser", spec.kind, module, spec.graph, spec.inputs, spec.outputs,
                     _vae_factor(adapter.pipe.vae), spec.feeds, spec.returns, adapter.engine_state(module))


def side_component(adapter: Denoiser, name: str) -> Component:
    """The description of `adapter`'s side network `name` (a ControlNet; see Denoiser.side_networks)."""
    spec, module = adapter.side_graph_spec(name), adapter.side_networks()[name]
    return Component(name.split("/")[0], spec.kind, module, spec.graph, spec.inputs, spec.outputs,
                     _vae_factor(adapter.pipe.vae), spec.feeds, spec.returns, adapter.engine_state(module))


def component(pipe, name: str, text_length: int | None = None) -> Component:
    """The description of `pipe`'s component `name` (one of :data:`COMPONENTS`); `text_length` (from a
    family profile, e.g. SD3's CLIP + T5 tokens) sets the denoiser's text rows."""
    if name.startswith(CONTROLNET + "/") and name in available_components(pipe):
        return side_component(with_controlnet(denoiser_for(pipe), pipe), name)
    if name not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS} (a ControlNet pipeline's nets: controlnet/0, "
                         f"controlnet/1...), got {name!r}")
    if name == "denoiser":   # a ControlNet pipeline's UNet takes the nets' residuals
        return denoiser_component(with_controlnet(denoiser_for(pipe), pipe), text_length=text_length)
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
    """The names of :data:`COMPONENTS` that `pipe` holds, and its ControlNets' (controlnet/k)."""
    names = ["denoiser", "vae_encoder", "vae_decoder"]
    names += [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:
        names += [f"{CONTROLNET}/{k}" for k in range(len(controlnets_of(controlnet)))]
    return names
