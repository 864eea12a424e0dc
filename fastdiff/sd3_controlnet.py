"""SD3 ControlNets under the denoiser protocol (diffusers' ``StableDiffusion3ControlNetPipeline``): the
transformer's call with the block samples of one or more SD3ControlNetModels added.

Each row carries each net's control picture's latents under ``sd3_control_<k>``. The pipeline
encodes the picture (a draw of the VAE's posterior from torch's global generator, not the call's)
once per row of its guided batch — the unconditional rows' draws first — and the nets read each
row's own prompt. InstantX's nets (``force_zeros_for_pooled_projection``) read zeros for the pooled
prompt and latents without the VAE's shift; SD3.5's large nets read no prompt tokens.
"""

from __future__ import annotations

import torch

from .control_nets import ControlNetsAround, controlnets_of
from .denoiser import Denoiser, GraphSpec, ModelInput, call_binder

CONDITION = "sd3_control_"


class SD3ControlledDenoiser(ControlNetsAround):
    """`base` (an SD3 transformer's adapter) with `controlnet` (an SD3ControlNetModel or an
    SD3MultiControlNetModel) adding its block samples to every row."""

    pictures_at_native_size = True

    def __init__(self, base: Denoiser, controlnet):
        super().__init__(base, controlnets_of(controlnet))
        config = self.nets[0].config   # the pipeline reads the first net's for all of them
        self.zero_pooled = bool(config.force_zeros_for_pooled_projection)
        self.reads_prompt = config.joint_attention_dim is not None

    def with_pictures(self, cond, uncond, pictures, control, *, codec, generator, guided, embedded_guidance):
        """Each net's picture encoded for every row of the pipeline's batch (twice over when it
        guides, its unconditional rows' draws first), from torch's global generator as it draws them."""
        extras_cond, extras_uncond = {}, {}
        for k, pixels in enumerate(pictures):
            pixels = pixels.to(cond.embeds.device)
            latents = codec.encode(torch.cat([pixels] * 2) if guided else pixels, sample=True)
            if self.zero_pooled and codec.shift:   # InstantX's nets were trained on latents without the shift
                latents = latents + codec.shift * codec.scaling
            latents = latents.to(cond.embeds.dtype)
            key = f"{CONDITION}{k}"
            extras_uncond[key], extras_cond[key] = latents.chunk(2) if guided else (latents, latents)
        return cond.with_extras(**extras_cond), uncond.with_extras(**extras_uncond)

    def run(self, module, latents, t, cond):
        if f"{CONDITION}0" not in cond.extras:
            raise ValueError("cond: an SD3 ControlNet pipeline's rows need their control pictures' latents; it runs "
                             "in its pipeline's call (SD3ControlledDenoiser.with_pictures)")
        return super().run(module, latents, t, cond)

    def run_nets(self, module, latents, t, cond, keep):
        plain = cond.without([f"{CONDITION}{k}" for k in range(len(self.nets))])
        if not any(keep):   # no net acts at this step: the transformer alone (diffusers adds zeros)
            return self.base.run(module, latents, t, plain)
        pooled = plain.extras["pooled_projections"]
        pooled = torch.zeros_like(pooled) if self.zero_pooled else pooled
        # the PyTorch nets beside the PyTorch transformer (a cost count), their engines beside its engine
        nets = self.nets if module is self.original else \
            [self.side_runners.get(name, net) for name, net in zip(self.net_names, self.nets)]
        blocks = None
        for k, (net, scale, acts) in enumerate(zip(nets, self._scales, keep)):
            if not acts:
                continue
            samples = net(hidden_states=latents, timestep=t, encoder_hidden_states=plain.embeds if self.reads_prompt
                          else None, pooled_projections=pooled, controlnet_cond=cond.extras[f"{CONDITION}{k}"],
                          conditioning_scale=scale, return_dict=False)[0]
            blocks = list(samples) if blocks is None else [a + b for a, b in zip(blocks, samples)]
        return self.base.run(module, latents, t, plain, block_controlnet_hidden_states=blocks)

    def graph_spec(self, module=None, text_length=None):
        """The transformer's graph with the nets' summed block samples as inputs after its own, each
        a grid [B, H/p, W/p, D] (p its patch size); a call without them (no net acting) feeds zeros."""
        module = module if module is not None else self.original
        spec = self.base.graph_spec(module, text_length)
        counts = {len(net.controlnet_blocks) for net in self.nets}
        if len(counts) > 1:
            raise ValueError(f"backend: these ControlNets give different numbers of block samples {sorted(counts)}; "
                             "one transformer engine takes one number (run them on the PyTorch modules)")
        count, width, patch = counts.pop(), module.inner_dim, module.config.patch_size
        names = [f"controlnet_block_{i}" for i in range(count)]
        inputs = [ModelInput(name, ("B", f"H/{patch}", f"W/{patch}", width)) for name in names]
        bind = call_binder(module)

        def feeds(args, kwargs):
            named = spec.feeds(args, kwargs)
            batch, _, height, width_ = named["hidden_states"].shape
            given = bind(args, kwargs).get("block_controlnet_hidden_states") or [None] * count
            for name, sample in zip(names, given):
                named[name] = named["hidden_states"].new_zeros(batch, height // patch, width_ // patch, width) \
                    if sample is None else sample.unflatten(1, (height // patch, -1))
            return named
        return GraphSpec(spec.kind + "+controlnet", _ControlledGraph(module, patch), spec.inputs + inputs, feeds,
                         spec.outputs, spec.returns)

    def net_graph_spec(self, net):
        config, transformer = net.config, self.original
        channels, patch = transformer.config.in_channels, transformer.config.patch_size
        inputs = [ModelInput("hidden_states", ("B", channels, "H", "W")),
                  ModelInput("condition", ("B", channels + config.extra_conditioning_channels, "H", "W")),
                  ModelInput("timestep", ("B",), torch.float32)]
        if self.reads_prompt:   # as many tokens as the transformer's graph takes
            tokens = next(i for i in self.base.graph_spec(transformer).inputs if i.name == "encoder_hidden_states")
            inputs.append(ModelInput("encoder_hidden_states", ("B", tokens.shape[1], config.joint_attention_dim)))
        inputs.append(ModelInput("pooled_projections", ("B", config.pooled_projection_dim)))
        names = [f"block_{i}" for i in range(len(net.controlnet_blocks))]
        bind = call_binder(net)

        def feeds(args, kwargs):
            a = bind(args, kwargs)
            named = {"hidden_states": a["hidden_states"], "condition": a["controlnet_cond"],
                     "timestep": a["timestep"].float(), "pooled_projections": a["pooled_projections"]}
            if self.reads_prompt:
                named["encoder_hidden_states"] = a["encoder_hidden_states"]
            return named

        def returns(outputs, args, kwargs):
            scale = bind(args, kwargs).get("conditioning_scale", 1.0)
            return ([grid.flatten(1, 2) * scale for grid in outputs],)
        return GraphSpec("sd3-controlnet", _ControlNetGraph(net, self.reads_prompt, patch), inputs, feeds, names,
                         returns)


class _ControlledGraph(torch.nn.Module):
    """An SD3 transformer with a ControlNet's samples as grids after its own inputs."""

    def __init__(self, transformer, patch: int):
        super().__init__()
        self.transformer, self.patch = transformer, patch

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, *grids):
        return self.transformer(hidden_states=hidden_states, timestep=timestep, return_dict=False,
                                encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                block_controlnet_hidden_states=[grid.flatten(1, 2) for grid in grids])[0]


class _ControlNetGraph(torch.nn.Module):
    """An SD3 ControlNet with positional inputs, its samples unscaled as grids [B, H/p, W/p, D]."""

    def __init__(self, net, reads_prompt: bool, patch: int):
        super().__init__()
        self.net, self.reads_prompt, self.patch = net, reads_prompt, patch

    def forward(self, hidden_states, condition, timestep, *rest):
        samples = self.net(hidden_states=hidden_states, controlnet_cond=condition, timestep=timestep,
                           encoder_hidden_states=rest[0] if self.reads_prompt else None, pooled_projections=rest[-1],
                           return_dict=False)[0]
        rows = hidden_states.shape[2] // self.patch
        return tuple(sample.unflatten(1, (rows, -1)) for sample in samples)
