"""Images ⇄ latents through a pipeline's VAE: AutoencoderKL or AutoencoderTiny alike.

Latents here are what the denoiser sees: (z − shift_factor)·scaling_factor. Images are
[B, 3, H, W] tensors in [-1, 1].
"""

from __future__ import annotations

import torch

from .parameters import FirstParameter


class LatentCodec:
    """`upcast` (default: the VAE's own ``force_upcast``, as diffusers' pipelines follow it) decodes an
    fp16 VAE in fp32, on a float32 copy made once: the SDXL VAE's fp16 activations overflow."""

    def __init__(self, vae, upcast: bool | None = None):
        self.vae = vae
        self.scaling = float(vae.config.get("scaling_factor", 1.0) or 1.0)
        self.shift = float(vae.config.get("shift_factor", 0.0) or 0.0)
        # AutoencoderKL returns a distribution; AutoencoderTiny returns latents directly.
        self.is_tiny = type(vae).__name__ == "AutoencoderTiny"
        self.upcast = bool(vae.config.get("force_upcast", False)) if upcast is None else upcast
        self._vae32 = None
        self._first = FirstParameter()   # of `vae`, which engines swap

    @property
    def scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for SD's VAEs)."""
        config = self.vae.config
        blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")
        return 2 ** (len(blocks) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self._first.of(self.vae).dtype

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of images in [-1, 1]: the posterior's mode, or (`sample`) a draw with `generator`."""
        out = self.vae.encode(images.to(self.dtype))
        if self.is_tiny:
            z = out.latents
        elif sample:
            z = out.latent_dist.sample(generator)
        else:
            z = out.latent_dist.mode()
        return ((z - self.shift) if self.shift else z) * self.scaling

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped) from denoiser latents (float32 ones when upcast)."""
        dtype = self.dtype
        if self.upcast and dtype == torch.float16 and isinstance(self.vae, torch.nn.Module):
            if self._vae32 is None:
                import copy

                self._vae32 = copy.deepcopy(self.vae).float()
            return self._vae32.decode(self._unscaled(latents.float()), return_dict=False)[0]
        return self.vae.decode(self._unscaled(latents.to(dtype)), return_dict=False)[0]

    def _unscaled(self, latents: torch.Tensor) -> torch.Tensor:
        # every op between the denoiser and the decoder costs a frame far more than its arithmetic
        # (the caches are full of the models): no add of a zero shift
        z = latents / self.scaling
        return z.add_(self.shift) if self.shift else z
