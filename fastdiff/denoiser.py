"""The denoiser protocol: one call shape over UNets and DiT transformers.

    output = denoiser(latents[B], t[B], cond[B])

`cond` is a :class:`Conditioning`: the text embeddings plus whatever extra per-row inputs the
family needs (SDXL's pooled text embeddings and size/crop time ids, SD3's and Flux's pooled
projections, a guidance-distilled Flux's guidance scale, an IP-Adapter's image embeddings). Each
family adapter also knows how to encode prompts with its pipeline's text encoders. Everything above this module (sampling, stream, engines) talks to
:class:`Denoiser`, never to a model class; :func:`denoiser_for` is the one place that looks at
what a pipeline's denoiser is (:mod:`fastdiff.controlnet` adds its ControlNets).

The adapters call the module held in ``.module``; an engine replaces that module with a compiled
one taking the same arguments. What an exporter needs to know of a family — the graph's named
inputs, a module wrapped to take them positionally, and how the module's own call maps onto them —
is here too (:meth:`Denoiser.graph_spec`), so the engines layer never branches on the family, and
any module of the family (a pruned sub-network, say) can become an engine.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import flux
from .attention import attention_context
from .images import check_finite
from .parameters import FirstParameter
from .text_inputs import call_defaults


@dataclass
class Conditioning:
    """Per-row conditioning: `embeds` [B, L, D] and extra tensors, each with B rows first.

    `route` (int64 [B], optional) says which sub-network each row runs on (prompt-routed pruning:
    :class:`GroupedDenoiser` groups rows by it). It is not a model input: adapters never pass it on.
    """

    embeds: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    route: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn, route_fn=None) -> "Conditioning":
        route = None if self.route is None else (route_fn or fn)(self.route)
        return Conditioning(fn(self.embeds), {k: fn(v) for k, v in self.extras.items()}, route)

    def tile(self, times: int) -> "Conditioning":
        """Rows repeated `times` over: [c0..cB-1, c0..cB-1, ...] (slot-major stream rows)."""
        return self._map(lambda v: v.repeat(times, *([1] * (v.dim() - 1))))

    def rows(self, index) -> "Conditioning":
        """The rows `index` picks (an int k: the first k; a slice or an index tensor)."""
        index = slice(0, index) if isinstance(index, int) else index
        return self._map(lambda v: v[index])

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self._map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None),
                         lambda r: r.to(device=device))

    def with_extras(self, **extras) -> "Conditioning":
        """The same rows carrying `extras` too (one row each), replacing any of the same names."""
        return Conditioning(self.embeds, {**self.extras, **extras}, self.route)

    def without(self, keys) -> "Conditioning":
        """The same rows without the extras `keys` names."""
        return Conditioning(self.embeds, {k: v for k, v in self.extras.items() if k not in keys}, self.route)

    def with_route(self, route) -> "Conditioning":
        """The same rows, each routed to the sub-network `route` names (an int for all, or [B])."""
        route = torch.as_tensor(route, dtype=torch.int64, device=self.embeds.device)
        if route.dim() == 0:
            route = route.expand(len(self)).clone()
        if route.shape != (len(self),):
            raise ValueError(f"route must be one integer or one per row ({len(self)}), got shape {tuple(route.shape)}")
        return Conditioning(self.embeds, dict(self.extras), route)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        keys = parts[0].extras.keys()
        routed = [p.route is not None for p in parts]
        if any(routed) and not all(routed):
            raise ValueError("cannot join routed and unrouted conditioning")
        route = torch.cat([p.route for p in parts]) if all(routed) else None
        return Conditioning(torch.cat([p.embeds for p in parts]),
                            {k: torch.cat([p.extras[k] for p in parts]) for k in keys}, route)


_WARNED_WORDS: set = set()


def _warn_unknown(tokenizer, prompt: str, name: str) -> None:
    """Warn once per word that a word-level tokenizer (the shapes model's) does not know: it would be
    spelt out letter by letter, which such a model has never seen."""
    from .vocab import unknown_words

    new = [w for w in unknown_words(tokenizer, prompt) if w not in _WARNED_WORDS]
    if new:
        import warnings

        _WARNED_WORDS.update(new)
        warnings.warn(f"{name}: the model's vocabulary has no {', '.join(repr(w) for w in new)}; such words are spelt "
                      "out letter by letter and draw nothing the model was trained on (the shapes model's words "
                      "are listed in the README)", UserWarning, stacklevel=4)


def check_prompts(prompts, name: str, tokenizers, allow_empty: bool) -> list[str]:
    """A prompt or list of prompts, each non-empty (unless allowed) and within the tokenizers' length;
    words a word-level vocabulary lacks are warned about once."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompts!r}")
    for p in prompts:
        if not allow_empty and not p.strip():
            raise ValueError(f"{name} must not be empty")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in p):   # no tokenizer (nor UTF-8) takes them
            raise ValueError(f"{name} holds a lone surrogate (a broken UTF-16 pair): {p[:60]!r}")
        for tok in tokenizers:
            if tok is None:
                continue
            n_tokens = len(tok(p, truncation=False).input_ids)
            if n_tokens > tok.model_max_length:
                raise ValueError(f"{name} is {n_tokens} tokens long; the tokenizer takes at most "
                                 f"{tok.model_max_length} (start and end tokens included): {p[:60]!r}...")
            _warn_unknown(tok, p, name)
    return list(prompts)


EMBED_ARGS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
GUIDANCE = "guidance"   # a guidance-distilled model's scale: an encoding option, and each row's extra
CONTEXT = "context_latents"   # FLUX.1 Kontext: a row's context picture's latents, read as tokens after its own
IMAGE_PROMPT = "ip_image_embeds_"   # an IP-Adapter's image embeddings in a row's extras, one key per adapter


def with_image_prompt(cond: Conditioning, embeds: list[torch.Tensor]) -> Conditioning:
    """`cond`'s rows carrying the IP-Adapters' image embeddings (one [B, images, D] per adapter)."""
    extras = {k: v for k, v in cond.extras.items() if not k.startswith(IMAGE_PROMPT)}
    extras.update({f"{IMAGE_PROMPT}{k}": e for k, e in enumerate(embeds)})
    return Conditioning(cond.embeds, extras, cond.route)


IMAGE_EMBEDS = "image_embeds_"   # an engine's inputs of the IP-Adapters' image embeddings, one per adapter
ONE_EMBEDDING = ("ImageProjection", "IPAdapterFullImageProjection")   # projections reading [B, images, D]


def has_image_prompt(module) -> bool:
    """Whether an IP-Adapter is loaded into `module` (diffusers sets it as the config's attribute)."""
    return getattr(module.config, "encoder_hid_dim_type", None) == "ip_image_proj"


def image_prompt_widths(module) -> list[int]:
    """The image-embedding width of each IP-Adapter loaded into a UNet `module` ([] without one),
    for an engine's inputs: adapters whose projection reads one embedding per image."""
    if not has_image_prompt(module):
        return []
    widths = []
    for layer in module.encoder_hid_proj.image_projection_layers:
        if type(layer).__name__ not in ONE_EMBEDDING:
            raise ValueError(f"backend: engines take IP-Adapters with one embedding per image ({', '.join(ONE_EMBEDDING)}), "
                             f"not {type(layer).__name__}; run this one on the PyTorch modules (backend=None)")
        widths.append(next(m for m in layer.modules() if isinstance(m, torch.nn.Linear)).in_features)
    return widths


def image_prompt_scales(module) -> list:
    """The scale of each IP-Adapter attention layer of `module` (``pipe.set_ip_adapter_scale``)."""
    return [list(p.scale) for p in module.attn_processors.values() if hasattr(p, "to_k_ip")]


def added_conditions(extras: dict) -> dict | None:
    """A UNet's ``added_cond_kwargs`` from a row's extras: SDXL's pooled text and time ids as they
    are, the IP-Adapters' image embeddings as the list diffusers takes; None when there are none."""
    added = {k: v for k, v in extras.items() if not k.startswith(IMAGE_PROMPT)}
    images = sorted((k for k in extras if k.startswith(IMAGE_PROMPT)), key=lambda k: int(k[len(IMAGE_PROMPT):]))
    if images:
        added["image_embeds"] = [extras[k] for k in images]
    return added or None


def check_embeds(denoiser: "Denoiser", embeds: dict, prompt, negative_prompt) -> dict:
    """The embeddings a call gives instead of prompts, as diffusers' pipelines take them: the given
    ones of `embeds` ({name: tensor or None}), each finite and of the family's width, on the
    denoiser's device and dtype (how many rows each side has is the caller's to check). A prompt and
    its embeddings are not both given; the pooled ones (SDXL, SD3) come with the embeddings they pool."""
    given = {k: v for k, v in embeds.items() if v is not None}
    sizes = denoiser.embed_sizes
    for name, value in given.items():
        if name not in sizes:
            raise ValueError(f"{name}: the {denoiser.family} denoiser takes no {name} (it takes {tuple(sizes)})")
        pooled = "pooled" in name
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != (2 if pooled else 3) \
                or value.shape[-1] != sizes[name] or value.shape[0] == 0:
            want = f"[batch, {sizes[name]}]" if pooled else f"[batch, tokens, {sizes[name]}]"
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a float tensor of shape {want}, got {got}")
        check_finite(value, name)
    for text, name in ((prompt, "prompt_embeds"), (negative_prompt, "negative_prompt_embeds")):
        if text is not None and name in given:
            raise ValueError(f"{name.replace('_embeds', '')} and {name}: give one of them, not both")
    for name in [k for k in sizes if "pooled" in k]:   # SDXL and SD3 condition on the pooled embedding too
        plain = name.replace("pooled_", "")
        if (plain in given) != (name in given):
            raise ValueError(f"{name} and {plain} come together: give both or neither")
        if name in given and len(given[name]) != len(given[plain]):
            raise ValueError(f"{name} has {len(given[name])} rows, {plain} {len(given[plain])}")
    if "prompt_embeds" in given and "negative_prompt_embeds" in given \
            and given["prompt_embeds"].shape[1:] != given["negative_prompt_embeds"].shape[1:]:
        raise ValueError(f"prompt_embeds and negative_prompt_embeds must have one shape per row, got "
                         f"{tuple(given['prompt_embeds'].shape)} and {tuple(given['negative_prompt_embeds'].shape)}")
    return {k: v.to(denoiser.device, denoiser.dtype) for k, v in given.items()}


def check_size(denoiser: "Denoiser", codec, height, width) -> tuple[int, int]:
    """Image size in pixels: the model's native size by default, else a multiple of what it can take
    (the VAE's factor, times the transformer's patch size)."""
    multiple = codec.scale_factor * denoiser.size_multiple
    default = denoiser.native_latent_size * codec.scale_factor
    height, width = default if height is None else height, default if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    return height, width


@dataclass(frozen=True)
class ModelInput:
    """One named input of an exported graph. ``shape`` uses "B" for the batch and "H"/"W" for the
    image size divided by the component's size divisor ("H/4": a quarter of it, rounded up, as a
    UNet's deeper levels are; "H*8": eight times it, as a ControlNet's control image is to its
    latents); ``dtype`` None means the model's dtype."""

    name: str
    shape: tuple
    dtype: torch.dtype | None = None


@dataclass
class GraphSpec:
    """A denoiser module as exporters see it: its kind, a module taking the named inputs
    positionally, those inputs, and `feeds` mapping the module's own call (args, kwargs) to them;
    its named outputs, and `returns` (outputs, args, kwargs) → what the module's own call returns
    (None: the first output alone, as ``(out,)``)."""

    kind: str
    graph: torch.nn.Module
    inputs: list[ModelInput]
    feeds: Callable
    outputs: list[str] = field(default_factory=lambda: ["out"])
    returns: Callable | None = None


def call_binder(module):
    """(args, kwargs) of a call of `module` → {parameter name: value} (the signature is read once)."""
    signature = inspect.signature(module.forward)
    return lambda args, kwargs: signature.bind(*args, **kwargs).arguments


def _timestep_rows(t, batch: int) -> torch.Tensor:
    """Timesteps as float32 [B] (diffusers accepts a scalar, a 0-d or a [B] tensor)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return t.reshape(1).expand(batch) if t.dim() == 0 else t.to(torch.float32)


def _residuals(residuals: tuple) -> dict:
    """A ControlNet's residuals given to a UNet graph after its own inputs (the down blocks', then
    the mid block's) as the UNet's keywords."""
    if not residuals:
        return {}
    return {"down_block_additional_residuals": list(residuals[:-1]), "mid_block_additional_residual": residuals[-1]}


class _UNetGraph(torch.nn.Module):
    """A UNet with positional inputs: its own, SDXL's added conditions, then `images` IP-Adapter
    image embeddings, then a ControlNet's residuals (see :func:`_residuals`)."""

    def __init__(self, unet, images: int = 0):
        super().__init__()
        self.unet = unet
        self.images = images

    def _call(self, sample, timestep, encoder_hidden_states, added: dict, rest: tuple):
        images, residuals = rest[:self.images], rest[self.images:]
        if images:
            added = {**added, "image_embeds": list(images)}
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         added_cond_kwargs=added or None, **_residuals(residuals))[0]

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        return self._call(sample, timestep, encoder_hidden_states, {}, rest)


class _SDXLUNetGraph(_UNetGraph):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, *rest):
        return self._call(sample, timestep, encoder_hidden_states, {"text_embeds": text_embeds, "time_ids": time_ids},
                          rest)


class _SD3Graph(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=hidden_states, timestep=timestep, return_dict=False,
                                encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections)[0]


class Denoiser(abc.ABC):
    """Base adapter: the pipeline, its denoiser module, and the dtype/device its rows use."""

    family = "base"

    def __init__(self, pipe, module: torch.nn.Module):
        self.pipe = pipe
        self.original = module   # the PyTorch module: its parameters say where rows must live
        self.module = module     # what runs; an engine may replace it
        self.attention = "sdpa"  # the attention backend (fastdiff.attention); sdpa kernels apply per call
        self.workers = 1         # calls run side by side (engines that release the GIL; see run_calls)
        self.side_runners = {}   # name → an engine standing in for that side network (see side_networks)
        self._pool = None
        self._first = FirstParameter()   # of `original`

    @property
    def dtype(self) -> torch.dtype:
        return self._first.of(self.original).dtype

    @property
    def device(self) -> torch.device:
        return self._first.of(self.original).device

    @property
    def in_channels(self) -> int:
        return self.original.config.in_channels

    @property
    def size_multiple(self) -> int:
        """What the latents' height and width must be a multiple of (a transformer's patch size)."""
        return self.original.config.get("patch_size", 1) or 1

    @property
    def native_latent_size(self) -> int:
        """The latents' side at the model's native image size."""
        return self.original.config.sample_size

    @property
    def embeds_guidance(self) -> bool:
        """Whether the model takes the guidance scale as an input (a guidance-distilled model's
        ``guidance`` encoding option, see :meth:`encode_prompt`)."""
        return False

    def schedule_arguments(self, scheduler, num_inference_steps: int, sigmas, latent_shape: tuple) -> tuple:
        """(sigmas, mu): what the family's pipelines set their scheduler's schedule with besides the step
        count — the sigmas a call gives (None: the scheduler's own), no shift by the image's size."""
        return sigmas, None

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H, W] as the family's pipelines show them to a user (the same here)."""
        return latents

    def unpack(self, latents: torch.Tensor, latent_shape: tuple) -> torch.Tensor:
        """:meth:`pack`'s inverse for latents of `latent_shape` (C, H, W)."""
        return latents

    @property
    def tokenizers(self):
        return [getattr(self.pipe, name, None) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")]

    @property
    def embed_sizes(self) -> dict:
        """The width of each embedding a call can give instead of prompts (diffusers' names)."""
        width = self.original.config.cross_attention_dim
        return {"prompt_embeds": width, "negative_prompt_embeds": width}

    text_options: tuple = ()   # the family's prompts for its other text encoders (diffusers' names)
    stream_cfg = "self"        # a stream's guidance when none is asked: StreamDiffusion's residual one

    @abc.abstractmethod
    def encode_prompt(self, prompts: list[str] | None, negative_prompts: list[str] | None,
                      height: int, width: int, embeds: dict | None = None,
                      options: dict | None = None) -> tuple[Conditioning, Conditioning]:
        """(conditional, unconditional) conditioning, one row per prompt; `embeds` (checked by
        :func:`check_embeds`) stand in for the prompts' or the negative prompts' encoding;
        `options` hold the family's :attr:`text_options` (one per prompt), for SDXL the
        ``time_ids`` / ``negative_time_ids`` of its size conditioning, and for a model that
        :attr:`embeds_guidance` the ``guidance`` scale its rows carry."""

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model's raw output for each row (ε, v or flow velocity, as its scheduler says)."""
        if self.workers > 1:
            return self.run_calls([(self.module, torch.arange(latents.shape[0]))], latents, t, cond)
        with attention_context(self.attention):
            return self.run(self.module, latents, t, cond)

    def set_workers(self, workers: int) -> None:
        """Run each call's rows as `workers` calls side by side (1: one call). For engines whose calls
        release the GIL (ONNX Runtime): on a CPU of few cores, two one-thread calls on half the rows
        each finish sooner than one two-thread call, whose threads meet at every small op."""
        if workers != self.workers and self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.workers = workers

    def run_calls(self, calls: list, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Each (module, rows) call on its rows of the batch, outputs put back in the rows' order.
        With :attr:`workers` > 1 the largest calls are halved until there are that many, and they
        run side by side, the largest first."""
        calls = sorted(calls, key=lambda c: -len(c[1]))
        while len(calls) < self.workers and len(calls[0][1]) > 1:
            module, rows = calls.pop(0)
            calls = sorted(calls + [(module, rows[: (len(rows) + 1) // 2]), (module, rows[(len(rows) + 1) // 2:])],
                           key=lambda c: -len(c[1]))

        def one(call):
            module, rows = call
            return self.run(module, latents[rows], t[rows], cond.rows(rows))

        # entered once, here: PyTorch's SDPA kernel choice is process-wide, not per thread
        with attention_context(self.attention):
            if self.workers > 1 and len(calls) > 1:
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastdiff-denoiser")
                parts = list(self._pool.map(one, calls))
            else:
                parts = [one(call) for call in calls]
        if len(calls) == 1:
            return parts[0]
        out = parts[0].new_empty((latents.shape[0],) + tuple(parts[0].shape[1:]))
        for (_, rows), part in zip(calls, parts):
            out[rows] = part
        return out

    @abc.abstractmethod
    def run(self, module, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """`module` (this family's model, or an engine standing in for it) called on the rows;
        ``cond.route`` is never passed on."""

    @abc.abstractmethod
    def graph_spec(self, module: torch.nn.Module | None = None, text_length: int | None = None) -> GraphSpec:
        """How exporters see `module` (default the pipeline's own); `text_length` overrides the
        prompt length the family's text encoders give."""

    def engine_state(self, module: torch.nn.Module | None = None) -> dict:
        """What an engine of `module` (default the pipeline's own) holds as constants besides its
        weights (an IP-Adapter's scales): engines are built again when it changes."""
        return {}

    def side_networks(self) -> dict:
        """{name: module} of the networks the adapter calls beside its own module (a ControlNet's).
        Engines may stand in for them in :attr:`side_runners`, as :attr:`module` does for :attr:`original`."""
        return {}

    def side_graph_spec(self, name: str) -> GraphSpec:
        """How exporters see the side network `name`."""
        raise ValueError(f"name: {type(self).__name__} has no side network {name!r} (has {sorted(self.side_networks())})")


class UNetDenoiser(Denoiser):
    """UNet2DConditionModel of SD 1.x / 2.x pipelines."""

    family = "unet"

    def encode_prompt(self, prompts, negative_prompts, height, width, embeds=None, options=None):
        options = dict(options or {})
        clip_skip = options.pop("clip_skip", None)
        if options:
            raise ValueError(f"{sorted(options)}: the {self.family} denoiser's pipelines take none of these")
        with _text_model_alias(self.pipe.text_encoder if clip_skip else None):
            cond, uncond = self.pipe.encode_prompt(
                prompts, self.device, 1, True, negative_prompts, clip_skip=clip_skip, **(embeds or {}))
        return Conditioning(cond), Conditioning(uncond)

    def run(self, module, latents, t, cond, **residuals):
        # residuals: a ControlNet's down_block_additional_residuals / mid_block_additional_residual
        return module(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added_conditions(cond.extras),
                      return_dict=False, **residuals)[0]

    def _unet_inputs(self, module, text_length):
        config = module.config
        text_length = text_length or self.pipe.tokenizer.model_max_length
        return [ModelInput("sample", ("B", config.in_channels, "H", "W")),
                ModelInput("timestep", ("B",), torch.float32),
                ModelInput("encoder_hidden_states", ("B", text_length, config.cross_attention_dim))]

    def _image_inputs(self, module) -> list[ModelInput]:
        """An IP-Adapter's image embeddings, one image per adapter and row."""
        return [ModelInput(f"{IMAGE_EMBEDS}{k}", ("B", 1, width)) for k, width in enumerate(image_prompt_widths(module))]

    def _unet_feeds(self, module, added: tuple = (), images: int = 0):
        bind = call_binder(module)

        def feeds(args, kwargs):
            a = bind(args, kwargs)
            sample = a["sample"]
            named = {"sample": sample, "timestep": _timestep_rows(a["timestep"], sample.shape[0]).to(sample.device),
                     "encoder_hidden_states": a["encoder_hidden_states"]}
            named.update({k: a["added_cond_kwargs"][k] for k in added})
            embeds = (a.get("added_cond_kwargs") or {}).get("image_embeds")
            if (embeds is None) != (images == 0):   # never an image prompt dropped, nor one missing
                raise ValueError("ip_adapter_image: the engine was built " + ("without" if embeds else "with") +
                                 " an IP-Adapter; build the engines again (refresh_engines())")
            for k, e in enumerate(embeds or []):
                if e.dim() != 3 or e.shape[1] != 1:
                    raise ValueError(f"ip_adapter_image: engines take one image per IP-Adapter, got embeddings "
                                     f"of shape {tuple(e.shape)}")
                named[f"{IMAGE_EMBEDS}{k}"] = e
            return named
        return feeds

    def engine_state(self, module=None):
        module = module if module is not None else self.original
        scales = image_prompt_scales(module) if image_prompt_widths(module) else []
        return {"ip_adapter_scales": scales} if scales else {}

    def graph_spec(self, module=None, text_length=None):
        module = module if module is not None else self.original
        images = self._image_inputs(module)
        return GraphSpec("unet", _UNetGraph(module, len(images)), self._unet_inputs(module, text_length) + images,
                         self._unet_feeds(module, images=len(images)))


@contextlib.contextmanager
def _text_model_alias(encoder):
    """SD's prompt encoding with ``clip_skip`` reads ``text_encoder.text_model.final_layer_norm``,
    which transformers 5 moved up onto the CLIPTextModel itself: while it runs, `encoder` answers
    to ``text_model`` (an attribute, not a submodule: its weights are not listed twice)."""
    aliased = encoder is not None and not hasattr(encoder, "text_model")
    if aliased:
        encoder.__dict__["text_model"] = encoder
    try:
        yield
    finally:
        if aliased:
            del encoder.__dict__["text_model"]


class SDXLDenoiser(UNetDenoiser):
    """UNet2DConditionModel with SDXL's added conditions (pooled text embeddings + time ids)."""

    family = "sdxl"

    @property
    def time_ids(self) -> int:
        """Size-conditioning numbers per row: original size, crop, then the target size — or, in
        a refiner (``requires_aesthetics_score``), one aesthetic score."""
        return 5 if self.pipe.config.get("requires_aesthetics_score", False) else 6

    @property
    def embed_sizes(self):
        config = self.original.config
        pooled = config.projection_class_embeddings_input_dim - self.time_ids * config.addition_time_embed_dim
        return {**super().embed_sizes, "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": pooled}

    text_options = ("prompt_2", "negative_prompt_2")

    def encode_prompt(self, prompts, negative_prompts, height, width, embeds=None, options=None):
        options = dict(options or {})
        ids, neg_ids = options.pop("time_ids", None), options.pop("negative_time_ids", None)
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative_prompts, **options, **(embeds or {}))
        n = len(cond)
        if ids is not None:
            neg_ids = ids if neg_ids is None else neg_ids
        elif self.pipe.config.get("requires_aesthetics_score", False):
            ids, neg_ids = [height, width, 0, 0, 6.0], [height, width, 0, 0, 2.5]
        else:
            ids = neg_ids = [height, width, 0, 0, height, width]
        to_rows = lambda v: torch.tensor([v] * n, dtype=cond.dtype, device=cond.device)
        return (Conditioning(cond, {"text_embeds": pooled, "time_ids": to_rows(ids)}),
                Conditioning(uncond, {"text_embeds": uncond_pooled, "time_ids": to_rows(neg_ids)}))

    def run(self, module, latents, t, cond, **residuals):
        return module(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added_conditions(cond.extras),
                      return_dict=False, **residuals)[0]

    def graph_spec(self, module=None, text_length=None):
        module = module if module is not None else self.original
        config = module.config
        pooled = config.projection_class_embeddings_input_dim - self.time_ids * config.addition_time_embed_dim
        images = self._image_inputs(module)
        inputs = self._unet_inputs(module, text_length) + [
            ModelInput("text_embeds", ("B", pooled)), ModelInput("time_ids", ("B", self.time_ids))] + images
        return GraphSpec("sdxl-unet", _SDXLUNetGraph(module, len(images)), inputs,
                         self._unet_feeds(module, ("text_embeds", "time_ids"), len(images)))


class SD3Denoiser(Denoiser):
    """SD3Transformer2DModel (MMDiT) of Stable Diffusion 3 pipelines, a flow-matching model."""

    family = "sd3"

    @property
    def embed_sizes(self):
        config = self.original.config
        width, pooled = config.joint_attention_dim, config.pooled_projection_dim
        return {"prompt_embeds": width, "negative_prompt_embeds": width,
                "pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": pooled}

    text_options = ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")

    def encode_prompt(self, prompts, negative_prompts, height, width, embeds=None, options=None):
        options = {"prompt_2": None, "prompt_3": None, **(options or {})}
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=negative_prompts, **options, **(embeds or {}))
        return (Conditioning(cond, {"pooled_projections": pooled}),
                Conditioning(uncond, {"pooled_projections": uncond_pooled}))

    def run(self, module, latents, t, cond, **controls):
        """`controls`: a ControlNet's block samples (:mod:`fastdiff.sd3_controlnet`)."""
        return module(hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeds,
                      pooled_projections=cond.extras["pooled_projections"], return_dict=False, **controls)[0]

    def graph_spec(self, module=None, text_length=None):
        module = module if module is not None else self.original
        config = module.config
        # the CLIP tokens, then T5's max_sequence_length (256 by default; zeros without T5)
        text_length = text_length or 77 + 256
        inputs = [ModelInput("hidden_states", ("B", config.in_channels, "H", "W")),
                  ModelInput("timestep", ("B",), torch.float32),
                  ModelInput("encoder_hidden_states", ("B", text_length, config.joint_attention_dim)),
                  ModelInput("pooled_projections", ("B", config.pooled_projection_dim))]
        bind = call_binder(module)

        def feeds(args, kwargs):
            a = bind(args, kwargs)
            x = a["hidden_states"]
            return {"hidden_states": x, "timestep": _timestep_rows(a["timestep"], x.shape[0]).to(x.device),
                    "encoder_hidden_states": a["encoder_hidden_states"],
                    "pooled_projections": a["pooled_projections"]}
        return GraphSpec("sd3", _SD3Graph(module), inputs, feeds)


class FluxDenoiser(Denoiser):
    """FluxTransformer2DModel of FLUX.1 pipelines (dev, schnell), a flow-matching model."""

    family = "flux"
    text_options = ("prompt_2", "negative_prompt_2")
    stream_cfg = "none"   # FLUX.1 draws without guidance rows (dev takes the scale as an input instead)

    def __init__(self, pipe, module):
        super().__init__(pipe, module)
        self._ids = {}   # ("text", tokens | "image", height, width) + (device, dtype) → ids

    @property
    def in_channels(self) -> int:
        """The latents' channels (the transformer's input is four of them per token)."""
        return self.original.config.in_channels // 4

    @property
    def size_multiple(self) -> int:
        return 2   # a token is a 2×2 patch of latents

    @property
    def native_latent_size(self) -> int:
        return self.pipe.default_sample_size

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.original.config.guidance_embeds)

    embed_sizes = SD3Denoiser.embed_sizes   # its config names the same widths: the text tokens, the pooled prompt

    def schedule_arguments(self, scheduler, num_inference_steps, sigmas, latent_shape):
        return flux.schedule_arguments(scheduler, num_inference_steps, sigmas, *latent_shape[-2:])

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return flux.pack(latents)

    def unpack(self, latents: torch.Tensor, latent_shape: tuple) -> torch.Tensor:
        channels, height, width = latent_shape
        want = (latents.shape[0], (height // 2) * (width // 2), 4 * channels)
        if latents.dim() != 3 or tuple(latents.shape) != want:
            raise ValueError(f"latents must be packed as the Flux pipeline packs them, of shape {want}, got "
                             f"{tuple(latents.shape)}")
        return flux.unpack(latents, height, width)

    def encode_prompt(self, prompts, negative_prompts, height, width, embeds=None, options=None):
        options = dict(options or {})
        guidance = options.pop(GUIDANCE, None)
        second, negative_second = options.pop("prompt_2", None), options.pop("negative_prompt_2", None)
        length = options.pop("max_sequence_length", 512)
        if options:
            raise ValueError(f"{sorted(options)}: the flux denoiser's pipelines take none of these")
        embeds = embeds or {}
        encode = lambda texts, texts_2, prefix: self.pipe.encode_prompt(
            prompt=texts, prompt_2=texts_2, device=self.device, num_images_per_prompt=1, max_sequence_length=length,
            prompt_embeds=embeds.get(f"{prefix}prompt_embeds"),
            pooled_prompt_embeds=embeds.get(f"{prefix}pooled_prompt_embeds"))[:2]
        rows = lambda texts, pooled: Conditioning(
            texts, {"pooled_projections": pooled, **self._guidance(guidance, len(texts), texts)})
        cond = rows(*encode(prompts, second, ""))
        if negative_prompts is None and "negative_prompt_embeds" not in embeds:
            return cond, cond   # no negative prompt: the pipeline guides without one (true_cfg_scale needs it)
        return cond, rows(*encode(negative_prompts, negative_second, "negative_"))

    def _guidance(self, guidance, count: int, like: torch.Tensor) -> dict:
        """A guidance-distilled model's guidance input, one per row ({} for a model without one)."""
        if not self.embeds_guidance:
            return {}
        if guidance is None:   # the pipeline class's default, where a caller sets none
            guidance = call_defaults(self.pipe)["guidance_scale"]
        return {GUIDANCE: torch.full((count,), float(guidance), device=like.device, dtype=like.dtype)}

    def _ids_of(self, key: tuple, latents: torch.Tensor, make) -> torch.Tensor:
        """The text or image ids `key` names, made once per device and dtype (the same every call)."""
        key = key + (latents.device, latents.dtype)
        if key not in self._ids:
            self._ids[key] = make()
        return self._ids[key]

    def token_ids(self, latents: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text ids, image ids) for `tokens` text tokens and `latents`' grid of 2×2 patches: the
        transformer's, and its ControlNets' (made once per size, device and dtype)."""
        _, _, height, width = latents.shape
        return (self._ids_of(("text", tokens), latents, lambda: latents.new_zeros(tokens, 3)),
                self._ids_of(("image", height, width), latents,
                             lambda: flux.image_ids(height // 2, width // 2, latents.device, latents.dtype)))

    def run(self, module, latents, t, cond, **controls):
        """`controls`: a ControlNet's block samples (:mod:`fastdiff.flux_controlnet`)."""
        if any(k.startswith(IMAGE_PROMPT) for k in cond.extras):   # never an image prompt dropped
            raise ValueError("ip_adapter_image: fastdiff runs no IP-Adapter of a Flux transformer yet")
        _, _, height, width = latents.shape
        guidance = cond.extras.get(GUIDANCE)
        text_ids, image_ids = self.token_ids(latents, cond.embeds.shape[1])
        hidden = flux.pack(latents)
        context = cond.extras.get(CONTEXT)
        if context is not None:   # Kontext: the context picture's tokens after the image's, their ids' first axis 1
            rows, cols = context.shape[-2] // 2, context.shape[-1] // 2
            hidden = torch.cat([hidden, flux.pack(context.to(latents.dtype))], 1)
            image_ids = torch.cat([image_ids, self._ids_of(("context", rows, cols), latents, lambda: flux.image_ids(
                rows, cols, latents.device, latents.dtype, first=1))], 0)
        out = module(hidden_states=hidden, timestep=t.to(latents.dtype) / 1000,
                     guidance=None if guidance is None else guidance.float(),
                     pooled_projections=cond.extras["pooled_projections"], encoder_hidden_states=cond.embeds,
                     txt_ids=text_ids, img_ids=image_ids, return_dict=False, **controls)[0]
        return flux.unpack(out[:, :(height // 2) * (width // 2)], height, width)

    def graph_spec(self, module=None, text_length=None):
        module = module if module is not None else self.original
        config = module.config
        text_length = text_length or call_defaults(self.pipe)["max_sequence_length"]   # T5's tokens
        guided = bool(config.guidance_embeds)
        # the tokens as a grid of 2×2 patches: the engine's size follows the image's height and width
        inputs = [ModelInput("patches", ("B", config.in_channels // 4, "H/2", 2, "W/2", 2)),
                  ModelInput("timestep", ("B",), torch.float32),
                  ModelInput("encoder_hidden_states", ("B", text_length, config.joint_attention_dim)),
                  ModelInput("pooled_projections", ("B", config.pooled_projection_dim))]
        inputs += [ModelInput("guidance", ("B",), torch.float32)] if guided else []
        bind = call_binder(module)

        def feeds(args, kwargs):
            a = bind(args, kwargs)
            tokens, ids = a["hidden_states"], a["img_ids"]
            rows = int(ids[-1, 1]) + 1   # the ids the adapter made: the last token's row (one scalar read)
            named = {"patches": flux.tokens_to_patches(tokens, rows, tokens.shape[1] // rows),
                     "timestep": _timestep_rows(a["timestep"], tokens.shape[0]).to(tokens.device),
                     "encoder_hidden_states": a["encoder_hidden_states"],
                     "pooled_projections": a["pooled_projections"]}
            if guided:
                named["guidance"] = a["guidance"].float()
            return named
        return GraphSpec("flux", flux.FluxGraph(module, guided), inputs, feeds,
                         returns=lambda outputs, args, kwargs: (flux.patches_to_tokens(outputs[0]),))


def _from_base(name: str) -> property:
    """A property a :class:`DenoiserAround` takes from the adapter it wraps."""
    return property(lambda self: getattr(self.base, name), doc=f"The wrapped adapter's {name}.")


class DenoiserAround(Denoiser):
    """A denoiser that changes how `base` (a family adapter) is called and is otherwise `base`:
    its family, prompts, embedding sizes, call and graph."""

    def __init__(self, base: Denoiser):
        super().__init__(base.pipe, base.original)
        self.base = base
        self.family = base.family

    embed_sizes = _from_base("embed_sizes")
    text_options = _from_base("text_options")
    stream_cfg = _from_base("stream_cfg")
    in_channels = _from_base("in_channels")
    size_multiple = _from_base("size_multiple")
    native_latent_size = _from_base("native_latent_size")
    embeds_guidance = _from_base("embeds_guidance")

    def schedule_arguments(self, scheduler, num_inference_steps, sigmas, latent_shape):
        return self.base.schedule_arguments(scheduler, num_inference_steps, sigmas, latent_shape)

    def pack(self, latents):
        return self.base.pack(latents)

    def unpack(self, latents, latent_shape):
        return self.base.unpack(latents, latent_shape)

    def encode_prompt(self, prompts, negative_prompts, height, width, embeds=None, options=None):
        return self.base.encode_prompt(prompts, negative_prompts, height, width, embeds, options)

    def run(self, module, latents, t, cond):
        return self.base.run(module, latents, t, cond)

    def graph_spec(self, module=None, text_length=None):
        return self.base.graph_spec(module, text_length)

    def engine_state(self, module=None):
        return self.base.engine_state(module)


class GroupedDenoiser(DenoiserAround):
    """The protocol over several sub-networks of one family (prompt-routed pruning): rows are
    grouped by ``cond.route``, each group is one call of its route's module, and the outputs come
    back in the rows' order. Engines replace the modules in :attr:`modules`, one per route."""

    def __init__(self, base: Denoiser, modules: dict):
        if not modules:
            raise ValueError("modules must map at least one route to a module")
        super().__init__(base)
        self.originals = {int(k): m for k, m in modules.items()}   # the PyTorch sub-networks
        self.modules = dict(self.originals)                        # what runs; engines may replace them

    def __call__(self, latents, t, cond):
        if cond.route is None:
            raise ValueError("cond: a grouped denoiser needs each row's route (Conditioning.with_route)")
        routes = cond.route
        present = routes.unique().tolist()
        missing = sorted(set(present) - set(self.modules))
        if missing:
            raise ValueError(f"cond.route names routes {missing} that have no module (have {sorted(self.modules)})")
        if len(present) == 1 and self.workers == 1:
            with attention_context(self.attention):
                return self.base.run(self.modules[present[0]], latents, t, cond)
        return self.run_calls([(self.modules[route], (routes == route).nonzero().squeeze(1)) for route in present],
                              latents, t, cond)


def denoiser_for(pipe) -> Denoiser:
    """The adapter for a pipeline's denoiser: SD 1.x/2.x UNet, SDXL UNet, SD3 or Flux transformer (its
    ControlNets, if any, are :func:`fastdiff.controlnet.with_controlnet`'s to add)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        if unet.config.get("addition_embed_type") == "text_time":
            return SDXLDenoiser(pipe, unet)
        if unet.config.get("addition_embed_type") is None:
            return UNetDenoiser(pipe, unet)
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and type(transformer).__name__ == "SD3Transformer2DModel":
        return SD3Denoiser(pipe, transformer)
    if transformer is not None and type(transformer).__name__ == "FluxTransformer2DModel":
        return FluxDenoiser(pipe, transformer)
    raise ValueError(f"pipe: {type(pipe).__name__} has no supported denoiser; supported are "
                     "UNet2DConditionModel (SD 1.x/2.x, SDXL), SD3Transformer2DModel (SD3) and "
                     "FluxTransformer2DModel (FLUX.1)")
