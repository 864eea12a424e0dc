"""FLUX.1 ControlNets under the denoiser protocol (diffusers' ``FluxControlNetPipeline``): the
transformer's call with the block samples of one or more FluxControlNetModels added.

Each row carries, per control condition k, its condition under ``flux_control_<k>`` — the control
picture's latents (InstantX / Shakker-Labs nets, which read them as tokens) or its pixels in
[-1, 1] (XLabs' nets, whose own input block reads them) — a Union net's mode under
``flux_control_mode_<k>``, and the prompt the nets read. The pipeline runs the nets once, on the
positive prompt, and hands their samples to its negative prompt's pass too (true CFG): the
negative rows carry the positive prompt for the nets. A Union net held alone in a
FluxMultiControlNetModel takes several conditions, one run of it per condition.
"""

from __future__ import annotations

import torch

from . import flux
from .control_nets import ControlNetsAround, controlnets_of
from .denoiser import Denoiser, GraphSpec, ModelInput, call_binder
from .text_inputs import call_defaults

CONDITION = "flux_control_"
MODE = "flux_control_mode_"
NET_PROMPT = "controlnet_prompt_embeds"          # the prompt the nets read (the positive one, every row)
NET_POOLED = "controlnet_pooled_projections"
NET_GUIDANCE = "controlnet_guidance"             # a guidance-distilled net's guidance input
TWIN = "controlnet_twin"                         # under true CFG: a row and its negative twin share an id


class FluxControlledDenoiser(ControlNetsAround):
    """`base` (a Flux transformer's adapter) with `controlnet` (a FluxControlNetModel or a
    FluxMultiControlNetModel) adding its block samples to every row."""

    pictures_at_native_size = True

    def __init__(self, base: Denoiser, controlnet):
        super().__init__(base, controlnets_of(controlnet))
        self.multi = hasattr(controlnet, "nets")
        # XLabs' nets read pixels through an input block of their own and give fewer block samples,
        # which the transformer repeats over its blocks
        self.reads_latents = self.nets[0].input_hint_block is None
        self.union = bool(self.nets[0].union)
        self.embeds_net_guidance = bool(self.nets[0].config.guidance_embeds)

    def condition_count(self, control_image, given: dict) -> int:
        """One condition per net; a Union net held alone in a multi wrapper takes a list of pictures,
        one condition (mode) each, and its step ranges as lists of one per picture (the pipeline
        reads a single value as the first picture's alone, and drops the others)."""
        if not (self.multi and len(self.nets) == 1):
            return len(self.nets)
        if not isinstance(control_image, (list, tuple)) or not control_image:
            raise ValueError("control_image: a FluxMultiControlNetModel takes a list of control images (one per "
                             "condition)")
        if len(control_image) > 1:
            for name in ("control_guidance_start", "control_guidance_end"):
                if not isinstance(given.get(name), (list, tuple)):
                    raise ValueError(f"{name}: one Union ControlNet with {len(control_image)} control images takes "
                                     "a list of one value per image (diffusers' pipeline would run the first image "
                                     "alone)")
        return len(control_image)

    def net_of(self, k: int):
        return self.nets[k if len(self.nets) > 1 else 0]

    def check_modes(self, mode, conditions: int) -> list:
        """Each condition's control mode (a Union net's kind of control: canny, depth...), checked:
        one int for a single net, a list of one per condition (or one for all) for a multi wrapper."""
        many = mode if isinstance(mode, (list, tuple)) else [mode] * conditions
        if not self.multi and isinstance(mode, (list, tuple)):
            raise ValueError(f"control_mode: a FluxControlNetModel takes one int (or None), got {mode!r}")
        if len(many) != conditions:
            raise ValueError(f"control_mode: {len(many)} modes for {conditions} control images")
        for k, one in enumerate(many):
            if one is None and self.union:
                raise ValueError("control_mode is required by a Union ControlNet (the kind of control each image "
                                 "is: an int below the net's num_mode)")
            if one is None:
                continue
            if not self.union:
                raise ValueError(f"control_mode: {type(self.net_of(k)).__name__} is no Union ControlNet; it reads no "
                                 "mode (give None)")
            limit = self.net_of(k).config.num_mode
            if isinstance(one, bool) or not isinstance(one, int) or not 0 <= one < limit:
                raise ValueError(f"control_mode must be an int in [0, {limit}) for this Union ControlNet, got {one!r}")
        return list(many)

    def with_pictures(self, cond, uncond, pictures, control, *, codec, generator, guided, embedded_guidance):
        """Each condition's picture encoded in turn with `generator` (a draw of the VAE's posterior, as
        the pipeline draws it) for nets that read latents, else its pixels; its mode; the positive
        prompt on every row; a guidance-distilled net's guidance."""
        dtype, device = cond.embeds.dtype, cond.embeds.device
        extras = {}
        for k, (pixels, mode) in enumerate(zip(pictures, control.modes)):
            if self.reads_latents:
                pixels = codec.encode(pixels.to(device), sample=True, generator=generator)
            extras[f"{CONDITION}{k}"] = pixels.to(device, dtype)
            if mode is not None:
                extras[f"{MODE}{k}"] = torch.full((len(cond),), mode, dtype=torch.long, device=device)
        extras[NET_PROMPT], extras[NET_POOLED] = cond.embeds, cond.extras["pooled_projections"]
        if self.embeds_net_guidance:
            extras[NET_GUIDANCE] = torch.full((len(cond),), float(embedded_guidance), dtype=dtype, device=device)
        if guided:   # the negative rows' nets read what their twins' read: run once per pair, as the pipeline does
            extras[TWIN] = torch.arange(len(cond), device=device)
        return cond.with_extras(**extras), uncond.with_extras(**extras)

    def run(self, module, latents, t, cond):
        if NET_PROMPT not in cond.extras or f"{CONDITION}0" not in cond.extras:
            raise ValueError("cond: a Flux ControlNet pipeline's rows need their control conditions; it runs in its "
                             "pipeline's call (FluxControlledDenoiser.with_pictures)")
        return super().run(module, latents, t, cond)

    def run_nets(self, module, latents, t, cond, keep):
        own = [k for k in cond.extras if k.startswith((CONDITION, MODE)) or k in (NET_PROMPT, NET_POOLED, NET_GUIDANCE,
                                                                                   TWIN)]
        plain = cond.without(own)
        if not any(keep):   # no net acts at this step: the transformer alone (diffusers adds zeros)
            return self.base.run(module, latents, t, plain)
        spread, full_latents, full_t = None, latents, t
        if TWIN in cond.extras:   # twin rows' inputs are one row's: the nets run on one of each pair
            ids, spread = torch.unique(cond.extras[TWIN], return_inverse=True)   # (a device sync on a GPU)
            one = torch.zeros_like(ids).scatter_(0, spread, torch.arange(len(spread), device=ids.device))
            latents, t, cond = latents[one], t[one], cond.rows(one)
        hidden = flux.pack(latents)
        text_ids, image_ids = self.base.token_ids(latents, cond.extras[NET_PROMPT].shape[1])
        timestep = t.to(latents.dtype) / 1000
        guidance = cond.extras.get(NET_GUIDANCE)
        # the PyTorch nets beside the PyTorch transformer (a cost count), their engines beside its engine
        nets = self.nets if module is self.original else \
            [self.side_runners.get(name, net) for name, net in zip(self.net_names, self.nets)]
        blocks = singles = None
        for k, (scale, acts) in enumerate(zip(self._scales, keep)):
            if not acts:
                continue
            condition = cond.extras[f"{CONDITION}{k}"]
            mode = cond.extras.get(f"{MODE}{k}")
            b, s = nets[k if len(nets) > 1 else 0](
                hidden_states=hidden, controlnet_cond=flux.pack(condition) if self.reads_latents else condition,
                controlnet_mode=None if mode is None else mode[:, None], conditioning_scale=scale,
                timestep=timestep, guidance=None if guidance is None else guidance.float(),
                pooled_projections=cond.extras[NET_POOLED], encoder_hidden_states=cond.extras[NET_PROMPT],
                txt_ids=text_ids, img_ids=image_ids, return_dict=False)
            blocks = _summed(blocks, b)
            singles = _summed(singles, s)
        if spread is not None:   # each pair's samples to both of its rows
            blocks, singles = ([x[spread] for x in part] if part else part for part in (blocks, singles))
        return self.base.run(module, full_latents, full_t, plain, controlnet_block_samples=blocks,
                             controlnet_single_block_samples=singles, controlnet_blocks_repeat=not self.reads_latents)

    def sample_counts(self) -> tuple[int, int]:
        """How many double- and single-block samples the nets give (the same for every net: the
        transformer's graph takes that many)."""
        counts = {(len(net.controlnet_blocks), len(net.controlnet_single_blocks)) for net in self.nets}
        if len(counts) > 1:
            raise ValueError(f"backend: these ControlNets give different numbers of block samples {sorted(counts)}; "
                             "one transformer engine takes one number (run them on the PyTorch modules)")
        return counts.pop()

    def graph_spec(self, module=None, text_length=None):
        """The transformer's graph with the nets' summed samples as inputs after its own, each a grid
        [B, H/2, W/2, D]; a call without them (no net acting) feeds zeros."""
        module = module if module is not None else self.original
        spec = self.base.graph_spec(module, text_length)
        doubles, singles = self.sample_counts()
        width = module.inner_dim
        names = [f"controlnet_block_{i}" for i in range(doubles)] + \
            [f"controlnet_single_block_{i}" for i in range(singles)]
        inputs = [ModelInput(name, ("B", "H/2", "W/2", width)) for name in names]
        graph = flux.FluxGraph(module, bool(module.config.guidance_embeds), (doubles, singles), not self.reads_latents)
        bind = call_binder(module)

        def feeds(args, kwargs):
            named = spec.feeds(args, kwargs)
            a = bind(args, kwargs)
            batch, _, rows, _, cols, _ = named["patches"].shape
            given = [*(a.get("controlnet_block_samples") or [None] * doubles),
                     *(a.get("controlnet_single_block_samples") or [None] * singles)]
            for name, sample in zip(names, given):
                named[name] = named["patches"].new_zeros(batch, rows, cols, width) if sample is None else \
                    sample.unflatten(1, (rows, cols))
            return named
        return GraphSpec(spec.kind + "+controlnet", graph, spec.inputs + inputs, feeds, spec.outputs, spec.returns)

    def net_graph_spec(self, net):
        config, factor = net.config, self.pipe.vae_scale_factor
        guided, channels = bool(config.guidance_embeds), config.in_channels // 4
        patches = ("B", channels, "H/2", 2, "W/2", 2)
        condition = patches if self.reads_latents else ("B", 3, f"H*{factor}", f"W*{factor}")
        inputs = [ModelInput("patches", patches), ModelInput("condition", condition),
                  ModelInput("timestep", ("B",), torch.float32),
                  ModelInput("encoder_hidden_states", ("B", call_defaults(self.pipe)["max_sequence_length"],
                                                       config.joint_attention_dim)),
                  ModelInput("pooled_projections", ("B", config.pooled_projection_dim))]
        inputs += [ModelInput("guidance", ("B",), torch.float32)] if guided else []
        inputs += [ModelInput("mode", ("B", 1), torch.int64)] if self.union else []
        doubles = len(net.controlnet_blocks)
        names = [f"block_{i}" for i in range(doubles)] + \
            [f"single_block_{i}" for i in range(len(net.controlnet_single_blocks))]
        bind = call_binder(net)

        def feeds(args, kwargs):
            a = bind(args, kwargs)
            tokens, ids = a["hidden_states"], a["img_ids"]
            rows = int(ids[-1, 1]) + 1   # the ids run_nets made: the last token's row (one scalar read)
            cols = tokens.shape[1] // rows
            condition = a["controlnet_cond"]
            named = {"patches": flux.tokens_to_patches(tokens, rows, cols),
                     "condition": flux.tokens_to_patches(condition, rows, cols) if self.reads_latents else condition,
                     "timestep": a["timestep"].float(), "encoder_hidden_states": a["encoder_hidden_states"],
                     "pooled_projections": a["pooled_projections"]}
            if guided:
                named["guidance"] = a["guidance"].float()
            if self.union:
                named["mode"] = a["controlnet_mode"]
            return named

        def returns(outputs, args, kwargs):
            scale = bind(args, kwargs).get("conditioning_scale", 1.0)
            samples = [grid.flatten(1, 2) * scale for grid in outputs]
            return samples[:doubles] or None, samples[doubles:] or None
        graph = flux.FluxControlNetGraph(net, guided, self.union, self.reads_latents)
        return GraphSpec("flux-controlnet", graph, inputs, feeds, names, returns)


def _summed(total, samples):
    """Block samples of several conditions added up, as diffusers' multi wrapper adds them (None: a
    net without blocks of that kind)."""
    if total is None or samples is None:
        return samples if total is None else total
    return [a + b for a, b in zip(total, samples)]
