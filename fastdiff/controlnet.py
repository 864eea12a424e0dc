"""ControlNet under the denoiser protocol: the UNet's call with the residuals of one or more
ControlNets added, as diffusers' ControlNet pipelines make it; :func:`with_controlnet` gives any
pipeline's denoiser its family's ControlNet adapter.

Each row carries its control images in its conditioning (``Conditioning.extras``: one image per
ControlNet under ``control_image_<k>``, [B, 3, H, W] in [0, 1], and ``control_live`` [B] bool), so
they follow the rows wherever the rows go — guidance's unconditional rows, a batch's images. A row
whose ``control_live`` is False gets no residuals: guess mode's unconditional rows, which diffusers
runs without the ControlNet. The conditioning scale of a call, and which steps the ControlNets act
on (``control_guidance_start`` / ``end``), are the adapter's: :meth:`ControlledDenoiser.set_scales`.

Engines: the UNet's graph takes the residuals as inputs after its own (zeros where no net acts),
and each ControlNet is a side network of its own graph, exported unscaled; the scale and guess
mode's block-by-block factors are applied to its outputs, as diffusers applies them.
"""

from __future__ import annotations

import torch

from .control_nets import ControlNetsAround, controlnets_of
from .denoiser import IMAGE_PROMPT, Conditioning, Denoiser, GraphSpec, ModelInput, call_binder
from .flux_controlnet import FluxControlledDenoiser
from .sd3_controlnet import SD3ControlledDenoiser

LIVE = "control_live"
IMAGES = "control_image_"


def image_key(k: int) -> str:
    return f"{IMAGES}{k}"


def residual_shapes(config) -> list[tuple[int, int]]:
    """(channels, downsampling) of each residual a ControlNet adds to a UNet of `config`: the input
    convolution's, each down block's layers' and its downsampler's, then the mid block's."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    shapes = [(channels[0], 1)]
    for level, (width, count) in enumerate(zip(channels, layers)):
        shapes += [(width, 2 ** level)] * count
        if level < len(channels) - 1:
            shapes.append((width, 2 ** (level + 1)))
    return shapes + [(channels[-1], 2 ** (len(channels) - 1))]


def residual_names(count: int) -> list[str]:
    """The graph names of `count` residuals: the down blocks', then the mid block's."""
    return [f"down_residual_{i}" for i in range(count - 1)] + ["mid_residual"]


def scaled_residuals(down, mid, scale: float, guess_mode: bool, global_pool: bool):
    """A ControlNet's raw residuals scaled as diffusers' ControlNetModel scales them: by `scale`,
    and in guess mode by factors from 0.1 (the first block) up to 1 (the mid block)."""
    if guess_mode and not global_pool:
        scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * scale
        return [r * s for r, s in zip(down, scales)], mid * scales[-1]
    return [r * scale for r in down], mid * scale


class _ControlNetGraph(torch.nn.Module):
    """A ControlNet with positional inputs (SDXL's added conditions last), its residuals unscaled."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
        extra = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, return_dict=False, **extra)
        return (*down, mid)


def with_controlnet(base: Denoiser, pipe) -> Denoiser:
    """`base` with `pipe`'s ControlNet(s) around it, where it has them."""
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return base
    if base.family == "flux":
        return FluxControlledDenoiser(base, controlnet)
    if base.family == "sd3":
        return SD3ControlledDenoiser(base, controlnet)
    return ControlledDenoiser(base, controlnet)


class ControlledDenoiser(ControlNetsAround):
    """`base` (a UNet adapter) with `controlnet` (a ControlNetModel or a MultiControlNetModel)
    adding its residuals to every live row."""

    def __init__(self, base: Denoiser, controlnet):
        if base.family not in ("unet", "sdxl"):
            raise ValueError(f"pipe: ControlNet is run for UNet pipelines (SD 1.x/2.x, SDXL), SD3 and FLUX.1, not "
                             f"{base.family}")
        super().__init__(base, controlnets_of(controlnet))
        # SDXL's Union nets (ControlNet++): each reads its pictures with their kinds of control
        self.union = type(self.nets[0]).__name__ == "ControlNetUnionModel"
        self._control_types = {}   # (kinds of control, dtype, device) → a Union net's one-hot

    @property
    def global_pool(self) -> bool:
        """Nets trained on pooled conditions (e.g. shuffle) always run in guess mode, as in diffusers."""
        return bool(self.nets[0].config.get("global_pool_conditions", False))

    streams = True


    @property
    def image_keys(self) -> list[str]:
        return [image_key(k) for k in range(len(self._scales))]   # one per condition (per net but a Union's)

    def condition_count(self, control_image, given: dict) -> int:
        """One picture per net; a Union net held alone takes a list of pictures, one per kind of
        control (as its pipeline reads a list)."""
        if self.union and len(self.nets) == 1:
            return len(control_image) if isinstance(control_image, (list, tuple)) and control_image else 1
        return len(self.nets)

    def check_modes(self, mode, conditions: int) -> list | None:
        """A Union call's kind of control for each picture (an int, or a list of one per picture);
        None for other nets, which take no ``control_mode``."""
        if not self.union:
            return None
        many = [m[0] if isinstance(m, (list, tuple)) and len(m) == 1 else m for m in
                (mode if isinstance(mode, (list, tuple)) else [mode])]
        if len(many) != conditions:
            raise ValueError(f"control_mode: {len(many)} modes for {conditions} control images (one each)")
        limit = self.nets[0].config.num_control_type
        for one in many:
            if isinstance(one, bool) or not isinstance(one, int) or not 0 <= one < limit:
                raise ValueError(f"control_mode is required by a Union ControlNet: an int in [0, {limit}) per control "
                                 f"image (the kind of control it is), got {mode!r}")
        return many

    def with_pictures(self, cond, uncond, pictures, control, *, codec, generator, guided, embedded_guidance):
        """The control images as they are; in guess mode the unconditional rows go without."""
        images = [p.to(self.device, self.nets[0].dtype) for p in pictures]
        guess = control.guess_mode or self.global_pool
        return self.with_images(cond, images, True), self.with_images(uncond, images, not guess)

    def with_images(self, cond: Conditioning, images: list[torch.Tensor] | None, live: bool) -> Conditioning:
        """`cond`'s rows carrying `images` (one [B, 3, H, W] per net; None: a stream's, which travel
        with its frames), live or not."""
        extras = {}
        if images is not None:
            if len(images) != len(self.image_keys):
                raise ValueError(f"control images: {len(images)} given for {len(self.image_keys)} ControlNets")
            extras.update(zip(self.image_keys, images))
        extras[LIVE] = torch.full((len(cond),), live, dtype=torch.bool, device=cond.embeds.device)
        return cond.with_extras(**extras)

    def run(self, module, latents, t, cond):
        if LIVE not in cond.extras or any(k not in cond.extras for k in self.image_keys):
            raise ValueError("cond: a ControlNet pipeline's rows need their control images (ControlledDenoiser.with_images)")
        return super().run(module, latents, t, cond)

    def run_nets(self, module, latents, t, cond, keep):
        images = [cond.extras[k] for k in self.image_keys]
        live = cond.extras[LIVE]
        plain = cond.without((LIVE, *self.image_keys))
        # only guess mode leaves rows without the nets (its unconditional ones): else every row is
        # live, and no row is picked out (a gather of every input, and on a GPU a sync, per call)
        rows = live.nonzero().squeeze(1) if self.guess_mode else None
        # a Union net alone reading several pictures weighs them inside, and adds its residuals even
        # where every weight is 0 (as diffusers runs it)
        weighs = self.union and len(self.nets) == 1 and len(images) > 1
        if (not any(keep) and not weighs) or (rows is not None and not len(rows)):   # the UNet alone
            return self.base.run(module, latents, t, plain)
        pick = (lambda v: v) if rows is None else (lambda v: v[rows])
        added = {k: pick(v) for k, v in plain.extras.items() if not k.startswith(IMAGE_PROMPT)} or None
        # the PyTorch nets beside the PyTorch UNet (a cost count), their engines beside its engine
        nets = self.nets if module is self.original else \
            [self.side_runners.get(name, net) for name, net in zip(self.net_names, self.nets)]
        down, mid = None, None
        modes = self._modes or [None] * len(images)
        calls = [(net, [image], [mode], float(scale))
                 for net, image, mode, scale, acts in zip(nets, images, modes, self._scales, keep) if acts]
        if weighs:   # one call reads every picture, each weighed by its scale at this step
            calls = [(nets[0], images, modes, [s * k for s, k in zip(self._scales, keep)])]
        for net, pictures, kinds, scale in calls:
            inputs = dict(controlnet_cond=pick(pictures[0])) if not self.union else dict(
                controlnet_cond=[pick(p) for p in pictures], control_type_idx=kinds, from_multi=len(self.nets) > 1,
                control_type=self._control_type(kinds, len(pick(t)), plain.embeds))
            d, m = net(pick(latents), pick(t), encoder_hidden_states=pick(plain.embeds), conditioning_scale=scale,
                       guess_mode=self.guess_mode or self.global_pool, added_cond_kwargs=added, return_dict=False,
                       **inputs)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if rows is not None and len(rows) < len(live):   # the rows without control get zeros
            down = [_scatter(r, rows, len(live)) for r in down]
            mid = _scatter(mid, rows, len(live))
        return self.base.run(module, latents, t, plain, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)

    def _control_type(self, modes: list, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A Union net's kinds of control as its pipeline gives them: one-hot over its kinds, per row
        (made once per kinds, dtype and device: a stream asks it every call)."""
        key = (tuple(modes), like.dtype, like.device)
        if key not in self._control_types:
            kinds = torch.zeros(self.nets[0].config.num_control_type, dtype=like.dtype, device=like.device)
            self._control_types[key] = kinds.index_fill_(0, torch.tensor(modes, device=like.device), 1.0)
        return self._control_types[key].expand(rows, -1)

    def graph_spec(self, module=None, text_length=None):
        """The UNet's graph with the residuals as inputs after its own; a call without them (no net
        acting) feeds zeros."""
        module = module if module is not None else self.original
        spec = self.base.graph_spec(module, text_length)
        shapes = residual_shapes(module.config)
        names = residual_names(len(shapes))
        inputs = [ModelInput(name, ("B", width, f"H/{f}", f"W/{f}")) for name, (width, f) in zip(names, shapes)]
        bind, first = call_binder(module), spec.inputs[0].name

        def feeds(args, kwargs):
            named = spec.feeds(args, kwargs)
            a = bind(args, kwargs)
            down, mid = a.get("down_block_additional_residuals"), a.get("mid_block_additional_residual")
            batch, _, height, width = named[first].shape
            given_all = [*(down or [None] * (len(names) - 1)), mid]
            for name, (channels, f), given in zip(names, shapes, given_all):
                shape = (batch, channels, -(-height // f), -(-width // f))
                # a global-pool net's residuals are [B, C, 1, 1]: the graph takes them spread out
                named[name] = named[first].new_zeros(shape) if given is None else given.expand(shape)
            return named
        return GraphSpec(spec.kind + "+controlnet", spec.graph, spec.inputs + inputs, feeds)

    def net_graph_spec(self, net):
        if self.union:
            raise ValueError("backend: SDXL's Union ControlNets run on the PyTorch modules; their engines (several "
                             "pictures and their kinds of control a call) are not built yet")
        unet_like = self.base.graph_spec(net)   # a ControlNet takes the UNet's inputs, and its control image
        factor = self.pipe.vae_scale_factor   # control images are in pixels, the UNet's inputs in latents
        image = ModelInput("controlnet_cond", ("B", 3, f"H*{factor}", f"W*{factor}"))
        inputs = unet_like.inputs[:3] + [image] + unet_like.inputs[3:]
        bind, global_pool = call_binder(net), bool(net.config.get("global_pool_conditions", False))

        def feeds(args, kwargs):
            return {**unet_like.feeds(args, kwargs), "controlnet_cond": bind(args, kwargs)["controlnet_cond"]}

        def returns(outputs, args, kwargs):
            a = bind(args, kwargs)
            return scaled_residuals(outputs[:-1], outputs[-1], a.get("conditioning_scale", 1.0),
                                    a.get("guess_mode", False), global_pool)
        count = len(residual_shapes(net.config))
        return GraphSpec(unet_like.kind.replace("unet", "controlnet"), _ControlNetGraph(net), inputs, feeds,
                         residual_names(count), returns)


def _scatter(part: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    full = part.new_zeros((total,) + tuple(part.shape[1:]))
    full[rows] = part
    return full
