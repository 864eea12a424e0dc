"""`fastdiff.accelerate(pipe)`: a drop-in replacement for a diffusers txt2img / img2img pipeline.

The returned object is called like the pipeline it wraps and returns the same output dataclass.
Each call runs the stream core with one slot per denoising step and the call's whole batch as the
frames of that slot, so a call costs what the pipeline's own loop costs (n denoiser calls) and
shares every technique the stream has (residual CFG, engines...).
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch

from .channel_inputs import reads_control_latents, with_control
from .checks import check_int, check_number
from .denoiser import EMBED_ARGS, GUIDANCE
from .images import FiniteWatch, check_finite, check_output_type, preprocessed
from .kontext_inputs import KONTEXT_ARGS, context_latents, kontext_size, with_context
from .sampling.guidance import check_mode
from .sampling.guiders import make_guider
from .sampling.schedule import (is_flow_scheduler, own_solver, set_schedule, step_schedule, validate_steps,
                                validate_timesteps)
from .stream.batch import LatentStream
from .stream.prepare import Prepared, UsesPrepared
from .text_inputs import SIZE_CONDITIONS, TEXT_OPTIONS, call_defaults, prompt_options
from .tuning.adapters import HoldsAdapter
from .tuning.routers import HoldsRouter

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# pipeline class → (task, module of its output dataclass, output dataclass)
SUPPORTED = {
    "StableDiffusionPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion", "StableDiffusionPipelineOutput"),
    "StableDiffusionImg2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion", "StableDiffusionPipelineOutput"),
    "StableDiffusionXLPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion_xl", "StableDiffusionXLPipelineOutput"),
    "StableDiffusionXLImg2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_xl", "StableDiffusionXLPipelineOutput"),
    "StableDiffusion3Pipeline": ("txt2img", "diffusers.pipelines.stable_diffusion_3", "StableDiffusion3PipelineOutput"),
    "StableDiffusion3Img2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_3", "StableDiffusion3PipelineOutput"),
    "StableDiffusionControlNetPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion", "StableDiffusionPipelineOutput"),
    "StableDiffusionControlNetImg2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion", "StableDiffusionPipelineOutput"),
    "StableDiffusionXLControlNetPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion_xl", "StableDiffusionXLPipelineOutput"),
    "StableDiffusionXLControlNetImg2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_xl", "StableDiffusionXLPipelineOutput"),
    "StableDiffusionXLControlNetUnionPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion_xl",
                                                 "StableDiffusionXLPipelineOutput"),
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_xl",
                                                        "StableDiffusionXLPipelineOutput"),
    "StableDiffusionInpaintPipeline": ("img2img", "diffusers.pipelines.stable_diffusion", "StableDiffusionPipelineOutput"),
    "StableDiffusionXLInpaintPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_xl", "StableDiffusionXLPipelineOutput"),
    "StableDiffusion3InpaintPipeline": ("img2img", "diffusers.pipelines.stable_diffusion_3", "StableDiffusion3PipelineOutput"),
    "FluxPipeline": ("txt2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxImg2ImgPipeline": ("img2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxInpaintPipeline": ("img2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxFillPipeline": ("img2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxControlPipeline": ("txt2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxControlImg2ImgPipeline": ("img2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxKontextPipeline": ("txt2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxControlNetPipeline": ("txt2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "FluxControlNetImg2ImgPipeline": ("img2img", "diffusers.pipelines.flux", "FluxPipelineOutput"),
    "StableDiffusion3ControlNetPipeline": ("txt2img", "diffusers.pipelines.stable_diffusion_3",
                                           "StableDiffusion3PipelineOutput"),
}
# FLUX.1 Kontext: txt2img whose `image` is a context picture the transformer reads beside the image drawn
CONTEXT_PIPELINES = ("FluxKontextPipeline",)
# inpainting pipelines: img2img with a mask (and, for their own denoisers, the masked picture's latents)
INPAINT = ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusion3InpaintPipeline",
           "FluxInpaintPipeline", "FluxFillPipeline")
INPAINT_ARGS = ("mask_image", "masked_image_latents", "padding_mask_crop")
# ControlNet pipelines: the argument holding the control images (txt2img ones take them as `image`)
CONTROL_ARG = {**dict.fromkeys(("StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline"), "image"),
               **dict.fromkeys(("StableDiffusionControlNetImg2ImgPipeline",
                                "StableDiffusionXLControlNetImg2ImgPipeline", "StableDiffusionXLControlNetUnionPipeline",
                                "StableDiffusionXLControlNetUnionImg2ImgPipeline", "StableDiffusion3ControlNetPipeline",
                                "FluxControlNetPipeline", "FluxControlNetImg2ImgPipeline"), "control_image")}
IMAGE_PROMPT_ARGS = ("ip_adapter_image", "ip_adapter_image_embeds")   # an IP-Adapter's image prompt
# Flux's classifier-free guidance over a negative prompt (its guidance_scale is the model's input)
TRUE_CFG_ARG = "true_cfg_scale"
# FLUX.1 Canny / Depth's control picture, whose latents the transformer reads beside the latents
CONTROL_LATENTS_ARG = "control_image"
CONTROL_ARGS = ("control_image", "controlnet_conditioning_scale", "guess_mode", "control_guidance_start",
                "control_guidance_end", "control_mode")
ACCEPTED_ARGS = ("prompt", "image", "negative_prompt", "height", "width", "num_inference_steps", "timesteps",
                 "sigmas", "strength", "guidance_scale", "guidance_rescale", "eta", "num_images_per_prompt", "generator",
                 "latents", "output_type", "return_dict", "callback_on_step_end",
                 "callback_on_step_end_tensor_inputs", *EMBED_ARGS)
# the LoRA scale's argument: {"scale": s}, as the pipeline class names it (UNet pipelines, then DiT ones)
LORA_SCALE_ARGS = ("cross_attention_kwargs", "joint_attention_kwargs")


def accelerate(pipe, *, cfg: str | None = None, delta: float = 1.0, solver: str | None = None,
               backend: str | None = None, engine_options: dict | None = None, steps=None, schedule=None,
               adapter=None, adapter_scale: float | None = None, adapter_scheduler: str | None = None, router=None,
               attention: str | None = None) -> "AcceleratedPipeline":
    """Wrap a diffusers pipeline; the result is called exactly like `pipe`.

    ``steps``: every call runs these indices of its ``num_inference_steps``-step schedule (the
    pipeline's default, 50, unless the call says), as :class:`fastdiff.Stream` does (StreamDiffusion's
    t_index_list): ``steps=[32, 45]`` is two denoiser calls, at the 32nd and 45th of 50 timesteps. For
    img2img the first of them sets how much of the image is kept, so a call gives no ``strength`` (nor
    ``timesteps``).

    ``schedule``: a searched step schedule (a path, a :class:`fastdiff.tuning.Schedule`, or a list of
    them, one per step count) made for this pipeline by ``fastdiff tune steps``; a call that asks for
    that many steps over the whole trajectory (txt2img, or img2img at strength 1) runs its timesteps
    and solver, unless the call gives ``timesteps`` itself.

    ``adapter``: a LoRA (a folder or ``.safetensors``; ours from ``fastdiff tune onestep``, or a known
    few-step family: LCM-LoRA, TCD, Hyper-SD, SDXL-Lightning, DMD2 for the UNets; Hyper-SD3,
    Hyper-FLUX and FLUX.1-Turbo for SD3 and Flux — ``adapter_scheduler`` names the family when the
    file name does not) loaded into the pipeline's denoiser at ``adapter_scale`` (default: the
    family's card's LoRA weight, 0.125 for Hyper-SD3 / Hyper-FLUX, else 1); calls then default to its
    step count, timesteps, scheduler and guidance. ``set_adapter`` swaps or
    rescales it later.

    ``attention``: the attention kernel (``"sdpa"``, ``"sdpa-flash"``, ``"sdpa-math"``..., ``"xformers"``,
    or a diffusers attention backend; see :mod:`fastdiff.attention`); None keeps the pipeline's own
    (say xformers, enabled on it before).

    ``router``: a prompt router (``fastdiff tune route``): each prompt of a call runs on the pruned
    sub-network of its code, rows grouped by code, one denoiser call per group; outputs come back in
    the caller's order. :attr:`last_call_macs` reports the MACs of the last call's denoiser calls.

    ``cfg``: None follows diffusers (``"full"`` when guidance_scale > 1, else ``"none"``); ``"self"``
    or ``"initialize"`` use residual guidance at n (or n+1) rows per step instead of 2n.
    ``solver``: None takes the scheduler's own step (DDIM / Euler, LCM, TCD, DPM-Solver++ 2M as
    ``"dpmpp2m"``); for any other scheduler its timesteps with the DDIM / Euler step, and a warning.
    ``backend`` ("onnxruntime", "tensorrt", "aoti", "inductor" or "auto"; None: PyTorch) runs the
    denoiser (with a ControlNet pipeline's nets) and VAE as engines, built now or loaded from the
    engine cache, for up to ``engine_options["max_batch"]`` images per call (default 4: 8 denoiser rows with full CFG, what
    ``fastdiff build`` builds by default) at ``engine_options["resolutions"]``
    (default the model's native size); other options as for :class:`fastdiff.Stream`.
    """
    wrapped = AcceleratedPipeline(pipe, cfg=cfg, delta=delta, solver=solver, backend=backend,
                                  engine_options=engine_options, steps=steps, schedule=schedule, router=router,
                                  attention=attention)
    if adapter is not None:
        wrapped.set_adapter(adapter, adapter_scale, adapter_scheduler)
    return wrapped


def supported_base(pipe) -> type:
    """The diffusers pipeline class `pipe` is (or subclasses, like the custom pipelines in pipelines/)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED:
            return cls
    raise ValueError(f"pipe: {type(pipe).__name__} is not supported; fastdiff.accelerate takes one of "
                     f"{', '.join(sorted(SUPPORTED))}")


class AcceleratedPipeline(UsesPrepared, HoldsAdapter, HoldsRouter):
    def __init__(self, pipe, cfg=None, delta=1.0, solver=None, backend=None, engine_options=None, steps=None,
                 schedule=None, router=None, attention=None):
        base = supported_base(pipe)
        self.pipe = pipe
        self.task, module, output_class = SUPPORTED[base.__name__]
        self.control_arg = CONTROL_ARG.get(base.__name__)
        self.inpaint = base.__name__ in INPAINT
        self.reads_control = reads_control_latents(pipe)
        self.context = base.__name__ in CONTEXT_PIPELINES
        if self.context and backend is not None:
            raise ValueError(f"backend: {base.__name__}'s context picture runs on the PyTorch modules; engines for "
                             "it are not built yet (backend=None)")
        self.output_class = getattr(__import__(module, fromlist=[output_class]), output_class)
        self.cfg = check_mode(cfg) if cfg is not None else None
        self.delta = check_number(delta, "delta", 0.0)
        self.solver = solver
        if steps is not None and schedule is not None:
            raise ValueError("steps: give step indices (steps) or a searched schedule (schedule), not both")
        if isinstance(steps, (str, os.PathLike)):
            raise ValueError(f"steps: {steps!r} looks like a schedule file; give it as schedule=")
        self.steps = None if steps is None else validate_steps(steps, None)
        self.schedules = self._load_schedules(schedule)
        # Defaults (steps, guidance, strength) are the wrapped pipeline class's own.
        self.defaults = call_defaults(base)
        options = dict(engine_options) if isinstance(engine_options, dict) else engine_options
        # accelerate's own engine options: the largest batch and the sizes the engines must take
        max_batch = options.pop("max_batch", 4) if isinstance(options, dict) else 4
        resolutions = options.pop("resolutions", None) if isinstance(options, dict) else None
        check_int(max_batch, "engine_options['max_batch']", 1)
        self.parts = Prepared(pipe, backend, options)
        self._set_router(router)
        self.parts.set_attention(attention)
        self._finite = FiniteWatch()
        self._last_rows = None   # (model conditioning, latent shape) of the last call's denoiser calls
        self._warned_steps = set()   # scheduler classes already warned of (see _warn_step)
        self._num_timesteps, self._interrupt = 0, False   # the last call's, as a step-end callback reads them
        self._max_batch, self._resolutions = max_batch, resolutions or [self.parts.size(None, None)]
        if backend is not None:
            self._attach_engines()

    def _attach_engines(self, force: bool = False):
        """Engines for 1..max_batch images per call (2·max_batch denoiser rows, for full CFG)."""
        self.parts.attach_engines(2 * self._max_batch, self._max_batch, self._resolutions, best_rows=2,
                                  best_frames=1, force=force)

    def _load_schedules(self, schedule) -> dict:
        """{steps: Schedule} of the pipeline schedules given (each checked against the pipeline)."""
        if schedule is None:
            return {}
        from .tuning.schedules import load_schedule

        found = {}
        for item in schedule if isinstance(schedule, (list, tuple)) else [schedule]:
            loaded = load_schedule(item, self.pipe, mode="pipeline")
            if loaded.steps in found:
                raise ValueError(f"schedule: two schedules of {loaded.steps} steps")
            found[loaded.steps] = loaded
        return found

    @property
    def last_call_macs(self) -> float | None:
        """MACs of one denoiser call of the last ``__call__`` (every row, CFG's too, each row on its
        route's sub-network), by the shared counter; None before the first call."""
        return None if self._last_rows is None else self.parts.rows_macs(*self._last_rows)

    def refresh_engines(self):
        """Build (or load) the engines again for the denoiser's current weights — after a LoRA was
        loaded, fused or rescaled. No-op without a backend."""
        if self.parts.backend is not None:
            self._attach_engines(force=True)

    def set_adapter(self, adapter, scale: float | None = None, adapter_scheduler: str | None = None):
        """Attach another adapter (None: none), or rescale the one attached; engines follow (a rebuild
        from the cache key, which holds the LoRA state; PyTorch needs none)."""
        self._set_adapter(adapter, scale, adapter_scheduler)
        self.refresh_engines()
        return self

    def __getattr__(self, name):
        # Everything else (components, config, progress bars...) is the wrapped pipeline's.
        return getattr(self.__dict__["pipe"], name)

    def to(self, *args, **kwargs) -> "AcceleratedPipeline":
        self.pipe.to(*args, **kwargs)
        return self

    def _default(self, name, value):
        """The call's value, else the adapter's sampling, else the wrapped pipeline's default."""
        if value is not None:
            return value
        sampling = self.adapter.sampling if self.adapter is not None else None
        if sampling is not None and name in ("num_inference_steps", "guidance_scale", "eta"):
            return {"num_inference_steps": sampling.steps, "guidance_scale": sampling.guidance_scale,
                    "eta": sampling.eta}[name]
        return self.defaults.get(name)

    def __call__(self, *args, **kwargs):
        """The pipeline's call. ``cross_attention_kwargs={"scale": s}`` (SD, SDXL; SD3's and Flux's
        ``joint_attention_kwargs``) scales the LoRA layers of the denoiser and text encoders for this
        call, as diffusers does (PyTorch modules only)."""
        name = self._lora_scale_arg
        scale = self._lora_scale(kwargs.pop(name, None), name)
        if scale is None:
            return self._generate(*args, **kwargs)
        from diffusers.utils import scale_lora_layers, unscale_lora_layers

        modules = [m for m in (self.denoiser.original, *(getattr(self.pipe, n, None) for n in TEXT_ENCODERS))
                   if m is not None]
        for module in modules:
            scale_lora_layers(module, scale)
        try:
            return self._generate(*args, **kwargs)
        finally:
            for module in modules:
                unscale_lora_layers(module, scale)

    @property
    def _lora_scale_arg(self) -> str:
        """The wrapped pipeline class's name for its LoRA scale's argument."""
        return next((k for k in LORA_SCALE_ARGS if k in self.defaults), LORA_SCALE_ARGS[0])

    def _lora_scale(self, given, name: str) -> float | None:
        """The call's LoRA scale (None: none asked) from its ``name`` argument; what else the dict
        holds, the attention processors would take, and fastdiff's calls don't pass on."""
        if given is None:
            return None
        if not isinstance(given, dict) or set(given) - {"scale"}:
            raise ValueError(f"{name}: fastdiff.accelerate takes {{'scale': s}} (the LoRA scale) only, got {given!r}")
        scale = check_number(given.get("scale", 1.0), f"{name}['scale']")
        if scale != 1.0 and (self.parts.backend is not None or self.router is not None):
            raise ValueError(f"{name}: the LoRA scale of a call needs the PyTorch modules; engines "
                             "and a router's sub-networks hold their weights fixed (set_adapter(scale=...) rebuilds "
                             "the engines)")
        return scale

    @torch.inference_mode()
    def _generate(self, prompt=None, image=None, *, negative_prompt=None, height=None, width=None,
                  num_inference_steps=None, timesteps=None, sigmas=None, strength=None, guidance_scale=None,
                  guidance_rescale=None, eta=None, num_images_per_prompt=1, generator=None, latents=None,
                  output_type="pil", return_dict=True, prompt_embeds=None, negative_prompt_embeds=None,
                  pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, callback_on_step_end=None,
                  callback_on_step_end_tensor_inputs=("latents",), denoising_start=None, denoising_end=None,
                  **unsupported):
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and name not in self.defaults:   # SDXL's: the base and refiner's hand-over
                unsupported[name] = value
        control, options = self._family_arguments(unsupported)
        if self.control_arg == "image":   # a txt2img ControlNet pipeline's `image` is its control image
            control["control_image"], image = image, None
        _check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        embeds = dict(zip(EMBED_ARGS, (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                       negative_pooled_prompt_embeds)))
        check_output_type(output_type)
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        if guidance_rescale not in (None, 0, 0.0) and "guidance_rescale" not in self.defaults:
            raise ValueError(f"guidance_rescale: {type(self.pipe).__name__} has no guidance_rescale")
        denoiser, codec = self.denoiser, self.parts.current_codec()

        guidance_scale = check_number(self._default("guidance_scale", guidance_scale), "guidance_scale")
        embedded = None
        if denoiser.family == "flux":   # guidance_scale is the model's input; true_cfg_scale guides, where taken
            embedded = guidance_scale
            negative = negative_prompt is not None or negative_prompt_embeds is not None
            if negative and "negative_prompt" not in self.defaults:   # FLUX.1-Fill's
                raise ValueError(f"negative_prompt: {type(self.pipe).__name__} takes no negative prompt")
            true_cfg = check_number(options.get(TRUE_CFG_ARG, self.defaults.get(TRUE_CFG_ARG, 1.0)), TRUE_CFG_ARG)
            guidance_scale = true_cfg if negative else 1.0   # as the pipeline: no negative prompt, no guidance
        guidance_rescale = check_number(self._default("guidance_rescale", guidance_rescale) or 0.0, "guidance_rescale")
        cfg = self.cfg or ("full" if guidance_scale > 1 else "none")
        guider = make_guider(cfg, guidance_scale, self.delta, guidance_rescale if cfg == "full" else 0.0)
        if guidance_rescale and cfg != "full":
            raise ValueError(f"guidance_rescale applies to full guidance (guidance_scale > 1, cfg='full'), "
                             f"not cfg={cfg!r}")
        num_inference_steps = check_int(self._default("num_inference_steps", num_inference_steps),
                                        "num_inference_steps", 1)
        if strength is not None and self.task != "img2img":
            raise ValueError(f"strength applies to img2img; the txt2img {type(self.pipe).__name__} starts from noise")
        if timesteps is not None and sigmas is not None:
            raise ValueError("sigmas: give timesteps or sigmas, not both")
        given = next((name for name, value in (("strength", strength), ("timesteps", timesteps), ("sigmas", sigmas),
                                               ("denoising_start", denoising_start), ("denoising_end", denoising_end))
                      if value is not None), None)
        cutoffs = self._cutoffs(denoising_start, denoising_end)
        if self.steps is not None and given:
            raise ValueError(f"{given}: this pipeline was wrapped with steps={self.steps}, whose first step sets how "
                             "much of an image is kept; a call gives num_inference_steps at most")
        strength = check_number(self._default("strength", strength), "strength", 0.0, 1.0, low_open=True) \
            if self.task == "img2img" else 1.0
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        scheduler = self.scheduler

        pixels = masking = None
        if self.task == "img2img":
            if image is None:
                raise ValueError(f"image is required by {type(self.pipe).__name__}")
            crop = {}
            if self.inpaint:   # the model's native size unless given: the image is resized to it
                height, width = self.parts.size(height, width)
                crop = self._mask_crop(options, image, height, width, output_type)
            pixels = preprocessed(self.pipe.image_processor, image, "image", height, width, **crop)
            # latents given as the image (a base pipeline's output_type="latent"), as diffusers takes them
            given_latents = pixels.shape[1] == denoiser.in_channels and pixels.shape[1] != 3
            size = codec.scale_factor if given_latents else 1
            height, width = (int(v) * size for v in pixels.shape[-2:])
            if self.inpaint:
                masking = self._mask_inputs(options, image, pixels, given_latents, height, width, strength, latents,
                                            cutoffs, crop)
        elif image is not None and not self.context:
            raise ValueError(f"image is not an argument of the txt2img {type(self.pipe).__name__}")
        if self.context:   # Kontext's own size: max_area pixels at the asked aspect ratio
            height, width = kontext_size(self.pipe, height, width, options.get("max_area", self.defaults["max_area"]))
        if self.control_arg:
            control = self._control_inputs(control, height, width)
            height, width = control.size
        height, width = self.parts.size(height, width)
        texts = prompt_options(self.pipe, denoiser.family, self.defaults, options, height, width, self.parts.backend,
                               self.task)
        if denoiser.embeds_guidance:
            texts[GUIDANCE] = embedded
        cond, uncond = self.parts.encode(prompt, negative_prompt, height, width, per_prompt=num_images_per_prompt,
                                         route=self._route(), embeds=embeds, options=texts)
        batch = len(cond)
        self.parts.follow_engine_state()   # engines hold an IP-Adapter's scales: they follow them here
        cond, uncond = self.parts.image_prompt(cond, uncond, options.get("ip_adapter_image"),
                                               options.get("ip_adapter_image_embeds"), guidance_scale > 1)
        _check_generator(generator, batch)
        if pixels is not None and batch % pixels.shape[0]:
            raise ValueError(f"image has {pixels.shape[0]} images for a batch of {batch} prompts×images; give "
                             "one, or a number that divides the batch")
        if self.inpaint and batch % masking.mask.shape[0]:
            raise ValueError(f"mask_image has {masking.mask.shape[0]} masks for a batch of {batch} prompts×images; "
                             "give one, or a number that divides the batch")

        solver = self.solver
        searched = self.schedules.get(num_inference_steps)
        # a searched schedule or an adapter's timesteps: for whole trajectories whose steps the call leaves open
        whole = strength == 1.0 and self.steps is None and sigmas is None and cutoffs == (None, None)
        if timesteps is None and searched is not None and whole:
            timesteps, solver = searched.timesteps, self.solver or searched.solver
        sampling = self.adapter.sampling if self.adapter is not None else None
        if timesteps is None and whole and sampling is not None and sampling.timesteps \
                and num_inference_steps == sampling.steps:
            timesteps = list(sampling.timesteps)
        latent_shape = self.parts.latent_shape(height, width)
        # the family's own sigmas and shift by the image's size (Flux's), where the call leaves them open
        own_sigmas, mu = denoiser.schedule_arguments(scheduler, num_inference_steps, sigmas, latent_shape)
        sigmas = own_sigmas if timesteps is None else sigmas
        if self.steps is not None:
            steps = self.steps
        elif timesteps is not None:
            # img2img runs the last of them that its strength (or denoising_start) leaves, as diffusers' pipelines do
            timesteps = validate_timesteps(timesteps, scheduler.config.num_train_timesteps, is_flow_scheduler(scheduler))
            timesteps = timesteps[self._first_step(timesteps, strength, cutoffs[0], mu):]
            steps = None
        else:
            values = self._timesteps_of(num_inference_steps, sigmas, mu)
            num_inference_steps = len(values)   # sigmas make as many steps as the scheduler's rule says
            steps = list(range(self._first_step(values, strength, cutoffs[0], mu), num_inference_steps))
        stop = None
        if cutoffs[1] is not None:   # denoising_end: the steps down to it, the last going to the next timestep
            run = timesteps if steps is None else [values[i] for i in steps]
            stop = sum(t >= cutoffs[1] for t in run)
            if not stop:
                raise ValueError(f"denoising_end={denoising_end} leaves no step to run")
            steps, timesteps = (steps[:stop + 1], None) if steps is not None else (None, timesteps[:stop + 1])
        if solver is None:
            solver = own_solver(scheduler)
            if solver == "dpmpp2m" and guider.carries_residual:
                solver = None   # residual guidance keeps the rows' state: the first-order step instead
            if solver is None:
                self._warn_step(scheduler)
        # eta reaches the schedulers whose step takes it (DDIM, TCD), as in the pipeline; others ignore it
        eta = check_number(self._default("eta", eta) or 0.0, "eta", 0.0)
        eta = eta if "eta" in inspect.signature(scheduler.step).parameters else 0.0
        schedule = step_schedule(scheduler, steps, timesteps, num_inference_steps, solver, eta, sigmas=sigmas, mu=mu)
        if stop is not None and stop < len(schedule):
            schedule = schedule.first(stop)
        if self.control_arg:
            denoiser.set_scales(control.scales, control.keep(schedule.timesteps.tolist()),
                                control.guess_mode or denoiser.global_pool, control.modes)

        from diffusers.utils.torch_utils import randn_tensor

        if latents is not None:
            if "latents" not in self.defaults:
                raise ValueError(f"latents: {type(self.pipe).__name__} takes no latents")
            latents = denoiser.unpack(latents, latent_shape)   # as the pipeline shows them (Flux's packed)
            if tuple(latents.shape) != (batch,) + latent_shape:
                raise ValueError(f"latents must have shape {(batch,) + latent_shape}, got {tuple(latents.shape)}")
            check_finite(latents, "latents")
            latents = latents.to(denoiser.device, denoiser.dtype)
        # img2img given latents starts from them, noised already, as the pipelines do (the image unread)
        noised = latents if latents is not None and self.task == "img2img" and not self.inpaint else None
        clean = None
        if self.context and image is not None:
            context = context_latents(self.pipe, codec, image, options.get("_auto_resize", True))
            cond, uncond = with_context(context, cond, uncond)
        if self.control_arg:   # pictures nets read as latents encoded before the noise is drawn, as pipelines do
            pictures = control.rows(len(cond) // num_images_per_prompt, num_images_per_prompt)
            cond, uncond = denoiser.with_pictures(cond, uncond, pictures, control, codec=codec, generator=generator,
                                                  guided=guidance_scale > 1, embedded_guidance=embedded)
        if self.reads_control:   # encoded before the noise is drawn, as the pipeline does
            cond, uncond = self._with_control_latents(options.get(CONTROL_LATENTS_ARG), codec, cond, uncond, height,
                                                      width, num_images_per_prompt, generator)
        if self.inpaint:   # as diffusers' inpainting pipelines: the image only where it is needed
            if not masking.reads_mask or strength < 1.0 or masking.encodes_image:
                clean = masking.encode(codec, pixels.to(denoiser.device), batch, generator)
        elif pixels is not None and noised is None:
            clean = self._encode_images(codec if not given_latents else None, pixels.to(denoiser.device), batch,
                                        generator)
        if cutoffs[0] is not None and noised is None:   # denoising_start: the image's latents, noised already
            noised = clean
        if noised is not None:
            noise = None
        elif latents is not None:
            noise = latents
        else:
            noise = randn_tensor((batch,) + latent_shape, generator=generator, device=denoiser.device,
                                 dtype=denoiser.dtype)
        start = clean
        if self.inpaint:
            cond, uncond = masking.rows(codec, cond, uncond, batch, latent_shape, generator)
            if strength == 1.0:
                start = None   # pure noise at the first timestep, as the pipeline starts
            if not masking.reads_mask:   # the known region blended back after each step
                callback_on_step_end = masking.blend_after_steps(scheduler, clean, noise, schedule.timesteps,
                                                                 callback_on_step_end, denoiser)
        # One slot per step, the whole batch as its frames; noise drawn as the pipeline draws it.
        stream = LatentStream(denoiser, schedule, cond, uncond, latent_shape, guider=guider, noise="fresh",
                              generator=generator)
        t_rows = torch.zeros(len(cond), device=denoiser.device)
        self._last_rows = (guider.model_conditioning(t_rows, cond, uncond, len(cond))[1], latent_shape)
        self._num_timesteps, self._interrupt = len(schedule), False
        if noised is not None:   # held as the pipeline holds them (Euler: x0 + σ·ε)
            finished = stream.push(None, start=noised / schedule.held_scale_in)
        else:
            finished = stream.push(start, noise=noise)
        if callback_on_step_end is not None:
            latents = self._steps_with_callback(stream, finished, schedule.timesteps, schedule.held_scale.tolist(),
                                                callback_on_step_end)
        else:   # as the pipeline holds them: only a trajectory stopped part-way differs
            latents = (finished if finished is not None else stream.drain()[0]).latents * float(schedule.held_scale[-1])
        return self._output(latents, output_type, return_dict, codec, masking and masking.overlay)

    def _family_arguments(self, extra: dict) -> tuple[dict, dict]:
        """(ControlNet arguments, other arguments) of a call's keywords beyond the common ones, where
        the wrapped pipeline class takes them: a ControlNet pipeline's, SDXL's and SD3's other
        prompts and size conditions, an IP-Adapter's image prompt (None: the pipeline's default).
        Any other keyword is a TypeError listing what the call takes."""
        extra = dict(extra)
        control_args = tuple(k for k in CONTROL_ARGS if k in self.defaults) if self.control_arg else ()
        control = {k: extra.pop(k) for k in control_args if k in extra}
        family = tuple(k for k in (*TEXT_OPTIONS, *SIZE_CONDITIONS, *IMAGE_PROMPT_ARGS, *INPAINT_ARGS, TRUE_CFG_ARG,
                                   CONTROL_LATENTS_ARG, *KONTEXT_ARGS) if k in self.defaults)
        options = {k: extra.pop(k) for k in family if k in extra}
        if extra:
            accepted = ACCEPTED_ARGS + (self._lora_scale_arg,) + family + control_args
            raise TypeError(f"fastdiff.accelerate does not take {sorted(extra)} for {type(self.pipe).__name__}; "
                            f"it accepts {accepted}")
        return control, {k: v for k, v in options.items() if v is not None}

    def _mask_crop(self, options: dict, image, height: int, width: int, output_type) -> dict:
        """An inpainting call's ``padding_mask_crop`` as the image processors' crop (see
        :func:`fastdiff.inpaint_inputs.mask_crop`); {} without one."""
        from .inpaint_inputs import mask_crop

        return mask_crop(self.pipe, options.get("padding_mask_crop"), image, options.get("mask_image"), height,
                         width, output_type)

    def _mask_inputs(self, options: dict, image, pixels, given_latents: bool, height: int, width: int,
                     strength: float, latents, cutoffs, crop: dict):
        """An inpainting call's mask and masked picture, checked (see :mod:`fastdiff.inpaint_inputs`)."""
        from .inpaint_inputs import mask_inputs

        for name, value in (("denoising_start", cutoffs[0]), ("denoising_end", cutoffs[1])):
            if value is not None:
                raise ValueError(f"{name}: fastdiff.accelerate runs an inpainting call's whole trajectory")
        if latents is not None and strength < 1.0:
            raise ValueError("latents: an inpainting call given its latents starts from them as pure noise (as "
                             "diffusers' does); give strength=1 with them")
        if given_latents:
            raise ValueError("image: an inpainting call takes pictures, not latents")
        return mask_inputs(self.pipe, options.get("mask_image"), options.get("masked_image_latents"), pixels, height,
                           width, crop, image)

    def _with_control_latents(self, picture, codec, cond, uncond, height: int, width: int, per_prompt: int,
                              generator):
        """FLUX.1 Canny / Depth's rows carrying their control picture's latents: the picture (one, or
        one per prompt) at the call's size, repeated for the rows and drawn from the VAE's posterior
        with the call's generator, as the pipeline draws it."""
        name = type(self.pipe).__name__
        if picture is None:
            raise ValueError(f"control_image is required by {name}")
        if isinstance(picture, torch.Tensor):   # the pipeline's: a tensor is the VAE's input as it is, [-1, 1]
            if picture.dim() != 4 or tuple(picture.shape[1:]) != (3, height, width):
                raise ValueError(f"control_image: a tensor is taken as the VAE's input, [n, 3, {height}, {width}] in "
                                 f"[-1, 1] (as {name} takes it); got {tuple(picture.shape)}")
            check_finite(picture, CONTROL_LATENTS_ARG)
            pixels = picture
        else:
            pixels = preprocessed(self.pipe.image_processor, picture, CONTROL_LATENTS_ARG, height, width)
        rows = len(cond)
        if pixels.shape[0] == 1:
            pixels = pixels.repeat(rows, 1, 1, 1)
        elif pixels.shape[0] * per_prompt == rows:
            pixels = pixels.repeat_interleave(per_prompt, 0)
        else:
            raise ValueError(f"control_image: give one picture or one per prompt ({rows // per_prompt}), got "
                             f"{pixels.shape[0]}")
        latents = codec.encode(pixels.to(self.denoiser.device), sample=True, generator=generator)
        return with_control(cond, latents), with_control(uncond, latents)

    def _control_inputs(self, given: dict, height, width):
        """A ControlNet pipeline call's control arguments, checked; defaults the pipeline's own."""
        from .control_inputs import control_inputs

        d = self.denoiser
        value = lambda name: given.get(name) if given.get(name) is not None else self.defaults.get(name)
        count = d.condition_count(given.get("control_image"), given)
        if d.pictures_at_native_size:
            height, width = self.parts.size(height, width)
        control = control_inputs(self.pipe, count, given.get("control_image"), value("controlnet_conditioning_scale"),
                                 value("control_guidance_start"), value("control_guidance_end"),
                                 given.get("guess_mode", False), height, width, self.control_arg)
        control.modes = d.check_modes(given.get("control_mode"), count)
        return control

    @staticmethod
    def _encode_images(codec, pixels, batch: int, generator):
        """img2img's latents of `pixels` for a batch of `batch`, as diffusers' pipelines make them:
        the images encoded (a draw of the posterior) and repeated whole until the batch is full — or,
        with one generator per image, repeated first and each encoded with its own. No `codec`:
        `pixels` are latents already."""
        times = batch // pixels.shape[0]
        if codec is None:
            return pixels.repeat(times, 1, 1, 1)
        if isinstance(generator, (list, tuple)):
            return codec.encode(pixels.repeat(times, 1, 1, 1), sample=True, generator=list(generator))
        return codec.encode(pixels, sample=True, generator=generator).repeat(times, 1, 1, 1)

    def _cutoffs(self, denoising_start, denoising_end) -> tuple:
        """SDXL's hand-over between a base and a refiner pipeline, as timesteps: the refiner runs the
        steps below ``denoising_start``'s (whatever the strength), the base those down to
        ``denoising_end``'s, diffusers' rounding."""
        train = self.scheduler.config.num_train_timesteps
        cut = lambda v, name: None if v is None else \
            int(round(train - check_number(v, name, 0.0, 1.0, low_open=True, high_open=True) * train))
        start, end = cut(denoising_start, "denoising_start"), cut(denoising_end, "denoising_end")
        if start is not None and end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
        return start, end

    def _timesteps_of(self, num_inference_steps: int, sigmas, mu) -> list[float]:
        """The timestep of each step of the scheduler's schedule (of `sigmas` when given, shifted by `mu`)."""
        from .sampling.schedule import distinct_steps

        steps = set_schedule(self.scheduler, num_inference_steps, sigmas, mu)
        return self.scheduler.timesteps[distinct_steps(self.scheduler, steps)].tolist()

    def _first_step(self, values: list, strength: float, start_cutoff, mu=None) -> int:
        """Where a call's run starts in a schedule of timesteps `values`: the first below the
        hand-over's cut-off, else where img2img's strength leaves (0 for txt2img)."""
        if start_cutoff is None:
            return len(values) - self._steps_left(len(values), strength, mu)
        first = next((i for i, t in enumerate(values) if t < start_cutoff), len(values))
        if first == len(values):
            raise ValueError("denoising_start leaves no step to run")
        return first

    def _steps_left(self, num_inference_steps: int, strength: float, mu=None) -> int:
        """How many of `num_inference_steps` steps a call at `strength` runs: all for txt2img, for
        img2img the pipeline's own rounding of strength to a first step (SD and SD3 round differently)."""
        if self.task != "img2img":
            return num_inference_steps
        scheduler = self.scheduler
        set_schedule(scheduler, num_inference_steps, mu=mu)
        if scheduler is self.pipe.scheduler:
            left = len(self.pipe.get_timesteps(num_inference_steps, strength, self.denoiser.device)[0])
        else:   # an adapter's own scheduler: SD's rounding
            left = min(int(num_inference_steps * strength), num_inference_steps)
        if not left:
            raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} leaves no step to run")
        return left

    # What a step-end callback may read of the pipeline, as diffusers' pipelines show it
    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _steps_with_callback(self, stream, finished, timesteps, scales, callback) -> torch.Tensor:
        """The call's steps one at a time (the first already taken), with ``callback(self, i, t,
        {"latents": ...})`` after each, as diffusers' loop calls it, the latents as the pipeline
        holds them (the stream's times ``scales[i]``): latents it returns replace the call's; setting
        ``_interrupt`` stops the steps, and the latents reached are decoded."""
        for i, t in enumerate(timesteps):
            if i:
                finished = stream.advance()
            group = finished if finished is not None else next(slot for slot in stream.slots if slot is not None)
            held = group.latents * scales[i] if scales[i] != 1 else group.latents
            latents = self.denoiser.pack(held)   # as the pipeline shows them (Flux's packed)
            out = callback(self, i, t, {"latents": latents})
            if not isinstance(out, dict):
                raise ValueError(f"callback_on_step_end must return a dict (of the tensors it changes), "
                                 f"got {type(out).__name__}")
            changed = out.get("latents", latents)
            if changed is not latents:
                if not isinstance(changed, torch.Tensor) or changed.shape != latents.shape:
                    raise ValueError(f"callback_on_step_end returned latents of shape "
                                     f"{tuple(getattr(changed, 'shape', ()))}; the step's are {tuple(latents.shape)}")
                check_finite(changed, "the latents callback_on_step_end returned")
                latents = changed.to(latents.device, latents.dtype)
                held = self.denoiser.unpack(latents, tuple(held.shape[1:]))
                group.latents = held / scales[i] if scales[i] != 1 else held
            if self._interrupt:
                break
        return held

    def _warn_step(self, scheduler) -> None:
        """Once per scheduler class: fastdiff does not run its own step here, so the images are not
        the wrapped pipeline's."""
        name = type(scheduler).__name__
        if name in self._warned_steps:
            return
        self._warned_steps.add(name)
        warnings.warn(f"{name}'s own step is not one fastdiff runs here: fastdiff.accelerate takes its timesteps "
                      "with the first-order DDIM / Euler step, so the images differ from the pipeline's own. For "
                      "the pipeline's images, give it a DDIM, Euler, LCM, TCD or DPM-Solver++ 2M scheduler (the "
                      "last with cfg 'full' or 'none'); pass solver='ddim' to take this step knowingly.", stacklevel=3)

    def _output(self, latents, output_type, return_dict, codec, overlay=None):
        """The call's output; `overlay` (an inpainting call's with ``padding_mask_crop``) pastes the
        pictures made into the given picture's crop, as the pipeline does."""
        if output_type == "latent":
            images = self.denoiser.pack(latents)
        else:
            decoded = codec.decode(latents)
            self._finite.check(latents, decoded)
            images = self.pipe.image_processor.postprocess(decoded, output_type=output_type)
            if overlay is not None:
                images = [overlay(image) for image in images]
        fields = {"images": images}
        if "nsfw_content_detected" in self.output_class.__dataclass_fields__:
            fields["nsfw_content_detected"] = None
        if not return_dict:
            return tuple(fields.values())
        return self.output_class(**fields)


def _check_callback(callback, tensor_inputs) -> None:
    """A step-end callback reads and changes the latents only: the prompt embeddings and the
    guidance of a call are fixed when its rows are built (diffusers' CFG cut-off callbacks ask for
    them and are refused)."""
    if callback is None:
        return
    if not callable(callback):
        raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    asked = getattr(callback, "tensor_inputs", tensor_inputs)   # diffusers' PipelineCallback objects name their own
    if isinstance(asked, str) or not isinstance(asked, (list, tuple)) or set(asked) - {"latents"}:
        raise ValueError(f"callback_on_step_end_tensor_inputs: fastdiff.accelerate gives a step-end callback "
                         f"the latents only, got {asked!r}")


def _check_generator(generator, batch: int) -> None:
    """None, a torch.Generator, or one per image of the call, as the diffusers pipelines take them."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    if len(generator) != batch:
        raise ValueError(f"generator: {len(generator)} generators for a batch of {batch} images")
