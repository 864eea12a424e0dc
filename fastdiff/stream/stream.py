"""`fastdiff.Stream`: a diffusers pipeline as a real-time frame stream, one denoiser call per frame."""

from __future__ import annotations

import numbers

import torch

from ..denoiser import check_prompts, check_size, denoiser_for
from ..images import check_output_type, from_model_tensor, to_model_tensor
from ..sampling.guidance import check_mode
from ..sampling.schedule import step_schedule
from ..vae import LatentCodec
from .batch import NOISE_MODES, LatentStream
from .similarity import SimilarityFilter

MODES = ("img2img", "txt2img")
DEFAULT_STEPS = {"img2img": [32, 45], "txt2img": [0, 16, 32, 45]}


def _check_number(value, name: str, low: float = 0.0):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < low:
        raise ValueError(f"{name} must be a number ≥ {low}, got {value!r}")
    return float(value)


class Stream:
    """Real-time img2img or txt2img over a diffusers pipeline.

    ``steps`` index the scheduler's ``num_inference_steps``-step schedule (noisiest first);
    ``timesteps`` gives the timesteps instead. Every call to the stream runs the denoiser once, on
    n·F rows for n steps and F = ``frame_buffer`` frames per call (2·n·F with ``cfg="full"``,
    (n+1)·F with ``cfg="initialize"``).

    Output lags input by n−1 calls: a frame's result comes out of the call n−1 calls after the one
    it went into, and calls return None until the stream is full. :meth:`flush` returns the frames
    still in flight. With ``frame_buffer`` F > 1 a call takes a list of F frames and returns a list
    of F outputs.

    ``similarity_filter`` (a threshold such as 0.98) skips inputs too similar to the last processed
    one, returning the previous output; skips are counted in :attr:`skipped_frames`.

    ``backend`` ("onnxruntime", "tensorrt", "aoti", "inductor" or "auto"; None: PyTorch as it is)
    runs the denoiser and the VAE as engines, built at :meth:`prepare` for the stream's row count
    and resolution or loaded from the engine cache. ``engine_options`` passes ``components``,
    ``precision``, ``cache_dir``, ``rebuild``, ``compile_mode``, ``threads`` and ``tensorrt`` on (see
    :mod:`fastdiff.engines`).
    """

    def __init__(self, pipe, steps=None, *, timesteps=None, num_inference_steps: int = 50,
                 cfg: str = "self", guidance_scale: float = 1.2, delta: float = 1.0,
                 frame_buffer: int = 1, similarity_filter: float | None = None, max_skip_frames: int = 10,
                 mode: str = "img2img", solver: str | None = None, noise: str = "fixed", seed: int = 0,
                 height: int | None = None, width: int | None = None, output_type: str = "pt",
                 backend: str | None = None, engine_options: dict | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if isinstance(frame_buffer, bool) or not isinstance(frame_buffer, int) or frame_buffer < 1:
            raise ValueError(f"frame_buffer must be an integer ≥ 1, got {frame_buffer!r}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.pipe = pipe
        self.denoiser = denoiser_for(pipe)
        self.codec = LatentCodec(pipe.vae)
        self.mode = mode
        self.cfg = check_mode(cfg)
        self.guidance_scale = _check_number(guidance_scale, "guidance_scale")
        self.delta = _check_number(delta, "delta")
        self.frame_buffer = frame_buffer
        self.solver = solver
        self.noise = noise
        self.output_type = check_output_type(output_type)
        self.generator = torch.Generator(self.denoiser.device).manual_seed(seed)
        if similarity_filter is not None and (isinstance(similarity_filter, bool) or not isinstance(
                similarity_filter, numbers.Real) or not 0 < similarity_filter < 1):
            raise ValueError(f"similarity_filter must be None or a threshold in (0, 1), got {similarity_filter!r}")
        self.filter = (SimilarityFilter(float(similarity_filter), max_skip_frames, seed)
                       if similarity_filter is not None else None)
        if steps is None and timesteps is None:
            steps = DEFAULT_STEPS[mode]
        self.num_inference_steps = num_inference_steps
        self.steps, self.timesteps = steps, timesteps
        self.schedule = step_schedule(pipe.scheduler, steps, timesteps, num_inference_steps, solver)
        self.height, self.width = self._check_size(height, width)
        self.prompt = self.negative_prompt = None
        self.latents: LatentStream | None = None
        self.last_skipped = False
        self._last_output = None
        self.engines = None   # what _attach_engines swapped in, if a backend is asked for
        self.backend, self.engine_options = None, None
        if backend is not None:
            from ..engines.attach import check_options
            from ..engines.backends import resolve_backend

            self.engine_options = check_options(engine_options)
            self.backend = resolve_backend(backend, self.denoiser.device)
        elif engine_options is not None:
            raise ValueError("engine_options needs a backend (backend='onnxruntime', 'tensorrt', 'aoti', 'inductor' or 'auto')")

    # -- set-up ----------------------------------------------------------------------------------
    def _check_size(self, height, width):
        return check_size(self.denoiser, self.codec, height, width)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.codec.scale_factor
        return (self.denoiser.in_channels, self.height // f, self.width // f)

    def prepare(self, prompt, negative_prompt=None):
        """Encode the prompt and start the stream. On a running stream this is a prompt change."""
        if self.latents is not None:
            self.update(prompt=prompt, negative_prompt=negative_prompt)
            return
        self._encode(prompt, negative_prompt)
        self._start()

    def _encode(self, prompt, negative_prompt):
        F = self.frame_buffer
        prompts = check_prompts(prompt, "prompt", self.denoiser.tokenizers, allow_empty=False)
        negatives = None
        if negative_prompt is not None:
            negatives = check_prompts(negative_prompt, "negative_prompt", self.denoiser.tokenizers, allow_empty=True)
        for name, values in (("prompt", prompts), ("negative_prompt", negatives)):
            if values is not None and len(values) not in (1, F):
                raise ValueError(f"{name} must be one string or a list of frame_buffer={F} strings, got {len(values)}")
        prompts = prompts * (F // len(prompts))
        if negatives is not None:
            negatives = negatives * (F // len(negatives))
        with torch.inference_mode():
            self._cond = self.denoiser.encode_prompt(prompts, negatives, self.height, self.width)
        self.prompt, self.negative_prompt = prompt, negative_prompt

    def _start(self):
        cond, uncond = self._cond
        self.latents = LatentStream(
            self.denoiser, self.schedule, cond, uncond, self.latent_shape, cfg=self.cfg,
            guidance_scale=self.guidance_scale, delta=self.delta, noise=self.noise, generator=self.generator)
        self._last_output = None
        if self.filter is not None:
            self.filter.reset()
        self._attach_engines()

    def _attach_engines(self, force: bool = False):
        """Engines for the stream's rows per call and resolution (once full the row count is fixed,
        so the batch profile is static at that count); again only when either changes."""
        if self.backend is None:
            return
        shape = (self.latents.rows_per_call, self.frame_buffer, self.height, self.width)
        if not force and self.engines is not None and self._engine_shape == shape:
            return
        from ..engines.attach import attach_engines

        self.engines = attach_engines(self.denoiser, self.codec, self.backend, rows=shape[0], frames=shape[1],
                                      resolutions=[(self.height, self.width)], options=self.engine_options)
        self._engine_shape = shape

    def update(self, *, prompt=None, negative_prompt=None, guidance_scale=None, delta=None, steps=None,
               timesteps=None, num_inference_steps=None, height=None, width=None) -> list:
        """Change settings at run time, without rebuilding anything.

        Prompt, negative prompt, guidance scale and delta apply from the next call on, to the frames
        in flight as well. Steps and resolution change the stream's shape: the frames in flight are
        first finished with the old settings and returned (oldest first), so none is lost.
        """
        self._require_prepared()
        if guidance_scale is not None:
            self.guidance_scale = self.latents.guidance_scale = _check_number(guidance_scale, "guidance_scale")
        if delta is not None:
            self.delta = self.latents.delta = _check_number(delta, "delta")
        structural = any(v is not None for v in (steps, timesteps, num_inference_steps, height, width))
        drained, resized = [], False
        if structural:
            if steps is None and timesteps is None:
                steps, timesteps = self.steps, self.timesteps
            num_inference_steps = num_inference_steps or self.num_inference_steps
            schedule = step_schedule(self.pipe.scheduler, steps, timesteps, num_inference_steps, self.solver)
            size = self._check_size(height or self.height, width or self.width)
            drained = self.flush()
            self.schedule, self.steps, self.timesteps = schedule, steps, timesteps
            self.num_inference_steps = num_inference_steps
            resized, (self.height, self.width) = size != (self.height, self.width), size
        # A new size re-encodes too: SDXL's conditioning carries the image size.
        if prompt is not None or negative_prompt is not None or resized:
            self._encode(self.prompt if prompt is None else prompt,
                         self.negative_prompt if negative_prompt is None else negative_prompt)
        if structural:
            self._start()
        elif prompt is not None or negative_prompt is not None:
            self.latents.set_conditioning(*self._cond)
        return drained

    def set_vae(self, vae):
        """Decode and encode with another VAE (e.g. AutoencoderTiny) from the next call on."""
        channels = vae.config.get("latent_channels")
        if channels != self.denoiser.in_channels:
            raise ValueError(f"vae has {channels} latent channels; the denoiser takes {self.denoiser.in_channels}")
        codec = LatentCodec(vae)
        if codec.scale_factor != self.codec.scale_factor:
            raise ValueError(f"vae downsamples by {codec.scale_factor}; the stream's latents need {self.codec.scale_factor}")
        self.codec = codec
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
        if F == 1:
            frames = [image]
        else:
            if not isinstance(image, (list, tuple)) or len(image) != F:
                got = len(image) if isinstance(image, (list, tuple)) else type(image).__name__
                raise ValueError(f"image must be a list of frame_buffer={F} frames, got {got}")
            frames = image
        return torch.cat([to_model_tensor(f, self.height, self.width, self.denoiser.device, self.codec.dtype)
                          for f in frames])

    @torch.inference_mode()
    def __call__(self, image=None):
        """Process one frame (a list of F frames with frame_buffer F > 1; nothing for txt2img).

        Returns the output of the frame that went in n−1 calls ago, or None while the stream fills.
        """
        self._require_prepared()
        pixels = self._inputs(image)
        self.last_skipped = False
        if self.filter is not None and pixels is not None:
            if self._last_output is None:   # nothing to reuse yet: never skip
                self.filter.accept(pixels)
            elif self.filter.should_skip(pixels):
                self.last_skipped = True
                return self._last_output
        clean = self.codec.encode(pixels) if pixels is not None else None
        finished = self.latents.push(clean)
        if finished is None:
            return None
        self._last_output = self._decode(finished)
        return self._last_output

    def _decode(self, latents):
        images = latents if self.output_type == "latent" else self.codec.decode(latents)
        frames = list(images) if self.output_type == "latent" else from_model_tensor(images, self.output_type)
        return frames[0] if self.frame_buffer == 1 else frames

    @torch.inference_mode()
    def flush(self) -> list:
        """Finish the frames still in flight; their outputs, oldest first (flattened when F > 1)."""
        if self.latents is None:
            return []
        outputs = []
        for latents in self.latents.drain():
            decoded = self._decode(latents)
            outputs.extend(decoded if self.frame_buffer > 1 else [decoded])
        if outputs:
            self._last_output = outputs[-1] if self.frame_buffer == 1 else outputs[-self.frame_buffer:]
        return outputs
