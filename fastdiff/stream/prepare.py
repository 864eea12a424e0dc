"""What both front doors prepare once, held once: a pipeline's denoiser adapter, its latent codec
and their engines, and the checks and encoding of prompts and sizes.

:class:`fastdiff.Stream` and :func:`fastdiff.accelerate` each hold one :class:`Prepared`; the
per-prepare state (schedule, guider, conditioning) then lives in the :class:`~.batch.LatentStream`
they run, and nowhere else.
"""

from __future__ import annotations

import torch

from ..controlnet import with_controlnet
from ..denoiser import (Conditioning, check_embeds, check_prompts, check_size, denoiser_for, has_image_prompt,
                        with_image_prompt)
from ..images import check_finite
from ..channel_inputs import with_control_latents
from ..inpainting import with_inpainting
from ..sampling.schedule import StepSchedule, set_schedule, step_schedule
from ..vae import LatentCodec

__all__ = ["Prepared", "UsesPrepared"]


class Prepared:
    """`pipe`'s denoiser and codec, ready to run; with ``backend`` they run as engines once
    :meth:`attach_engines` is called for the rows and sizes they will see."""

    def __init__(self, pipe, backend: str | None = None, engine_options: dict | None = None):
        self.pipe = pipe
        self.denoiser = with_controlnet(with_inpainting(with_control_latents(denoiser_for(pipe), pipe), pipe), pipe)
        self._vae = pipe.vae
        self.codec = LatentCodec(pipe.vae)
        self.backend = self.engine_options = None
        self.engines = None        # what attach_engines swapped in
        self._engine_shape = self._engine_state = None
        if backend is not None:
            from ..engines.attach import check_options
            from ..engines.backends import resolve_backend

            self.engine_options = check_options(engine_options)
            self.backend = resolve_backend(backend, self.denoiser.device)
        elif engine_options is not None:
            raise ValueError("engine_options needs a backend (backend='onnxruntime', 'tensorrt', 'aoti', "
                             "'inductor' or 'auto')")

    # -- sizes ---------------------------------------------------------------------------------
    def size(self, height, width) -> tuple[int, int]:
        """Image size in pixels: the model's native one by default (see :func:`check_size`)."""
        return check_size(self.denoiser, self.current_codec(), height, width)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.codec.scale_factor
        return (self.denoiser.in_channels, height // f, width // f)

    # -- schedules -----------------------------------------------------------------------------
    def set_own_schedule(self, num_inference_steps: int, height: int, width: int) -> int:
        """Set the scheduler to the pipeline's own `num_inference_steps`-step schedule at an image of
        `height` × `width` (Flux's pipelines shift it by the image's size); returns the step count."""
        sigmas, mu = self.denoiser.schedule_arguments(self.pipe.scheduler, num_inference_steps, None,
                                                      self.latent_shape(height, width))
        return set_schedule(self.pipe.scheduler, num_inference_steps, sigmas, mu)

    def step_schedule(self, steps, timesteps, num_inference_steps, solver, height: int, width: int) -> StepSchedule:
        """:func:`~fastdiff.sampling.schedule.step_schedule` of the pipeline's scheduler, `steps`
        indexing its own schedule at an image of `height` × `width` (see :meth:`set_own_schedule`)."""
        sigmas = mu = None
        if isinstance(num_inference_steps, int) and num_inference_steps >= 1:   # else step_schedule says why
            sigmas, mu = self.denoiser.schedule_arguments(self.pipe.scheduler, num_inference_steps, None,
                                                          self.latent_shape(height, width))
        return step_schedule(self.pipe.scheduler, steps, timesteps, num_inference_steps, solver,
                             sigmas=sigmas if steps is not None else None, mu=mu)

    def current_codec(self) -> LatentCodec:
        """The codec built at preparation (with any VAE engines), unless ``pipe.vae`` was replaced since."""
        if self.pipe.vae is not self._vae:
            self._vae, self.codec = self.pipe.vae, LatentCodec(self.pipe.vae)
            self._engine_shape = None
        return self.codec

    def set_vae(self, vae):
        """Encode and decode with another VAE (e.g. AutoencoderTiny) that fits the denoiser."""
        channels = vae.config.get("latent_channels")
        if channels != self.denoiser.in_channels:
            raise ValueError(f"vae has {channels} latent channels; the denoiser takes {self.denoiser.in_channels}")
        codec = LatentCodec(vae)
        if codec.scale_factor != self.codec.scale_factor:
            raise ValueError(f"vae downsamples by {codec.scale_factor}; the latents need {self.codec.scale_factor}")
        self.codec = codec
        self._engine_shape = None   # its engines (if any) are attached again

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, prompt, negative_prompt, height: int, width: int, *, frames: int | None = None,
               per_prompt: int = 1, route=None, embeds: dict | None = None,
               options: dict | None = None) -> tuple[Conditioning, Conditioning]:
        """(conditional, unconditional) rows for `prompt` and `negative_prompt` (a string or a list).

        A stream (`frames` F) takes one prompt or F, one row per frame. A pipeline call takes any
        number of prompts, each repeated `per_prompt` times; a negative prompt is one string or one
        per prompt. Instead of either, `embeds` as diffusers' pipelines take them (``prompt_embeds``...,
        see :func:`check_embeds`): in a call one row a prompt, repeated alike; in a stream one row or
        F for each side. `options`: the denoiser's other prompts (SDXL's ``prompt_2``..., one string
        or one per prompt, repeated alike) and its size conditioning, passed on. `route`
        (``(prompts, cond) -> int64 [B]``, a router's) gives every row, and its unconditional row
        alike, the sub-network it runs on."""
        tokenizers = self.denoiser.tokenizers
        embeds = check_embeds(self.denoiser, embeds or {}, prompt, negative_prompt)
        if "prompt_embeds" in embeds:
            if route is not None:
                raise ValueError("prompt_embeds: a router routes each prompt by its text; give prompt instead")
            prompts, count = None, len(embeds["prompt_embeds"])
        else:
            prompts = check_prompts(prompt, "prompt", tokenizers, allow_empty=False)
            count = len(prompts)
        tokens = self._engine_tokens() if embeds and self.backend is not None else None
        for name, value in embeds.items():
            if tokens is not None and value.dim() == 3 and value.shape[1] != tokens:
                raise ValueError(f"{name} has {value.shape[1]} tokens; the {self.backend} engines take {tokens}")
        negatives = None
        if negative_prompt is not None:
            negatives = check_prompts(negative_prompt, "negative_prompt", tokenizers, allow_empty=True)
        if frames is not None:
            for name, values in (("prompt", prompts), ("negative_prompt", negatives)):
                if values is not None and len(values) not in (1, frames):
                    raise ValueError(f"{name} must be one string or a list of frame_buffer={frames} strings, "
                                     f"got {len(values)}")
            for name, value in embeds.items():
                if len(value) not in (1, frames):
                    raise ValueError(f"{name} must have 1 or frame_buffer={frames} rows, got {len(value)}")
            prompts = prompts * (frames // len(prompts)) if prompts is not None else None
            negatives = negatives * (frames // len(negatives)) if negatives is not None else None
            embeds = {k: v.repeat((frames // len(v),) + (1,) * (v.dim() - 1)) for k, v in embeds.items()}
        else:
            for name, value in embeds.items():   # negative ones beside text prompts too: one row a prompt
                if len(value) != count:
                    raise ValueError(f"{name} has {len(value)} rows but prompt has {count}")
            embeds = {k: v.repeat_interleave(per_prompt, 0) for k, v in embeds.items()}
            if negatives is not None:
                negatives = negatives * count if len(negatives) == 1 else negatives
                if len(negatives) != count:
                    raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {count}")
                negatives = [n for n in negatives for _ in range(per_prompt)]
            if prompts is not None:
                prompts = [p for p in prompts for _ in range(per_prompt)]
        options = self._text_options(options or {}, count if frames is None else frames, per_prompt)
        with torch.inference_mode():
            cond, uncond = self.denoiser.encode_prompt(prompts, negatives, height, width, embeds, options)
            if cond.embeds.shape[1] != uncond.embeds.shape[1]:   # given embeddings of another length
                raise ValueError(f"prompt_embeds has {cond.embeds.shape[1]} tokens and the unconditional rows "
                                 f"{uncond.embeds.shape[1]}; give negative_prompt_embeds of the same shape")
            if route is not None:
                routes = route(prompts, cond)
                cond, uncond = cond.with_route(routes), uncond.with_route(routes)
        return cond, uncond

    def image_prompt(self, cond: Conditioning, uncond: Conditioning, image, embeds, guided: bool):
        """(cond, uncond) carrying an IP-Adapter's image prompt — `image`, or its `embeds` as diffusers
        takes them (the negative ones first when `guided`) — made by the pipeline's own
        ``prepare_ip_adapter_image_embeds``: the image's embeddings on the conditional rows, the
        negative ones (zeros, or a blank image's) on the unconditional rows."""
        name = "ip_adapter_image" if embeds is None else "ip_adapter_image_embeds"
        loaded = has_image_prompt(self.denoiser.original)   # its every call then needs an image prompt
        if image is None and embeds is None:
            if loaded:
                raise ValueError("ip_adapter_image is required: the pipeline has an IP-Adapter loaded "
                                 "(pipe.unload_ip_adapter() runs it without)")
            return cond, uncond
        if not loaded:
            raise ValueError(f"{name}: the pipeline has no IP-Adapter loaded (pipe.load_ip_adapter(...))")
        if cond.route is not None:
            raise ValueError(f"{name}: a router's pruned sub-networks have no IP-Adapter")
        if embeds is not None and (not isinstance(embeds, (list, tuple)) or
                                   not all(isinstance(e, torch.Tensor) and e.dim() == 3 for e in embeds)):
            raise ValueError("ip_adapter_image_embeds must be a list of 3-d tensors, one per IP-Adapter")
        rows = len(cond)
        with torch.inference_mode():
            try:
                made = self.pipe.prepare_ip_adapter_image_embeds(image, embeds, self.denoiser.device, rows, guided)
            except (ValueError, TypeError, IndexError, AttributeError) as error:
                raise ValueError(f"{name}: {error}") from None
        made = [e.to(self.denoiser.device, self.denoiser.dtype) for e in made]
        for e in made:
            check_finite(e, name)
            if e.shape[0] != (2 * rows if guided else rows):
                raise ValueError(f"{name}: embeddings of {e.shape[0]} rows for {rows} images"
                                 f"{' (the negative ones first)' if guided else ''}")
        if self.backend is not None and any(e.shape[1] != 1 for e in made):
            raise ValueError(f"{name}: the engines take one image per IP-Adapter, got "
                             f"{[e.shape[1] for e in made]}")
        positive = [e[-rows:] for e in made]
        negative = [e[:rows] if guided else torch.zeros_like(e) for e in made]
        return with_image_prompt(cond, positive), with_image_prompt(uncond, negative)

    def _text_options(self, options: dict, count: int, per_prompt: int) -> dict:
        """`options` with each of the denoiser's other prompts checked (against its own tokenizer)
        and laid out as the prompts are: `count` strings, each repeated `per_prompt` times."""
        d = self.denoiser
        out = dict(options)
        for name, value in options.items():
            if name not in d.text_options:
                continue
            tokenizer = d.tokenizers[int(name[-1]) - 1]
            texts = check_prompts(value, name, [tokenizer], allow_empty=True)
            if len(texts) not in (1, count):
                raise ValueError(f"{name} must be one string or {count} (one per prompt), got {len(texts)}")
            out[name] = [t for t in texts * (count // len(texts)) for _ in range(per_prompt)]
        return out

    def _engine_tokens(self) -> int:
        """The text length the denoiser's engines are built for (its encoders' own)."""
        return next(i.shape[1] for i in self.denoiser.graph_spec().inputs if i.name == "encoder_hidden_states")

    # -- cost ----------------------------------------------------------------------------------
    def row_macs(self, cond_row: Conditioning, latent_shape: tuple, route: int | None = None) -> float:
        """MACs of one denoiser row at `latent_shape` (on `route`'s sub-network when routed), counted
        once by the shared counter (:mod:`fastdiff.macs`) and kept."""
        from ..denoiser import GroupedDenoiser
        from ..macs import call_macs

        cache = self.__dict__.setdefault("_row_macs", {})
        key = (route, tuple(latent_shape), tuple(cond_row.embeds.shape[1:]))
        if key not in cache:
            d = self.denoiser
            module = d.originals[route] if isinstance(d, GroupedDenoiser) and route is not None else d.original
            x = torch.zeros((1, *latent_shape), device=d.device, dtype=d.dtype)
            t = torch.full((1,), 500.0, device=d.device)
            plain = Conditioning(cond_row.embeds[:1], {k: v[:1] for k, v in cond_row.extras.items()})
            cache[key] = call_macs(d.run, module, x, t, plain)
        return cache[key]

    def rows_macs(self, cond_model: Conditioning, latent_shape: tuple) -> float:
        """MACs of a denoiser call over the rows of `cond_model` (each on its route's sub-network)."""
        if cond_model.route is None:
            return len(cond_model) * self.row_macs(cond_model, latent_shape)
        routes, counts = cond_model.route.unique(return_counts=True)
        return sum(int(n) * self.row_macs(cond_model, latent_shape, int(r)) for r, n in zip(routes, counts))

    # -- attention -----------------------------------------------------------------------------
    def set_attention(self, name: str | None) -> None:
        """The denoiser's attention backend (:mod:`fastdiff.attention`), for every sub-network too;
        None leaves the pipeline's attention processors as they are."""
        from ..attention import apply_attention
        from ..denoiser import GroupedDenoiser

        if name is None:
            return
        d = self.denoiser
        modules = list(d.originals.values()) if isinstance(d, GroupedDenoiser) else [d.original]
        for module in modules:
            apply_attention(module, name)
        d.attention = name

    # -- engines -------------------------------------------------------------------------------
    def attach_engines(self, rows: int, frames: int, resolutions, *, best_rows: int | None = None,
                       best_frames: int | None = None, force: bool = False):
        """Engines for up to `rows` denoiser rows and `frames` images per call at `resolutions`;
        again only when those change, the VAE changes, or `force` (e.g. after the weights changed)."""
        if self.backend is None:
            return None
        shape = (rows, frames, tuple(map(tuple, resolutions)), best_rows, best_frames)
        state = self.denoiser.engine_state()
        if not force and self.engines is not None and self._engine_shape == shape and self._engine_state == state:
            return self.engines
        from ..engines.attach import attach_engines

        self.engines = attach_engines(self.denoiser, self.codec, self.backend, rows=rows, frames=frames,
                                      resolutions=resolutions, options=self.engine_options,
                                      best_rows=best_rows, best_frames=best_frames)
        self._engine_shape, self._engine_state = shape, state
        return self.engines

    def follow_engine_state(self):
        """Engines again, for the shapes they were attached for, where what they hold besides the
        weights changed since (an IP-Adapter loaded, unloaded or given other scales)."""
        if self.engines is not None and self._engine_state != self.denoiser.engine_state():
            rows, frames, resolutions, best_rows, best_frames = self._engine_shape
            self.attach_engines(rows, frames, resolutions, best_rows=best_rows, best_frames=best_frames)


class UsesPrepared:
    """What a front door holding ``self.parts`` (a :class:`Prepared`) shows of it."""

    parts: Prepared

    @property
    def denoiser(self):
        return self.parts.denoiser

    @property
    def codec(self):
        return self.parts.codec

    @property
    def engines(self):
        return self.parts.engines

    @property
    def backend(self):
        return self.parts.backend
