"""A prompt router as the runtime holds it (:mod:`.routing` trains one): its head, each code's binary
gates and physically pruned sub-network, the folder it is saved in, its loader, and the part of the
front doors that routes each prompt (:class:`HoldsRouter`).

The folder holds the router's weights, the codes' gates and the sub-networks' fine-tuning: low-rank
adapters (merged into the pruned weights on loading, which follow from the base model and the
gates), one shared adapter on the full network, or whole pruned weights (rank 0); with a manifest
of the base weights hash, units, K, MACs per code and target. A mismatch is refused.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..artefacts import StaleArtefactError, check_fields, library_versions, lock, publish_folder, read_manifest
from ..denoiser import GroupedDenoiser, denoiser_for
from .pruning import Unit, gate_size, prune
from .schedules import model_hash

__all__ = ["Router", "RouterHead", "HoldsRouter", "load_router", "pooled_prompts", "FORMAT"]

FORMAT = 1
KIND = "fastdiff-router"
REMEDY = "train a router for this model (fastdiff tune route)"


class RouterHead(torch.nn.Module):
    """Pooled prompt embedding → architecture vector; K learned codes, each a direction in that space
    and a vector of gate logits. `nested`: the codes' logits are one shared vector plus a level per
    code, so every code keeps the gates ranked highest by the same order, and a smaller code's
    network lies inside every larger one's."""

    def __init__(self, text_dim: int, gates: int, codes: int, hidden: int = 256, nested: bool = False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(text_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        self.directions = torch.nn.Parameter(torch.randn(codes, hidden) / math.sqrt(hidden))
        self.nested = nested
        if nested:
            self.shared = torch.nn.Parameter(torch.full((gates,), 1.0))   # start open: the full model
            self.levels = torch.nn.Parameter(torch.zeros(codes))
        else:
            self.logits = torch.nn.Parameter(torch.full((codes, gates), 1.0))
        self.register_buffer("offsets", torch.zeros(codes))   # each code's score shift (see calibrate_router)

    def code_logits(self) -> torch.Tensor:
        """Every code's gate logits [K, G]."""
        return self.shared + self.levels[:, None] if self.nested else self.logits

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each prompt's architecture vector to each code, plus the code's offset [B, K]."""
        return F.normalize(self.net(pooled), dim=-1) @ F.normalize(self.directions, dim=-1).T + self.offsets


@dataclass
class Router:
    """A trained router: its head, each code's binary gates and sub-network, and their MACs."""

    head: RouterHead
    units: list[Unit]
    gates: torch.Tensor            # [K, G] binary
    subnets: dict                  # code → pruned module
    fields: dict
    details: dict = field(default_factory=dict)
    adapters: dict = field(default_factory=dict)   # code (or "shared") → its fine-tuning's LoRA weights (rank > 0)
    rank: int = 0
    finetune: str = "per-code"     # each code its own adapter, or one "shared" adapter on the full network

    @property
    def codes(self) -> int:
        return self.gates.shape[0]

    @torch.no_grad()
    def route(self, pipe, prompts: list[str], embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The code of each prompt (int64 [B]), deterministic: the nearest code by cosine. `embeds`:
        the prompts' text embeddings already computed (see :func:`pooled_prompts`)."""
        return self.head.scores(pooled_prompts(pipe, prompts, embeds)).argmax(-1)

    def check(self, pipe) -> "Router":
        adapter = denoiser_for(pipe)
        wanted = {"base": model_hash(adapter.original), "family": adapter.family,
                  "text_encoder": model_hash(pipe.text_encoder)}
        check_fields("this router", wanted, {k: self.fields.get(k) for k in wanted}, REMEDY)
        return self

    def grouped(self, pipe) -> GroupedDenoiser:
        """The pipeline's denoiser as a grouped one over this router's sub-networks."""
        return GroupedDenoiser(denoiser_for(pipe), self.subnets)

    def save(self, folder: str) -> str:
        from safetensors.torch import save_file

        def build(partial):
            save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, os.path.join(partial, "router.safetensors"))
            if self.finetune == "shared":
                files = {"shared": self.adapters["shared"]}
            else:
                files = {f"subnet-{code}": self.adapters[code] if self.rank else module.state_dict()
                         for code, module in self.subnets.items()}
            for name, weights in files.items():
                save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(partial, f"{name}.safetensors"))
            return self.details

        extra = {"kind": KIND, "units": [asdict(u) for u in self.units], "gates": self.gates.int().tolist(),
                 "head": {"text_dim": self.head.net[0].in_features, "hidden": self.head.net[0].out_features,
                          "nested": self.head.nested},
                 "finetune_rank": self.rank, "finetune": self.finetune, "versions": library_versions(("peft",))}
        os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
        with lock(folder):
            publish_folder(folder, self.fields, build, FORMAT, extra=extra)
        return folder


def pooled_prompts(pipe, prompts: list[str], embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen sentence embedding of each prompt: the text encoder's pooled output (float32 [B, D]).
    `embeds`, the encoder's last hidden states of these prompts (what the pipeline's encode_prompt
    gives a CLIP encoder), spare a second pass: CLIP pools the end-of-text token's final state, which
    the causal mask keeps apart from the padding after it."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    if embeds is None or type(encoder).__name__ != "CLIPTextModel":
        with torch.no_grad():
            return encoder(ids)[1].float()
    eos = encoder.config.eos_token_id   # CLIP's own rule: 2 marks configs whose end token is the largest id
    where = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
    return embeds[torch.arange(len(ids), device=embeds.device), where.to(embeds.device)].float()


def load_router(router, pipe) -> Router:
    """A :class:`Router` from its folder (or one already loaded), checked against `pipe`."""
    if isinstance(router, Router):
        return router.check(pipe)
    if not isinstance(router, (str, os.PathLike)) or not os.path.isdir(router):
        raise ValueError(f"router: no router folder at {router!r}")
    from safetensors.torch import load_file

    from ..artefacts import check_manifest

    manifest = read_manifest(str(router))
    if manifest is None or manifest.get("kind") != KIND:
        raise ValueError(f"router: {router} is not a fastdiff router folder")
    try:
        check_manifest(str(router), manifest["fields"], "router", FORMAT, REMEDY)
    except StaleArtefactError as error:
        raise StaleArtefactError(str(error)) from None
    units = [Unit(**u) for u in manifest["units"]]   # under the manifest's seal, checked above
    gates = torch.tensor(manifest["gates"], dtype=torch.float32)
    head = RouterHead(manifest["head"]["text_dim"], gate_size(units), len(gates), manifest["head"]["hidden"],
                      manifest["head"].get("nested", False))
    state = load_file(os.path.join(router, "router.safetensors"))
    state.setdefault("offsets", torch.zeros(len(gates)))   # saved before routers were calibrated
    head.load_state_dict(state)
    rank = int(manifest.get("finetune_rank", 0))
    finetune = manifest.get("finetune", "per-code")
    loaded = Router(head.eval(), units, gates, {}, manifest["fields"], manifest.get("details", {}), rank=rank,
                    finetune=finetune)
    loaded.check(pipe)
    base = plain_base(denoiser_for(pipe).original)

    def adapted(module, key, name):   # `module` with the LoRA of `name`.safetensors merged in
        weights = load_file(os.path.join(router, f"{name}.safetensors"))
        _set_lora(module, rank, weights, f"router: {router}'s adapter weights don't fit {name}")
        loaded.adapters[key] = weights
        return merge_lora(module)

    full = adapted(copy.deepcopy(base).float(), "shared", "shared") if finetune == "shared" else None
    for code in range(len(gates)):
        if full is not None:   # one adapter on the full network: each code is that network pruned
            module = prune(full, units, gates[code])
        elif rank:
            module = adapted(prune(base, units, gates[code]).float(), code, f"subnet-{code}")
        else:
            module = prune(base, units, gates[code]).float()
            module.load_state_dict(load_file(os.path.join(router, f"subnet-{code}.safetensors")))
        loaded.subnets[code] = placed_like(module, base).eval().requires_grad_(False)
    return loaded


def _set_lora(module, rank: int, weights: dict, what: str) -> None:
    """Give `module` a rank-`rank` LoRA holding `weights`; refused (naming `what`) if they don't fit."""
    from peft import set_peft_model_state_dict

    from .onestep import add_lora   # here: onestep imports the stream, which imports this module

    add_lora(module, rank)
    result = set_peft_model_state_dict(module, weights)
    wrong = result.unexpected_keys + [k for k in result.missing_keys if "lora_" in k]
    if wrong:
        raise StaleArtefactError(f"{what} ({wrong[0]}, ...); {REMEDY}")


def plain_base(base):
    """`base`, or a copy of it without LoRA layers where an adapter is or was attached (PEFT leaves
    its wrappers after a delete): the router prunes and fine-tunes the base weights alone."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not any(isinstance(m, BaseTunerLayer) for m in base.modules()):
        return base
    plain = copy.deepcopy(base)
    plain.unload_lora()
    return plain


def merge_lora(module):
    """`module` with its LoRA folded into the weights and the adapter layers gone: a plain network."""
    module.fuse_lora()
    module.unload_lora()
    return module


def placed_like(module, like):
    """`module` on `like`'s device and in its dtype (cast only when it differs)."""
    module = module.to(like.device)
    return module if next(module.parameters()).dtype == like.dtype else module.to(like.dtype)


class HoldsRouter:
    """The router part of a front door holding ``self.pipe`` and ``self.parts``: the router, and the
    grouped denoiser its sub-networks run as."""

    router: Router | None = None

    def _set_router(self, router) -> None:
        if router is None:
            if self.router is not None:
                self.parts.denoiser = denoiser_for(self.pipe)
            self.router = None
            return
        if getattr(self.pipe, "controlnet", None) is not None:
            raise ValueError("router: the pruned sub-networks take no ControlNet's residuals; a ControlNet pipeline "
                             "runs unrouted")
        if getattr(self, "adapter", None) is not None:
            raise ValueError("router: an adapter is attached, and the router's pruned sub-networks would run "
                             "without it; use one or the other")
        self.router = load_router(router, self.pipe)
        self.parts.denoiser = self.router.grouped(self.pipe)

    def _route(self):
        """What :meth:`fastdiff.stream.prepare.Prepared.encode` routes prompts with (None: unrouted)."""
        if self.router is None:
            return None
        device = self.parts.denoiser.device
        return lambda prompts, cond: self.router.route(self.pipe, prompts, cond.embeds).to(device)
