"""The engine cache: where engine artefacts live, what they were built from, and who may write them.

Each artefact has a folder (a *slot*) named after what was asked for: component, backend,
precision and a hash of the weights (LoRA state included), shape profile, opset and options. It
holds the artefact's files and ``manifest.json`` (written and checked by :mod:`fastdiff.artefacts`),
which records every field of the key, the library and device versions too, and a digest of every
file. An artefact is used only when all of them match; one built by other library versions or for
another device is refused with the fields that differ (or rebuilt when ``rebuild=True``), and so is
any folder handed over explicitly that was built from other weights.

Builds fill a private folder and rename it into place once its manifest is written, so an
interrupted build leaves nothing loadable; leftovers of interrupted builds are cleaned up. A lock
file per slot serialises builders *and loaders* of the slot across processes, so a rebuild never
deletes a folder while another process loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

import torch

from ..artefacts import (MANIFEST, StaleArtefactError, check_manifest, differences, lock, publish_folder,
                         read_manifest, remove_leftovers)
from ..artefacts import weights_hash as weights_hash  # noqa: PLC0414 - the key's weights field

FORMAT = 2   # bumped when the layout or the key's fields change (2: file digests, LoRA state, versions)
REMEDY = "rebuild it (rebuild=True, or `fastdiff build --rebuild`) or delete the folder"


class StaleEngineError(StaleArtefactError):
    """An artefact exists for the slot but was built from something else."""


def default_cache_dir() -> str:
    return os.environ.get("FASTDIFF_ENGINE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastdiff", "engines")


def lora_scales(module: torch.nn.Module) -> dict:
    """The PEFT adapter state of the module's LoRA layers ({module name: {"active": [...], "scales":
    {adapter: scale}, "disabled": bool}}): it changes the output without changing the state dict's
    values. Fused LoRA is already in the weights."""
    state = {}
    for name, sub in module.named_modules():
        scaling = getattr(sub, "scaling", None)
        if isinstance(scaling, dict) and scaling:
            active = getattr(sub, "active_adapters", None)
            active = [active] if isinstance(active, str) else list(active or [])
            state[name] = {"scales": {str(k): float(v) for k, v in sorted(scaling.items())},
                           "active": sorted(map(str, active)),
                           "disabled": bool(getattr(sub, "disable_adapters", False))}
    return state


def library_versions(packages) -> dict:
    """The versions an engine depends on: torch, fastdiff, diffusers (they shape the exported graph)
    and the backend's own `packages`. Not the Python version: a plan does not depend on it."""
    from ..artefacts import library_versions as versions

    return versions(packages)


def device_fields(device: torch.device) -> dict:
    """What a plan depends on: for CUDA the GPU's name and compute capability, for the CPU its arch."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}",
                "cuda": torch.version.cuda}
    return {"type": device.type, "machine": platform.machine()}


def engine_key(fields: dict) -> str:
    """The key of an artefact: a hash of its fields (canonical JSON)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


# What the user asks for picks the slot; the rest (library and device versions, the graph's I/O names)
# is what an artefact in that slot must still match, or it is stale.
ASKED = ("component", "kind", "module", "weights", "lora", "state", "backend", "precision", "profile", "opset", "options")


def slot_name(fields: dict) -> str:
    asked = engine_key({k: fields.get(k) for k in ASKED})[:16]
    return f"{fields['component']}-{fields['backend']}-{fields['precision']}-{asked}"


def check_artefact(folder: str, fields: dict, *, digest: bool = True) -> dict:
    """The manifest of the artefact in `folder` if it was built from `fields` and is whole (file
    sizes and digests); raises :class:`StaleEngineError` naming what differs otherwise."""
    try:
        return check_manifest(folder, fields, "engine", FORMAT, REMEDY, digest=digest)
    except StaleEngineError:
        raise
    except StaleArtefactError as error:
        raise StaleEngineError(str(error)) from None


def covers(built: dict, asked: dict) -> bool:
    """Whether a profile built for (min, opt, max) ranges takes every shape of the asked ranges."""
    return all(built[k][0] <= asked[k][0] and asked[k][2] <= built[k][2] for k in ("batch", "height", "width"))


def find_covering(cache_dir: str, fields: dict) -> str | None:
    """A complete, up-to-date artefact in `cache_dir` built from the same fields as `fields` but for a
    profile covering its profile (e.g. by ``fastdiff build`` for a batch range); None if there is none."""
    if not os.path.isdir(cache_dir):
        return None
    prefix = f"{fields['component']}-{fields['backend']}-{fields['precision']}-"
    same = {k: v for k, v in fields.items() if k != "profile"}
    for name in sorted(os.listdir(cache_dir)):
        folder = os.path.join(cache_dir, name)
        if not name.startswith(prefix) or "." in name or not os.path.isdir(folder):
            continue
        try:
            built = (read_manifest(folder) or {}).get("fields")
            if not isinstance(built, dict) or "profile" not in built:
                continue
            same_but_profile = {k: v for k, v in built.items() if k != "profile"} == same
            if same_but_profile and covers(built["profile"], fields["profile"]):
                check_artefact(folder, built)
                return folder
        except StaleArtefactError:   # damaged or stale: not one to take
            continue
    return None


def build_or_load(folder: str, fields: dict, build, *, rebuild: bool = False) -> tuple[dict, bool]:
    """Make sure `folder` holds the artefact of `fields`; (its manifest, whether it was built now).

    ``build(partial_folder) -> dict`` writes the artefact's files into a private folder and returns
    details for the manifest. An up-to-date artefact is kept; a stale one is refused
    (:class:`StaleEngineError`) unless ``rebuild``. Builders of one folder wait for each other.
    """
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    with lock(folder):
        if os.path.exists(folder) and not rebuild:
            return check_artefact(folder, fields), False
        manifest = publish_folder(folder, fields, build, FORMAT, extra={"key": engine_key(fields)})
    return manifest, True


def loading(folder: str):
    """The slot's lock, held while an engine is loaded: a rebuild can't swap the folder mid-load."""
    return lock(folder)


def clean(cache_dir: str) -> list[str]:
    """Delete what interrupted builds and replaced artefacts left in `cache_dir`; their paths."""
    if not os.path.isdir(cache_dir):
        return []
    slots = {name.split(".partial-")[0].split(".retired-")[0] for name in os.listdir(cache_dir)}
    return [path for slot in sorted(slots) for path in remove_leftovers(os.path.join(cache_dir, slot))]


__all__ = ["MANIFEST", "FORMAT", "StaleEngineError", "default_cache_dir", "weights_hash", "lora_scales",
           "library_versions", "device_fields", "engine_key", "slot_name", "read_manifest", "check_artefact",
           "covers", "find_covering", "build_or_load", "loading", "clean", "differences"]
