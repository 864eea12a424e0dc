"""The engine cache: where artefacts live, what they were built from, and who may write them.

Each artefact has a folder (a *slot*) named after what was asked for: component, backend,
precision and a hash of the weights (LoRA scales included), shape profile, opset and options. It
holds the artefact's files and ``manifest.json``, which records every field of the key, the library
and device versions too. An artefact is used only when all of them match; one built by other
library versions or for another device is refused with the fields that differ (or rebuilt when
``rebuild=True``), and so is any folder handed over explicitly that was built from other weights.

Writes are atomic: a build fills a private folder and renames it into place once its manifest is
written, so an interrupted build leaves nothing loadable. A lock file per slot serialises builders
of the same slot across processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid

import torch

MANIFEST = "manifest.json"
FORMAT = 1   # bumped when the layout or the key's fields change


class StaleEngineError(RuntimeError):
    """An artefact exists for the slot but was built from something else."""


def default_cache_dir() -> str:
    return os.environ.get("FASTDIFF_ENGINE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastdiff", "engines")


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lora_scales(module: torch.nn.Module) -> dict:
    """Scales of unfused PEFT LoRA layers ({module name: {adapter: scale}}): they change the output
    without changing the state dict's values. Fused LoRA is already in the weights."""
    scales = {}
    for name, sub in module.named_modules():
        scaling = getattr(sub, "scaling", None)
        if isinstance(scaling, dict) and scaling:
            scales[name] = {str(k): float(v) for k, v in sorted(scaling.items())}
    return scales


def library_versions(backend: str) -> dict:
    from importlib import metadata

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    packages = {"onnxruntime": ["onnx", "onnxruntime", "onnxruntime-gpu"], "tensorrt": ["onnx", "tensorrt"],
                "aoti": [], "inductor": []}[backend]
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


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
ASKED = ("component", "kind", "module", "weights", "lora", "backend", "precision", "profile", "opset", "options")


def slot_name(fields: dict) -> str:
    asked = engine_key({k: fields.get(k) for k in ASKED})[:16]
    return f"{fields['component']}-{fields['backend']}-{fields['precision']}-{asked}"


def _lock(path: str):
    from filelock import FileLock

    return FileLock(path + ".lock")


def _differences(wanted: dict, found: dict) -> list[str]:
    keys = sorted(set(wanted) | set(found))
    return [f"{k}: built for {found.get(k)!r}, asked for {wanted.get(k)!r}" for k in keys
            if wanted.get(k) != found.get(k)]


def _folder_files(folder: str) -> dict:
    return {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name != MANIFEST}


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_artefact(folder: str, fields: dict) -> dict:
    """The manifest of the artefact in `folder` if it was built from `fields` and is complete;
    raises :class:`StaleEngineError` naming what differs otherwise."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise StaleEngineError(f"{folder} holds no {MANIFEST}: not a complete engine")
    if manifest.get("format") != FORMAT or manifest.get("fields") != fields:
        differs = _differences(fields, manifest.get("fields", {}))
        if manifest.get("format") != FORMAT:
            differs.insert(0, f"format: {manifest.get('format')!r}, this fastdiff reads {FORMAT}")
        raise StaleEngineError(f"the engine in {folder} is stale or was built for something else ("
                               + "; ".join(differs) + "); rebuild it (rebuild=True, or `fastdiff build --rebuild`) "
                               "or delete the folder")
    for name, size in manifest["files"].items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            raise StaleEngineError(f"the engine in {folder} is damaged: {name} is missing or not {size} bytes")
    return manifest


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
        manifest = read_manifest(folder)
        built = (manifest or {}).get("fields", {})
        if {k: v for k, v in built.items() if k != "profile"} == same and covers(built["profile"], fields["profile"]):
            try:
                check_artefact(folder, built)
            except StaleEngineError:
                continue
            return folder
    return None


def build_or_load(folder: str, fields: dict, build, *, rebuild: bool = False, on_stale: str = "error") -> tuple[dict, bool]:
    """Make sure `folder` holds the artefact of `fields`; (its manifest, whether it was built now).

    ``build(partial_folder) -> dict`` writes the artefact's files into a private folder and returns
    details for the manifest. An up-to-date artefact is kept; a stale one is refused
    (:class:`StaleEngineError`) unless ``rebuild``. Builders of one folder wait for each other.
    """
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    with _lock(folder):
        if os.path.exists(folder) and not rebuild:
            return check_artefact(folder, fields), False
        partial = f"{folder}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.makedirs(partial)
        try:
            start = time.perf_counter()
            details = build(partial) or {}
            manifest = {"format": FORMAT, "key": engine_key(fields), "fields": fields, "details": details,
                        "files": _folder_files(partial), "build_seconds": round(time.perf_counter() - start, 2),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _write_json(os.path.join(partial, MANIFEST), manifest)
            if os.path.exists(folder):    # a rebuild: the old artefact goes only once the new one is whole
                retired = f"{folder}.retired-{uuid.uuid4().hex[:8]}"
                os.rename(folder, retired)
                shutil.rmtree(retired, ignore_errors=True)
            os.rename(partial, folder)
        finally:
            if os.path.exists(partial):
                shutil.rmtree(partial, ignore_errors=True)
    return manifest, True


def _write_json(path: str, data: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
