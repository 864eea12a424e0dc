"""`fastdiff.accelerate(pipe)`: a drop-in replacement for a diffusers txt2img / img2img pipeline.

The returned object is called like the pipeline it wraps and returns the same output dataclass.
Each call runs the stream core with one slot per denoising step and the call's whole batch as the
frames of that slot, so a call costs what the pipeline's own loop costs (n denoiser calls) and
shares every technique the stream has (residual CFG, engines...).
"""

from __future__ import annotations

import inspect
import numbers

import torch

from .denoiser import check_prompts, check_size, denoiser_for
from .images import check_output_type
from .sampling.guidance import check_mode
from .sampling.schedule import step_schedule
from .stream.batch import LatentStream
from .vae import LatentCodec

# pipeline class → (task, module of its output dataclass, output dataclass)
SUPPORTED = {
    "StableDiffusionPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion", "StableDiffusionPipelineOutput"),
    "StableDiffusionImg2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion", "StableDiffusionPipelineOutput"),
    "StableDiffusionXLPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion_xl", "StableDiffusionXLPipelineOutput"),
    "StableDiffusionXLImg2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_xl", "StableDiffusionXLPipelineOutput"),
    "StableDiffusion3Pipeline": ("txt2img", "diffusers.pipelines.stable_diffusion_3", "StableDiffusion3PipelineOutput"),
    "StableDiffusion3Img2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_3", "StableDiffusion3PipelineOutput"),
}
ACCEPTED_ARGS = ("prompt", "image", "negative_prompt", "height", "width", "num_inference_steps", "timesteps",
                 "strength", "guidance_scale", "num_images_per_prompt", "generator", "latents", "output_type",
                 "return_dict")


def accelerate(pipe, *, cfg: str | None = None, delta: float = 1.0, solver: str | None = None,
               backend: str | None = None, engine_options: dict | None = None) -> "AcceleratedPipeline":
    """Wrap a diffusers pipeline; the result is called exactly like `pipe`.

    ``cfg``: None follows diffusers (``"full"`` when guidance_scale > 1, else ``"none"``); ``"self"``
    or ``"initialize"`` use residual guidance at n (or n+1) rows per step instead of 2n.
    ``solver``: None picks from the scheduler (LCM's step for LCMScheduler, DDIM/Euler otherwise).
    ``backend`` ("onnxruntime", "tensorrt", "aoti", "inductor" or "auto"; None: PyTorch) runs the
    denoiser and VAE as engines, built now or loaded from the engine cache, for up to
    ``engine_options["max_batch"]`` images per call (default 8) at ``engine_options["resolutions"]``
    (default the model's native size); other options as for :class:`fastdiff.Stream`.
    """
    return AcceleratedPipeline(pipe, cfg=cfg, delta=delta, solver=solver, backend=backend,
                               engine_options=engine_options)


def supported_base(pipe) -> type:
    """The diffusers pipeline class `pipe` is (or subclasses, like the custom pipelines in pipelines/)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED:
            return cls
    raise ValueError(f"pipe: {type(pipe).__name__} is not supported; fastdiff.accelerate takes one of "
                     f"{', '.join(sorted(SUPPORTED))}")


class AcceleratedPipeline:
    def __init__(self, pipe, cfg=None, delta=1.0, solver=None, backend=None, engine_options=None):
        base = supported_base(pipe)
        self.pipe = pipe
        self.task, module, output_class = SUPPORTED[base.__name__]
        self.output_class = getattr(__import__(module, fromlist=[output_class]), output_class)
        self.cfg = check_mode(cfg) if cfg is not None else None
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or delta < 0:
            raise ValueError(f"delta must be a number ≥ 0, got {delta!r}")
        self.delta = float(delta)
        self.solver = solver
        self.denoiser = denoiser_for(pipe)
        # Defaults (steps, guidance, strength) are the wrapped pipeline class's own.
        self.defaults = {k: p.default for k, p in inspect.signature(base.__call__).parameters.items()}
        self._vae, self.codec = pipe.vae, LatentCodec(pipe.vae)
        self.engines = None
        if backend is not None:
            self.engines = self._attach_engines(backend, engine_options)
        elif engine_options is not None:
            raise ValueError("engine_options needs a backend (backend='onnxruntime', 'tensorrt', 'aoti', 'inductor' or 'auto')")

    def _attach_engines(self, backend, options):
        """Engines for 1..max_batch images per call (2·max_batch denoiser rows, for full CFG)."""
        from .engines.attach import attach_engines

        options = dict(options or {})
        max_batch = options.pop("max_batch", 8)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= 31:
            raise ValueError(f"engine_options['max_batch'] must be an integer in [1, 31], got {max_batch!r}")
        native = check_size(self.denoiser, self.codec, None, None)
        resolutions = options.pop("resolutions", [native])
        return attach_engines(self.denoiser, self.codec, backend, rows=2 * max_batch, frames=max_batch,
                              resolutions=resolutions, options=options, best_rows=2, best_frames=1)

    def _latent_codec(self) -> LatentCodec:
        # the codec built at wrapping time (with any VAE engines), unless pipe.vae was replaced since
        return self.codec if self.pipe.vae is self._vae else LatentCodec(self.pipe.vae)

    def __getattr__(self, name):
        # Everything else (components, config, progress bars...) is the wrapped pipeline's.
        return getattr(self.__dict__["pipe"], name)

    def to(self, *args, **kwargs) -> "AcceleratedPipeline":
        self.pipe.to(*args, **kwargs)
        return self

    def _default(self, name, value):
        return self.defaults.get(name) if value is None else value

    @torch.inference_mode()
    def __call__(self, prompt=None, image=None, *, negative_prompt=None, height=None, width=None,
                 num_inference_steps=None, timesteps=None, strength=None, guidance_scale=None,
                 num_images_per_prompt=1, generator=None, latents=None, output_type="pil", return_dict=True,
                 **unsupported):
        if unsupported:
            raise TypeError(f"fastdiff.accelerate does not take {sorted(unsupported)}; it accepts {ACCEPTED_ARGS}")
        check_output_type(output_type)
        denoiser, codec = self.denoiser, self._latent_codec()
        prompts = check_prompts(prompt, "prompt", denoiser.tokenizers, allow_empty=False)
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {num_images_per_prompt!r}")
        negatives = None
        if negative_prompt is not None:
            negatives = check_prompts(negative_prompt, "negative_prompt", denoiser.tokenizers, allow_empty=True)
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}")
            negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)

        guidance_scale = float(self._default("guidance_scale", guidance_scale))
        cfg = self.cfg or ("full" if guidance_scale > 1 else "none")
        num_inference_steps = self._default("num_inference_steps", num_inference_steps)
        scheduler = self.pipe.scheduler

        pixels = None
        if self.task == "img2img":
            if image is None:
                raise ValueError(f"image is required by {type(self.pipe).__name__}")
            pixels = self.pipe.image_processor.preprocess(image, height=height, width=width)
            if pixels.shape[0] not in (1, batch):
                raise ValueError(f"image has {pixels.shape[0]} images for a batch of {batch} prompts×images")
            pixels = pixels.expand(batch, -1, -1, -1) if pixels.shape[0] == 1 else pixels
            height, width = (int(v) for v in pixels.shape[-2:])
        elif image is not None:
            raise ValueError(f"image is not an argument of the txt2img {type(self.pipe).__name__}")
        height, width = check_size(denoiser, codec, height, width)

        if timesteps is not None:
            steps = None
        elif self.task == "img2img":
            strength = float(self._default("strength", strength))
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            # The pipeline's own rounding of strength to a first step (SD and SD3 round differently).
            scheduler.set_timesteps(num_inference_steps)
            remaining = len(self.pipe.get_timesteps(num_inference_steps, strength, denoiser.device)[0])
            steps = list(range(num_inference_steps - remaining, num_inference_steps))
            if not steps:
                raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step to run")
        else:
            steps = list(range(num_inference_steps))
        schedule = step_schedule(scheduler, steps, timesteps, num_inference_steps, self.solver)

        from diffusers.utils.torch_utils import randn_tensor

        latent_shape = (denoiser.in_channels, height // codec.scale_factor, width // codec.scale_factor)
        clean = None
        if pixels is not None:
            clean = codec.encode(pixels.to(denoiser.device), sample=True, generator=generator)
        if latents is not None:
            if tuple(latents.shape) != (batch,) + latent_shape:
                raise ValueError(f"latents must have shape {(batch,) + latent_shape}, got {tuple(latents.shape)}")
            noise = latents.to(denoiser.device, denoiser.dtype)
        else:
            noise = randn_tensor((batch,) + latent_shape, generator=generator, device=denoiser.device,
                                 dtype=denoiser.dtype)
        cond, uncond = denoiser.encode_prompt(prompts, negatives, height, width)
        stream = LatentStream(denoiser, schedule, cond, uncond, latent_shape, cfg=cfg,
                              guidance_scale=guidance_scale, delta=self.delta, noise="fresh", generator=generator)
        finished = stream.push(clean, noise=noise)
        result = finished if finished is not None else stream.drain()[0]
        return self._output(result, output_type, return_dict, codec)

    def _output(self, latents, output_type, return_dict, codec):
        if output_type == "latent":
            images = latents
        else:
            decoded = codec.decode(latents)
            images = self.pipe.image_processor.postprocess(decoded, output_type=output_type)
        fields = {"images": images}
        if "nsfw_content_detected" in self.output_class.__dataclass_fields__:
            fields["nsfw_content_detected"] = None
        if not return_dict:
            return tuple(fields.values())
        return self.output_class(**fields)
