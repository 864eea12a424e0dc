"""`fastdiff.Stream`: a diffusers pipeline as a real-time frame stream, one denoiser call per frame."""

from __future__ import annotations

import os

import torch

from .checks import check_choice, check_int, check_number, check_seed
from .control_nets import ControlNetsAround
from .controlnet import ControlledDenoiser
from .denoiser import EMBED_ARGS, GUIDANCE
from .images import FiniteWatch, check_output_type, from_model_tensor, signed, to_model_tensor
from .channel_inputs import ChannelInputsDenoiser
from .sampling.guiders import make_guider
from .stream.batch import NOISE_MODES, LatentStream
from .stream.prepare import Prepared, UsesPrepared
from .stream.similarity import SimilarityFilter
from .stream.whole import WHOLE_BACKENDS, WholeStep
from .text_inputs import SIZE_CONDITIONS, TEXT_OPTIONS, call_defaults, prompt_options
from .tuning.adapters import HoldsAdapter
from .tuning.routers import HoldsRouter

MODES = ("img2img", "txt2img")
DEFAULT_STEPS = {"img2img": [32, 45], "txt2img": [0, 16, 32, 45]}
# each side of a prompt, given as text or as the embeddings that stand in for it
PROMPT_SIDES = (("prompt", ("prompt_embeds", "pooled_prompt_embeds")),
                ("negative_prompt", ("negative_prompt_embeds", "negative_pooled_prompt_embeds")))


class Stream(UsesPrepared, HoldsAdapter, HoldsRouter):
    """Real-time img2img or txt2img over a diffusers pipeline.

    ``steps`` index the scheduler's ``num_inference_steps``-step schedule (noisiest first);
    ``timesteps`` gives the timesteps instead; ``steps`` may also be a searched schedule (a path
    or a :class:`fastdiff.tuning.Schedule` from ``fastdiff tune steps --mode stream``), whose
    timesteps and solver the stream then runs. Every call to the stream runs the denoiser once, on
    n·F rows for n steps and F = ``frame_buffer`` frames per call (2·n·F with ``cfg="full"``,
    (n+1)·F with ``cfg="initialize"``). ``guidance_rescale`` (φ, with ``cfg="full"``) is diffusers'
    fix for over-exposure at high guidance.

    Output lags input by n−1 calls: a frame's result comes out of the call n−1 calls after the one
    it went into, and calls return None until the stream is full. :meth:`flush` returns the frames
    still in flight. With ``frame_buffer`` F > 1 a call takes a list of F frames and returns a list
    of F outputs. A call's ``tag`` comes back as :attr:`last_tag` with the output of its frame.

    ``similarity_filter`` (a threshold such as 0.98) skips inputs too similar to the last processed
    one, returning the previous output; skips are counted in :attr:`skipped_frames`.

    ``backend`` ("onnxruntime", "tensorrt", "aoti", "inductor" or "auto"; None: PyTorch as it is)
    runs the denoiser and the VAE as engines, built at :meth:`prepare` for the stream's row count
    and resolution or loaded from the engine cache. ``engine_options`` passes ``components``,
    ``precision``, ``cache_dir``, ``rebuild``, ``compile_mode``, ``threads``, ``workers`` (ONNX
    Runtime: denoiser calls side by side, see :meth:`fastdiff.denoiser.Denoiser.set_workers`) and
    ``tensorrt`` on (see :mod:`fastdiff.engines`).

    ``adapter`` loads a LoRA into the denoiser (see :func:`fastdiff.accelerate`); the stream then
    samples with its scheduler, and a txt2img stream with its timesteps. :meth:`set_adapter` swaps or
    rescales it while streaming.

    ``compile="whole"`` compiles the whole steady-state step — encode, denoiser, step, decode — as one
    graph once the stream is full; the calls that fill the stream run eagerly. ``compile_backend``
    "inductor" uses ``torch.compile`` (on CUDA with CUDA graphs, ``"reduce-overhead"``, unless
    ``compile_mode`` says otherwise); "onnxruntime" exports the step to ONNX once and runs it in one
    ONNX Runtime session. A prompt change needs no rebuild; a change of guidance, steps, size, VAE
    or adapter rebuilds the graph at the next full call (see :mod:`fastdiff.stream.whole`).

    ``attention`` picks the attention kernel (``"sdpa"``, ``"sdpa-flash"``..., ``"xformers"``, or a
    diffusers backend: :mod:`fastdiff.attention`); None keeps the pipeline's own (say xformers,
    enabled on it before).

    ``router`` routes the prompt (each frame's, with F > 1) to a pruned sub-network at
    :meth:`prepare` / :meth:`update`; frames of different codes are grouped, one call per group;
    :attr:`macs_per_call` counts a full call's MACs.

    A ControlNet pipeline's stream takes a ``control_image`` with each call (one, or F with
    ``frame_buffer`` F; a list of one per net with a MultiControlNetModel), or keeps the one given to
    :meth:`prepare` / :meth:`update`. Each frame's control image stays with it through its steps,
    beside the other frames' own. ``controlnet_conditioning_scale`` (changed by :meth:`update`) and
    ``guess_mode`` are diffusers'. SDXL's Union nets (ControlNet++) take ``control_mode``, the kind of
    control of each picture (an int, or a list: then each ``control_image`` is a list of one picture
    per kind). On engines the UNet takes the nets' residuals as inputs and each net is an engine of
    its own (not yet a Union net's); the compiled whole step is not made for a ControlNet stream.

    ``cfg`` None is ``"self"`` at ``guidance_scale`` 1.2 (StreamDiffusion's defaults) — except for a
    Flux pipeline, drawn without guidance rows as its own pipeline draws: there ``guidance_scale``
    is what the pipeline calls it, a guidance-distilled model's input (FLUX.1-dev's, default the
    pipeline's), and the stream's schedule is shifted for its image size as the pipeline shifts it.
    """

    def __init__(self, pipe, steps=None, *, timesteps=None, num_inference_steps: int = 50,
                 cfg: str | None = None, guidance_scale: float | None = None, delta: float = 1.0,
                 guidance_rescale: float = 0.0,
                 frame_buffer: int = 1, similarity_filter: float | None = None, max_skip_frames: int = 10,
                 mode: str = "img2img", solver: str | None = None, noise: str = "fixed", seed: int = 0,
                 height: int | None = None, width: int | None = None, output_type: str = "pt",
                 backend: str | None = None, engine_options: dict | None = None, adapter=None,
                 adapter_scale: float | None = None, adapter_scheduler: str | None = None, router=None,
                 attention: str | None = None, compile: str | None = None, compile_backend: str = "inductor",
                 compile_mode: str | None = None, controlnet_conditioning_scale=1.0, guess_mode: bool = False,
                 control_mode=None):
        self.mode = check_choice(mode, "mode", MODES)
        self.frame_buffer = check_int(frame_buffer, "frame_buffer", 1)
        check_choice(noise, "noise", NOISE_MODES)
        self.solver = solver
        self.noise = noise
        self.output_type = check_output_type(output_type)
        check_number(similarity_filter, "similarity_filter", 0.0, 1.0, low_open=True, high_open=True, optional=True)
        self.pipe = pipe
        self.parts = Prepared(pipe, backend, engine_options)
        self._defaults = call_defaults(pipe)
        self.guider, embedded = self._guiders(cfg, guidance_scale, delta, guidance_rescale)
        if isinstance(self.denoiser, ChannelInputsDenoiser):
            raise ValueError(f"pipe: {type(pipe).__name__}'s denoiser reads {self.denoiser.reads} with every row; "
                             f"a Stream does not run {self.denoiser.kind} yet (fastdiff.accelerate does)")
        if isinstance(self.denoiser, ControlNetsAround) and not self.denoiser.streams:
            raise ValueError(f"pipe: a Stream does not run {type(pipe).__name__}'s ControlNets yet (each frame's "
                             "control picture encoded and carried through its steps); fastdiff.accelerate does")
        self.generator = torch.Generator(self.denoiser.device).manual_seed(check_seed(seed))
        self.filter = (SimilarityFilter(float(similarity_filter), max_skip_frames, seed)
                       if similarity_filter is not None else None)
        self._pending = None   # an engine rebuild running in the background (set_adapter(wait=False))
        self._set_router(router)
        self.parts.set_attention(attention)
        self.compile = check_choice(compile, "compile", (None, "whole"))
        self.compile_backend = check_choice(compile_backend, "compile_backend", WHOLE_BACKENDS)
        if self.compile and backend is not None:
            raise ValueError(f"compile: 'whole' compiles the PyTorch modules as one graph; backend={backend!r} makes "
                             "each an engine of its own: give one of the two")
        self.compile_mode = compile_mode
        self._set_control(controlnet_conditioning_scale, guess_mode, control_mode)
        self._image_prompt = (None, None)   # an IP-Adapter's image prompt: (image, embeddings)
        self._whole = None   # the compiled steady step, made when the stream first fills
        if adapter is not None:
            self._set_adapter(adapter, adapter_scale, adapter_scheduler)
        if steps is None and timesteps is None:
            steps, timesteps = self._default_steps()
        steps, timesteps, self.solver = self._searched(steps, timesteps, solver)
        self.num_inference_steps = num_inference_steps
        self.steps, self.timesteps = steps, timesteps
        self.height, self.width = self.parts.size(height, width)
        self.schedule = self.parts.step_schedule(steps, timesteps, num_inference_steps, self.solver, self.height,
                                                 self.width)
        self.prompt = self.negative_prompt = None
        self._embeds = {}   # the prompt embeddings given in place of prompt or negative prompt
        # the other prompts and size conditioning given (text_inputs); a guidance-distilled model's guidance
        self._text = {} if embedded is None else {GUIDANCE: embedded}
        self.latents: LatentStream | None = None
        self.last_skipped = False
        self.last_tag = None
        self._last_output = None
        self._finite = FiniteWatch()

    # -- what it runs (held once: in the parts, the guider and the latent stream) ----------------
    @property
    def cfg(self) -> str:
        return self.guider.mode

    @property
    def guidance_scale(self) -> float:
        """The guider's scale; a guidance-distilled model's input, for such a model."""
        return self._text.get(GUIDANCE, self.guider.scale)

    def _guiders(self, cfg, guidance_scale, delta, guidance_rescale) -> tuple:
        """(guider, a guidance-distilled model's guidance input or None) for the arguments given."""
        if not self.denoiser.embeds_guidance:
            default_cfg = self.denoiser.stream_cfg
            return make_guider(cfg or default_cfg, 1.2 if guidance_scale is None else guidance_scale, delta,
                               guidance_rescale), None
        if cfg not in (None, "none"):
            raise ValueError(f"cfg: {type(self.pipe).__name__}'s model is guidance-distilled (guidance_scale is its "
                             f"input); its stream draws without guidance rows, cfg='none', not {cfg!r}")
        scale = self._defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        return make_guider("none", 1.0, delta, guidance_rescale), check_number(scale, "guidance_scale")

    @property
    def delta(self) -> float:
        return self.guider.delta

    @property
    def guidance_rescale(self) -> float:
        return self.guider.rescale

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.parts.latent_shape(self.height, self.width)

    # -- set-up ----------------------------------------------------------------------------------
    def prepare(self, prompt=None, negative_prompt=None, *, prompt_embeds=None, negative_prompt_embeds=None,
                pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, control_image=None,
                ip_adapter_image=None, ip_adapter_image_embeds=None, **text_options):
        """Encode the prompt and start the stream. On a running stream this is a prompt change.
        Embeddings made elsewhere (e.g. weighted prompts) may stand in for either prompt, as diffusers'
        pipelines take them: one row, or one per frame of the buffer. `control_image`: a ControlNet
        pipeline's, for the calls that give none. `ip_adapter_image` (or its embeddings, the negative
        ones first with cfg "full" or "initialize"): an image prompt, with an IP-Adapter loaded.
        `text_options`: what the pipeline class's call takes of ``prompt_2``, ``negative_prompt_2``,
        ``prompt_3``, ``negative_prompt_3``, ``clip_skip``, ``max_sequence_length`` and SDXL's size
        conditioning (``original_size``, ``target_size``, ``crops_coords_top_left``, their negative
        pairs, a refiner's aesthetic scores), as diffusers takes them."""
        embeds = dict(zip(EMBED_ARGS, (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                       negative_pooled_prompt_embeds)))
        if self.latents is not None:
            self.update(prompt=prompt, negative_prompt=negative_prompt, control_image=control_image,
                        ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds, **embeds,
                        **text_options)
            return
        text = self._text_after(text_options, "prepare")
        if control_image is not None:
            self._standing_control, self._standing_source = self._control_rows(control_image), control_image
        state = self._prompt_state(prompt, negative_prompt, embeds)
        image_prompt = self._image_prompt_after(ip_adapter_image, ip_adapter_image_embeds)
        self._cond = self._encoded(state, (self.height, self.width), image_prompt, text)
        self.prompt, self.negative_prompt, self._embeds = state
        self._image_prompt, self._text = image_prompt, text
        self._start()

    def _text_after(self, given: dict, method: str) -> dict:
        """The stream's other prompts and size conditioning after a change: each one given (not None)
        replaces the stream's; a name the pipeline class's call doesn't take is a TypeError."""
        accepted = tuple(k for k in (*TEXT_OPTIONS, *SIZE_CONDITIONS) if k in self._defaults)
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise TypeError(f"Stream.{method}() got {unknown}, which {type(self.pipe).__name__} does not take; "
                            f"of the pipeline's prompt options it takes {accepted}")
        return {**self._text, **{k: v for k, v in given.items() if v is not None}}

    def _prompt_state(self, prompt, negative_prompt, embeds: dict) -> tuple:
        """(prompt, negative prompt, embeddings) after a change: a side given anew — as text or as
        embeddings — replaces that side whole; a side not given stays as it was."""
        texts = {"prompt": prompt, "negative_prompt": negative_prompt}
        state = {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
        kept = dict(self._embeds)
        for side, names in PROMPT_SIDES:
            if texts[side] is not None or any(embeds.get(n) is not None for n in names):
                state[side] = texts[side]
                kept = {k: v for k, v in kept.items() if k not in names}
                kept.update({n: embeds[n] for n in names if embeds.get(n) is not None})
        return state["prompt"], state["negative_prompt"], kept

    def _image_prompt_after(self, image, embeds) -> tuple:
        """The image prompt after a change: the one given (image or embeddings), else the stream's."""
        return (image, embeds) if image is not None or embeds is not None else self._image_prompt

    def _encoded(self, state: tuple, size, image_prompt: tuple, text: dict):
        """(cond, uncond) of a prompt state at `size` (SDXL's conditioning holds the image size), routed,
        with the image prompt and other prompts."""
        prompt, negative_prompt, embeds = state
        self.parts.follow_engine_state()   # engines hold an IP-Adapter's scales: they follow them here
        options = prompt_options(self.pipe, self.denoiser.family, self._defaults, text, *size, self.backend)
        if GUIDANCE in text:
            options[GUIDANCE] = text[GUIDANCE]
        cond, uncond = self.parts.encode(prompt, negative_prompt, *size, frames=self.frame_buffer, route=self._route(),
                                         embeds=embeds, options=options)
        guided = self.guider.mode in ("full", "initialize")   # the modes with unconditional rows
        cond, uncond = self.parts.image_prompt(cond, uncond, *image_prompt, guided)
        if self._controlled:   # the rows' control images travel with their frames; guess mode's uncond rows go without
            d = self.denoiser
            cond, uncond = d.with_images(cond, None, True), d.with_images(uncond, None, not self._guess_mode)
        return cond, uncond

    def _start(self):
        cond, uncond = self._cond
        self.latents = LatentStream(self.denoiser, self.schedule, cond, uncond, self.latent_shape,
                                    guider=self.guider, noise=self.noise, generator=self.generator, packed=True)
        self._drop_whole()
        self._last_output = None
        if self.filter is not None:
            self.filter.reset()
        self._attach_engines()

    def _attach_engines(self, force: bool = False):
        """Engines for the stream's rows per call and resolution (once full the row count is fixed,
        so the batch profile is static at that count); again only when either changes."""
        self.parts.attach_engines(self.latents.rows_per_call, self.frame_buffer, [(self.height, self.width)],
                                  force=force)

    def refresh_engines(self):
        """Build (or load) the engines again for the denoiser's current weights — after a LoRA was
        loaded, fused or rescaled — as :meth:`set_vae` does for a new VAE. No-op without a backend."""
        self._require_prepared()
        self._drop_whole()
        self._attach_engines(force=True)

    def update(self, *, prompt=None, negative_prompt=None, guidance_scale=None, delta=None, guidance_rescale=None,
               steps=None, timesteps=None, num_inference_steps=None, height=None, width=None,
               with_tags: bool = False, prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
               negative_pooled_prompt_embeds=None, control_image=None, controlnet_conditioning_scale=None,
               ip_adapter_image=None, ip_adapter_image_embeds=None, **text_options) -> list:
        """Change settings at run time, without rebuilding anything.

        Prompt, negative prompt (or their embeddings, as :meth:`prepare` takes them), guidance scale,
        delta, rescale and a ControlNet's conditioning scale apply from the next call on, to the
        frames in flight as well; a control image, to the calls that give none; an image prompt (as
        :meth:`prepare` takes it) and the other prompts and size conditioning (`text_options`, as
        :meth:`prepare` takes them), to every frame from the next call on; None leaves a
        setting as it is (a negative prompt is dropped by a new stream, not here). Steps and
        resolution change the stream's shape: the frames in flight are first finished with the old
        settings and returned (oldest first), so none is lost — as (tag, output) pairs with
        `with_tags`, as :meth:`flush_tagged` gives them.
        """
        self._require_prepared()
        embeds = dict(zip(EMBED_ARGS, (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                       negative_pooled_prompt_embeds)))
        # Everything is checked, and the prompts encoded, before anything changes: a bad argument
        # leaves the stream as it was, its frames in flight still in it.
        guider, embedded = self.guider, None
        if guidance_scale is not None and self.denoiser.embeds_guidance:   # the model's input: its rows change
            embedded, guidance_scale = check_number(guidance_scale, "guidance_scale"), None
        if any(v is not None for v in (guidance_scale, delta, guidance_rescale)):
            guider = make_guider(guider.mode, guider.scale if guidance_scale is None else guidance_scale,
                                 guider.delta if delta is None else delta,
                                 guider.rescale if guidance_rescale is None else guidance_rescale)
        structural = any(v is not None for v in (steps, timesteps, num_inference_steps, height, width))
        size = (self.height, self.width)
        if structural:
            if steps is None and timesteps is None:
                steps, timesteps = self.steps, self.timesteps
            steps, timesteps, solver = self._searched(steps, timesteps, self.solver)
            if num_inference_steps is None:
                num_inference_steps = self.num_inference_steps
            size = self.parts.size(self.height if height is None else height, self.width if width is None else width)
            schedule = self.parts.step_schedule(steps, timesteps, num_inference_steps, solver, *size)
        resized = size != (self.height, self.width)
        scales = None
        if controlnet_conditioning_scale is not None:
            scales = self._control_scales(controlnet_conditioning_scale)
        standing = self._control_rows(control_image, size) if control_image is not None else None
        state = self._prompt_state(prompt, negative_prompt, embeds)
        image_prompt = self._image_prompt_after(ip_adapter_image, ip_adapter_image_embeds)
        text = self._text_after(text_options, "update")
        if embedded is not None:
            text = {**text, GUIDANCE: embedded}
        encoded = None
        # a new size re-encodes too: SDXL's conditioning holds the image size
        if state[:2] != (self.prompt, self.negative_prompt) or _given_anew(state[2], self._embeds) or resized \
                or image_prompt is not self._image_prompt or text != self._text:
            encoded = self._encoded(state, size, image_prompt, text)
        if scales is not None:
            self.denoiser.set_scales(scales, None, self._guess_mode, self._modes)
        if standing is not None:
            self._standing_control, self._standing_source = standing, control_image
        elif resized and self._standing_control is not None:   # the kept image, at the new size
            self._standing_control = self._control_rows(self._standing_source, size)
        if guider is not self.guider:
            self.guider = guider
            self.latents.set_guider(guider)
            self._drop_whole()
        drained = []
        if structural:
            drained = self.flush_tagged() if with_tags else self.flush()
            self.schedule, self.steps, self.timesteps, self.solver = schedule, steps, timesteps, solver
            self.num_inference_steps = num_inference_steps
            self.height, self.width = size
        if encoded is not None:
            self._cond, (self.prompt, self.negative_prompt, self._embeds) = encoded, state
            self._image_prompt, self._text = image_prompt, text
        if structural:
            self._start()
        elif encoded is not None:
            self.latents.set_conditioning(*self._cond)
        return drained

    def _default_steps(self):
        """(steps, timesteps) when none are given: an adapter's timesteps for txt2img, one step at the
        default strength for a one-step adapter's img2img, else the mode's defaults."""
        sampling = self.adapter.sampling if self.adapter is not None else None
        if sampling is not None and self.mode == "txt2img" and sampling.timesteps:
            return None, list(sampling.timesteps)
        if sampling is not None and sampling.steps == 1:
            return DEFAULT_STEPS[self.mode][:1], None
        return DEFAULT_STEPS[self.mode], None

    def set_adapter(self, adapter, scale: float | None = None, adapter_scheduler: str | None = None, wait: bool = True):
        """Swap the adapter (None: none) or change its scale while streaming, from the next call on.

        PyTorch and torch.compile: immediate, no recompilation (the scale is a tensor). Engines: built
        again from the cache key (which holds the LoRA state) — with ``wait=False`` in the background,
        the stream running on the old engines until :meth:`adapter_ready`. The schedule stays."""
        self._require_prepared()
        if self._pending is not None:
            self._pending.join()
        self._set_adapter(adapter, scale, adapter_scheduler)
        if self.compile_backend == "onnxruntime":   # its graph holds the weights
            self._drop_whole()
        if self.backend is None:
            return
        if wait:
            self._attach_engines(force=True)
            return
        import threading

        self._pending = threading.Thread(target=self._attach_engines, kwargs={"force": True}, daemon=True,
                                         name="fastdiff-engine-rebuild")
        self._pending.start()

    def adapter_ready(self) -> bool:
        """Whether the engines follow the adapter set last (always, without engines or once built)."""
        return self._pending is None or not self._pending.is_alive()

    def _searched(self, steps, timesteps, solver):
        """(steps, timesteps, solver): a searched schedule given as `steps` becomes its timesteps."""
        if steps is None or isinstance(steps, (list, tuple)):
            return steps, timesteps, solver
        from .tuning.schedules import Schedule, load_schedule

        if not isinstance(steps, (str, os.PathLike, Schedule)):
            raise ValueError(f"steps must be a list of step indices, a schedule or its file, got {steps!r}")

        if timesteps is not None:
            raise ValueError("timesteps: give a schedule (as steps) or timesteps, not both")
        schedule = load_schedule(steps, self.pipe)
        if self.mode == "img2img" and schedule.mode != "stream":
            raise ValueError(f"steps: this schedule is a {schedule.mode} one, searched from pure noise; an img2img "
                             "stream needs a stream schedule (fastdiff tune steps --mode stream)")
        if self.mode == "txt2img" and schedule.mode == "stream":
            raise ValueError("steps: this schedule was searched for an img2img stream's step, which starts from the "
                             "input frame; a txt2img stream starts from pure noise and needs a sample schedule")
        return None, schedule.timesteps, solver or schedule.solver

    def set_vae(self, vae):
        """Decode and encode with another VAE (e.g. AutoencoderTiny) from the next call on."""
        self.parts.set_vae(vae)
        self._drop_whole()
        if self.latents is not None:
            self._attach_engines(force=True)

    # -- running ---------------------------------------------------------------------------------
    @property
    def lag(self) -> int:
        """Calls between a frame going in and its output coming out (n − 1)."""
        return len(self.schedule) - 1

    @property
    def rows_per_call(self) -> int:
        self._require_prepared()
        return self.latents.rows_per_call

    @property
    def macs_per_call(self) -> float:
        """MACs of one denoiser call on the full stream (every row, unconditional ones too), each row
        on its route's sub-network, by the shared counter."""
        self._require_prepared()
        cond, uncond = self._cond
        n, F = len(self.schedule), self.frame_buffer
        t = torch.zeros(n * F, device=self.denoiser.device)
        if self._controlled:   # the rows as a call holds them, with its frames' control images
            control = self._last_control or self._standing_control
            if control is None:
                raise RuntimeError("macs_per_call: a ControlNet stream's cost is counted once it has a control image")
            cond, uncond = (c.with_extras(**control) if c is not None else None for c in (cond, uncond))
        rows = self.guider.model_conditioning(t, cond.tile(n), uncond.tile(n) if uncond is not None else None, F)[1]
        return self.parts.rows_macs(rows, self.latent_shape)

    @property
    def skipped_frames(self) -> int:
        """Input frames the similarity filter skipped (a skipped call skips all F of its frames)."""
        return self.filter.skipped * self.frame_buffer if self.filter is not None else 0

    def _require_prepared(self):
        if self.latents is None:
            raise RuntimeError("call stream.prepare(prompt) before using the stream")

    def _inputs(self, image) -> torch.Tensor | None:
        F = self.frame_buffer
        if self.mode == "txt2img":
            if image is not None:
                raise ValueError("image must not be given to a txt2img stream (mode='txt2img'); call stream() with no image")
            return None
        if image is None:
            raise ValueError("image is required by an img2img stream (mode='img2img'); for txt2img create the stream with mode='txt2img'")
        if F == 1:   # no list, no cat
            return to_model_tensor(image, self.height, self.width, self.denoiser.device, self.codec.dtype)
        if not isinstance(image, (list, tuple)) or len(image) != F:
            got = len(image) if isinstance(image, (list, tuple)) else type(image).__name__
            raise ValueError(f"image must be a list of frame_buffer={F} frames, got {got}")
        return torch.cat([to_model_tensor(f, self.height, self.width, self.denoiser.device, self.codec.dtype,
                                          name=f"image[{i}]") for i, f in enumerate(image)])

    # -- ControlNet ------------------------------------------------------------------------------
    @property
    def _controlled(self) -> bool:
        return isinstance(self.denoiser, ControlledDenoiser)

    def _set_control(self, scale, guess_mode, mode) -> None:
        """A ControlNet pipeline's settings (none other takes them)."""
        self._standing_control = self._standing_source = None
        self._last_control = None   # the last control rows a call gave (what macs_per_call counts with)
        self._guess_mode, self._modes = False, None
        if not self._controlled:
            if scale != 1.0 or guess_mode or mode is not None:
                raise ValueError(f"controlnet_conditioning_scale, guess_mode, control_mode: {type(self.pipe).__name__} "
                                 "has no ControlNet")
            return
        d = self.denoiser
        if mode is not None and not d.union:
            raise ValueError(f"control_mode: {type(self.pipe).__name__}'s ControlNets are no Union nets; they read no "
                             "kind of control")
        # the pictures each frame brings: one per net, or one per kind of control for a Union net alone
        self._conditions = len(mode) if d.union and len(d.nets) == 1 and isinstance(mode, (list, tuple)) \
            else len(d.nets)
        self._modes = d.check_modes(mode, self._conditions)
        if self.compile is not None:
            raise ValueError("compile: a ControlNet pipeline's stream runs step by step (its frames' control images "
                             "travel with them); leave compile None")
        if not isinstance(guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
        self._guess_mode = guess_mode or self.denoiser.global_pool
        self.denoiser.set_scales(self._control_scales(scale), None, self._guess_mode, self._modes)

    def _control_scales(self, scale) -> list:
        if not self._controlled:
            raise ValueError(f"controlnet_conditioning_scale: {type(self.pipe).__name__} has no ControlNet")
        from .control_inputs import check_scales

        return check_scales(scale, self._conditions)

    def _control_rows(self, control_image, size=None) -> dict:
        """{net's key: [F, 3, H, W]} of a control image (one, or one per frame) at the stream's size."""
        if not self._controlled:
            raise ValueError(f"control_image: {type(self.pipe).__name__} has no ControlNet")
        from .control_inputs import control_images, control_rows

        d = self.denoiser
        height, width = size or (self.height, self.width)
        images = control_images(self.pipe, self._conditions, control_image, height, width, "control_image")
        rows = control_rows(images, self.frame_buffer, 1, "frames")
        return {k: r.to(d.device, d.nets[0].dtype) for k, r in zip(d.image_keys, rows)}

    def _call_control(self, control_image) -> dict | None:
        """The control rows of this call: its own image, else the standing one."""
        if control_image is None:
            if self._controlled and self._standing_control is None:
                raise ValueError(f"control_image is required by {type(self.pipe).__name__}'s stream: give one with each "
                                 "call, or to prepare() / update() for the calls that give none")
            return self._standing_control
        self._last_control = self._control_rows(control_image)
        return self._last_control

    @torch.inference_mode()
    def __call__(self, image=None, tag=None, control_image=None):
        """Process one frame (a list of F frames with frame_buffer F > 1; nothing for txt2img).

        Returns the output of the frame that went in n−1 calls ago, or None while the stream fills;
        :attr:`last_tag` is then the `tag` that frame was given (a skipped call's own tag). A
        ControlNet pipeline's stream takes the frame's `control_image` (see the class's docstring).
        """
        self._require_prepared()
        pixels = self._inputs(image)
        control = self._call_control(control_image)
        self.last_skipped = False
        if self.filter is not None and pixels is not None:
            centred = signed(pixels)   # frames compared around mid-grey: the angle between [0, 1] frames says little
            if self._last_output is None:   # nothing to reuse yet: never skip
                self.filter.accept(centred)
            elif self.filter.should_skip(centred):
                self.last_skipped, self.last_tag = True, tag
                return self._last_output
        if self.compile == "whole" and self.latents.full:
            out = self._whole_step(pixels, tag)
            if out is not None:
                return out
        if pixels is None:
            finished = self.latents.push(None, tag=tag, extras=control)
        else:   # the VAE's scaling factor is folded into the stream's entry op
            codec = self.codec
            finished = self.latents.push(codec.encode_unit(pixels, scaled=False), tag=tag, scale=codec.scaling,
                                         extras=control)
        if finished is None:
            self.last_tag = None
            return None
        self._last_output, self.last_tag = self._decode(finished.latents), finished.tag
        return self._last_output

    def _whole_step(self, pixels, tag):
        """One steady-state call through the compiled whole step; None when it can't (fresh noise)."""
        ls = self.latents
        if self._whole is None:
            self._whole = WholeStep.make(ls, self.codec, self.compile_backend, self.compile_mode)
            if self._whole is None:
                self.compile = None
                return None
        buffer, residual = ls.state()
        images, finished, buffer, residual = self._whole(pixels, buffer, residual, ls.steady_conditioning())
        if self.denoiser.device.type == "cuda" and self.compile_backend == "inductor":
            # CUDA graphs reuse their outputs' memory
            images, finished = images.clone(), finished.clone()
            buffer = buffer.clone() if buffer is not None else None
            residual = residual.clone() if residual is not None else None
        self.last_tag = ls.shift_in(buffer, residual, tag)
        self._last_output = self._frames_of(finished, images)
        return self._last_output

    def _drop_whole(self):
        """Forget the compiled whole step: what it baked in (coefficients, noise, weights) changed."""
        self._whole = None

    def _frames_of(self, latents, images):
        if self.output_type == "latent":
            frames = list(latents.clone())   # a full stream's latents are rows of its buffers, written again
        else:
            self._finite.check(latents, images)   # before the conversion clamps ±Inf away
            frames = from_model_tensor(images, self.output_type)
        return frames[0] if self.frame_buffer == 1 else frames

    def _decode(self, latents):
        images = None if self.output_type == "latent" else self.codec.decode_unit(latents)
        return self._frames_of(latents, images)

    @torch.inference_mode()
    def flush_tagged(self) -> list[tuple]:
        """Finish the frames still in flight: (tag, output) per call, oldest first (the output is a
        list of F with frame_buffer F > 1)."""
        if self.latents is None:
            return []
        outputs = [(group.tag, self._decode(group.latents)) for group in self.latents.drain()]
        if outputs:
            self._last_output = outputs[-1][1]
        return outputs

    def flush(self) -> list:
        """Finish the frames still in flight; their outputs, oldest first (flattened when F > 1)."""
        outputs = []
        for _, decoded in self.flush_tagged():
            outputs.extend(decoded if self.frame_buffer > 1 else [decoded])
        return outputs


def _given_anew(embeds: dict, before: dict) -> bool:
    """Whether a prompt state's embeddings are not the very tensors it held before."""
    return embeds.keys() != before.keys() or any(embeds[k] is not before[k] for k in embeds)
