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

from .controlnet import ControlNetsAround, controlnets_of
from .denoiser import Denoiser

CONDITION = "sd3_control_"


class SD3ControlledDenoiser(ControlNetsAround):
    """`base` (an SD3 transformer's adapter) with `controlnet` (an SD3ControlNetModel or an
    SD3MultiControlNetModel) adding its block samples to every row."""

    global_pool = False   # no guess mode in SD3's ControlNet pipeline
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
        blocks = None
        for k, (net, scale, acts) in enumerate(zip(self.nets, self._scales, keep)):
            if not acts:
                continue
            samples = net(hidden_states=latents, timestep=t, encoder_hidden_states=plain.embeds if self.reads_prompt
                          else None, pooled_projections=pooled, controlnet_cond=cond.extras[f"{CONDITION}{k}"],
                          conditioning_scale=scale, return_dict=False)[0]
            blocks = list(samples) if blocks is None else [a + b for a, b in zip(blocks, samples)]
        return self.base.run(module, latents, t, plain, block_controlnet_hidden_states=blocks)

    def graph_spec(self, module=None, text_length=None):
        raise ValueError("backend: an SD3 ControlNet pipeline runs on the PyTorch modules; its engines (the "
                         "transformer taking the nets' block samples, each net a graph of its own) are not built yet")
