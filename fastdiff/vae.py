"""Images ⇄ latents through a pipeline's VAE: AutoencoderKL or AutoencoderTiny alike.

Latents here are what the denoiser sees: (z − shift_factor)·scaling_factor. Images are
[B, 3, H, W] tensors: in [-1, 1] (diffusers' convention) for :meth:`LatentCodec.encode` /
:meth:`~LatentCodec.decode`, in [0, 1] for the frame paths :meth:`~LatentCodec.encode_unit` /
:meth:`~LatentCodec.decode_unit` that a stream runs, which skip the round trips through [-1, 1]
the VAE classes make (TAESD works in [0, 1]) and the posterior a mode does not need.
"""

from __future__ import annotations

import torch

from .images import affine, signed
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
        return self._scaled(z, True)

    def encode_unit(self, images: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """Latents (the posterior's mode) of images in [0, 1]. ``scaled=False`` leaves out the
        ×scaling_factor, for a caller that folds it into an op of its own (the stream's entry)."""
        vae, dtype = self.vae, self.dtype
        if images.dtype != dtype:
            images = images.to(dtype)
        direct = self._direct(vae, images.shape[0])
        if direct == "tiny":   # TAESD's own range: no [0, 1] -> [-1, 1] -> [0, 1]
            z = vae.encoder.layers(images)
        elif direct == "kl":   # the mean is the moments' first half: no posterior to build
            moments = vae._encode(signed(images))
            z = moments[:, : moments.shape[1] // 2]
        else:
            out = vae.encode(signed(images))
            z = out.latents if self.is_tiny else out.latent_dist.mode()
        return self._scaled(z, scaled)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped) from denoiser latents (float32 ones when upcast)."""
        vae, latents = self._decoding(latents)
        return vae.decode(self._unscaled(latents), return_dict=False)[0]

    def decode_unit(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], not clamped (a caller checks them for NaN and ±Inf first), from denoiser latents."""
        vae, z = self._decoding(latents)
        z = self._unscaled(z)
        direct = self._direct(vae, z.shape[0])
        if direct == "tiny":
            # DecoderTiny's forward without its last [0, 1] -> [-1, 1]: its soft clamp, then its layers
            return vae.decoder.layers(torch.tanh(z / 3).mul_(3))
        if direct == "kl" and not vae.use_tiling:   # _decode's own two calls, without its wrappers
            post_quant_conv = vae.post_quant_conv
            images = vae.decoder(post_quant_conv(z) if post_quant_conv is not None else z)
        else:
            images = vae.decode(z, return_dict=False)[0]
        return affine(images, 0.5, 0.5)   # [-1, 1] -> [0, 1]

    def _decoding(self, latents: torch.Tensor):
        """(the VAE that decodes, the latents in its dtype): an fp16 VAE that must upcast decodes
        with a float32 copy, made once."""
        vae = self.vae
        dtype = self._first.of(vae).dtype
        if self.upcast and dtype == torch.float16 and isinstance(vae, torch.nn.Module):
            if self._vae32 is None:
                import copy

                self._vae32 = copy.deepcopy(self.vae).float()
            return self._vae32, latents.float()
        return vae, (latents if latents.dtype == dtype else latents.to(dtype))

    @staticmethod
    def _direct(vae, rows: int) -> str | None:
        """"tiny" or "kl" where the frame paths may call a diffusers VAE's own parts instead of its
        encode/decode: a real AutoencoderTiny / AutoencoderKL (not an engine), with no offload hook
        its encode/decode would fire and no slicing of a batch (`_encode` honours tiling itself;
        TAESD's tiling is left to its encode/decode)."""
        kind = type(vae).__name__
        if kind not in ("AutoencoderTiny", "AutoencoderKL") or "_hf_hook" in vae.__dict__ or (rows > 1 and vae.use_slicing):
            return None
        if kind == "AutoencoderTiny":
            return None if vae.use_tiling else "tiny"
        return "kl" if hasattr(vae, "_encode") else None

    # Every op between the denoiser and the VAE costs a frame far more than its arithmetic (the
    # caches are full of the models): no multiply by a scaling factor of 1, no add of a zero shift.
    def _scaled(self, z: torch.Tensor, scaled: bool) -> torch.Tensor:
        if self.shift:
            z = z - self.shift
        return z * self.scaling if scaled and self.scaling != 1 else z

    def _unscaled(self, latents: torch.Tensor) -> torch.Tensor:
        if self.scaling == 1 and not self.shift:
            return latents
        z = latents / self.scaling
        return z.add_(self.shift) if self.shift else z

