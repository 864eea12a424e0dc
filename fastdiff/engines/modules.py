"""Engines dressed as the modules they replace: same call, same outputs.

:class:`EngineModule` stands in for a UNet or transformer: it takes the module's own arguments
(``module(sample, t, encoder_hidden_states=..., return_dict=False)``) and returns ``(output,)``.
:class:`EngineVAE` stands in for a VAE: ``encode`` returns diffusers' output (a Gaussian posterior
for AutoencoderKL), ``decode`` an image tuple. Everything else (config, parameters, dtype) is the
original module's, so the code above cannot tell them apart except by speed.
"""

from __future__ import annotations

import torch

from .components import Component, size_axis
from .profiles import ShapeProfile


class EngineModule:
    def __init__(self, component: Component, runner, engine_dtype: torch.dtype, profile: ShapeProfile | None = None):
        self.component = component
        self.runner = runner
        self.engine_dtype = engine_dtype          # the engine's floating dtype
        self.out_dtype = component.dtype          # what the replaced module returns
        self.profile = profile                    # the shapes it was built for (None: any)
        self.device = next(component.module.parameters()).device   # where outputs go, as the module's did
        self.fixed_dtype_inputs = {spec.name for spec in component.inputs if spec.dtype is not None}
        # where the first input holds the image's height and width ("H/2": Flux's patches), read once
        axes = {a[0]: (i, a) for i, a in ((i, size_axis(s)) for i, s in enumerate(component.inputs[0].shape)) if a}
        self._size_axes = (axes["H"], axes["W"]) if "H" in axes and "W" in axes else None

    def check_shapes(self, feeds: dict[str, torch.Tensor]):
        """Batch and image size within the profile the engine was built for, or a clear error."""
        spec = self.component.inputs[0]
        shape = feeds[spec.name].shape
        batch, low, high = shape[0], self.profile.batch[0], self.profile.batch[2]
        if not low <= batch <= high:
            raise ValueError(f"batch: {batch} rows reach the {self.component.name} engine, built for {low}..{high}; "
                             "build it for more (a larger max_batch, or fastdiff build --batch)")
        if self._size_axes is not None:   # the grid's size back in pixels
            f = self.component.size_divisor
            height, width = (shape[i] * over // times * f for i, (_, times, over) in self._size_axes)
            p = self.profile
            if not (p.height[0] <= height <= p.height[2] and p.width[0] <= width <= p.width[2]):
                raise ValueError(f"height/width {height}×{width} is outside what the {self.component.name} engine "
                                 f"was built for ({p}); build it for that size (engine_options['resolutions'] "
                                 "with accelerate, fastdiff build --resolution)")

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.profile is not None:
            self.check_shapes(feeds)
        cast = {name: value if name in self.fixed_dtype_inputs else value.to(self.engine_dtype)
                for name, value in feeds.items()}
        return [out.to(device=self.device, dtype=self.out_dtype) for out in self.runner(cast)]

    def __call__(self, *args, return_dict: bool = True, **kwargs):
        if return_dict:
            raise ValueError("return_dict must be False for an engine (fastdiff's adapters pass False)")
        outputs = self.run(self.component.feeds(args, kwargs))
        returns = self.component.returns
        return (outputs[0],) if returns is None else returns(outputs, args, kwargs)

    def __getattr__(self, name):
        # config, parameters(), dtype-revealing attributes: the original module's
        return getattr(self.__dict__["component"].module, name)


class EngineVAE:
    """A VAE whose encoder and/or decoder run as engines (None: that half stays PyTorch)."""

    def __init__(self, vae, encoder: EngineModule | None, decoder: EngineModule | None):
        self.vae = vae
        self.encoder = encoder
        self.decoder = decoder
        self.tiny = type(vae).__name__ == "AutoencoderTiny"

    def encode(self, images, return_dict: bool = True):
        if self.encoder is None:
            return self.vae.encode(images, return_dict=return_dict)
        out = self.encoder.run({"images": images})[0]
        if self.tiny:
            from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
            result = AutoencoderTinyOutput(latents=out)
        else:
            from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
            result = AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(out))
        return result if return_dict else tuple(result.values())

    def decode(self, latents, return_dict: bool = True, **kwargs):
        if self.decoder is None:
            return self.vae.decode(latents, return_dict=return_dict, **kwargs)
        images = self.decoder.run({"latents": latents})[0]
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput
            return DecoderOutput(sample=images)
        return (images,)

    def __getattr__(self, name):
        return getattr(self.__dict__["vae"], name)
