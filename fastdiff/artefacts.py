"""Artefacts: files fastdiff writes once and loads later — engines, step schedules, adapters, routers.

Every artefact carries a *manifest*: the fields it was built from (weights hash, shapes, precision,
library versions...) and a digest of its files. This module is the one place that writes and checks
them, for every kind:

- :func:`weights_hash` — sha256 over a module's state dict;
- :func:`publish_folder` — build into a private folder, write its manifest, rename it into place
  under a lock, so an interrupted build leaves nothing loadable and a rebuild never deletes a folder
  another process is reading;
- :func:`check_manifest` — a manifest is used only when every field matches what is asked for;
  otherwise :class:`StaleArtefactError` names each field that differs;
- :func:`sealed` / :func:`check_seal` — a manifest (or a single-file artefact such as a schedule)
  carries the digest of its own content, so that one edited by hand or damaged is refused rather
  than used: the file digests cover the weights, the seal covers what the manifest says of them
  (gates, sampling, timesteps);
- :func:`write_json` — atomic JSON writes (single-file artefacts such as schedules embed their
  manifest this way).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid

import torch

__all__ = ["MANIFEST", "SEAL", "StaleArtefactError", "weights_hash", "files_digest", "library_versions", "differences",
           "check_fields", "sealed", "check_seal", "write_json", "read_json", "lock", "publish_folder", "read_manifest",
           "check_manifest", "remove_leftovers"]

MANIFEST = "manifest.json"
SEAL = "content_sha256"   # the key of a manifest's digest of its own content
PARTIAL, RETIRED = ".partial-", ".retired-"


class StaleArtefactError(RuntimeError):
    """An artefact exists but was built from something else (the message names what differs)."""


def weights_hash(module: torch.nn.Module, base_only: bool = False) -> str:
    """sha256 over the module's state dict: names, dtypes, shapes and bytes, in name order. With
    `base_only`, PEFT's LoRA layers are left out and the weights they wrap keep their own names, so
    the hash is the base model's whatever adapters are attached."""
    state = module.state_dict()
    if base_only:
        state = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_digest(folder: str) -> dict:
    """{relative path: {"bytes": size, "sha256": digest}} of every file in `folder` but the manifest."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel == MANIFEST:
                continue
            files[rel] = {"bytes": os.path.getsize(path), "sha256": _file_sha256(path)}
    return dict(sorted(files.items()))


def library_versions(packages=()) -> dict:
    """torch's and fastdiff's versions, and those of `packages` that are installed."""
    from importlib import metadata

    versions = {"torch": torch.__version__}
    for package in ("fastdiff", "diffusers", *packages):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def differences(wanted: dict, found: dict) -> list[str]:
    """One line per field whose value differs: `field: built for X, asked for Y`."""
    keys = sorted(set(wanted) | set(found))
    return [f"{k}: built for {found.get(k)!r}, asked for {wanted.get(k)!r}" for k in keys
            if wanted.get(k) != found.get(k)]


def check_fields(what: str, wanted: dict, found: dict, remedy: str) -> None:
    """Raise :class:`StaleArtefactError` naming every field of `found` that differs from `wanted`."""
    differs = differences(wanted, found)
    if differs:
        raise StaleArtefactError(f"{what} was made for something else (" + "; ".join(differs) + f"); {remedy}")


def _content_digest(data: dict) -> str:
    body = json.loads(json.dumps({k: v for k, v in data.items() if k != SEAL}))   # as it reads back from the file
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(data: dict) -> dict:
    """`data` with the digest of its own content under :data:`SEAL`."""
    return {**data, SEAL: _content_digest(data)}


def check_seal(data: dict, what: str, remedy: str) -> None:
    """Raise :class:`StaleArtefactError` unless `data` carries the digest of its own content."""
    if SEAL not in data:
        raise StaleArtefactError(f"{what} carries no digest of its own content ({SEAL}): made by an older "
                                 f"fastdiff, or edited; {remedy}")
    if data[SEAL] != _content_digest(data):
        raise StaleArtefactError(f"{what} is damaged or was edited: its content does not match its own digest "
                                 f"({SEAL}); {remedy}")


def write_json(path: str, data) -> None:
    """Write `data` as JSON to `path` atomically (a reader sees the old file or the whole new one)."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def lock(path: str):
    """A file lock beside `path` that serialises its writers and readers across processes."""
    from filelock import FileLock

    return FileLock(path + ".lock")


def read_manifest(folder: str) -> dict | None:
    """The manifest in `folder`, None if it has none; :class:`StaleArtefactError` if it is unreadable."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as error:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StaleArtefactError(f"{path} is damaged: {error}") from None
    if not isinstance(manifest, dict):
        raise StaleArtefactError(f"{path} is damaged: not a JSON object")
    return manifest


def check_manifest(folder: str, fields: dict, kind: str, fmt: int, remedy: str, *, digest: bool = True) -> dict:
    """The manifest of the `kind` artefact in `folder` if it was made from `fields` in format `fmt`,
    is sealed (:func:`check_seal`) and its files are whole (sizes, and with `digest` their sha256);
    :class:`StaleArtefactError` naming what differs otherwise."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise StaleArtefactError(f"{folder} holds no {MANIFEST}: not a complete {kind}")
    found = manifest.get("fields") if isinstance(manifest.get("fields"), dict) else {}
    if manifest.get("format") != fmt:
        raise StaleArtefactError(f"the {kind} in {folder} has format {manifest.get('format')!r}; this fastdiff "
                                 f"reads {fmt}; {remedy}")
    check_fields(f"the {kind} in {folder}", fields, found, remedy)
    check_seal(manifest, f"the {kind} in {folder}", remedy)
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= e.keys()
                                              for e in files.values()):
        raise StaleArtefactError(f"the {kind} in {folder} is damaged: its manifest lists no files; {remedy}")
    for name, expected in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != expected["bytes"]:
            raise StaleArtefactError(f"the {kind} in {folder} is damaged: {name} is missing or not "
                                     f"{expected['bytes']} bytes; {remedy}")
        if digest and _file_sha256(path) != expected["sha256"]:
            raise StaleArtefactError(f"the {kind} in {folder} is damaged: {name} does not match its "
                                     f"digest; {remedy}")
    return manifest


def remove_leftovers(folder: str) -> list[str]:
    """Delete what interrupted builds and replaced artefacts left beside `folder`; their paths."""
    parent, base = os.path.split(os.path.abspath(folder))
    removed = []
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(base + PARTIAL) or name.startswith(base + RETIRED):
                path = os.path.join(parent, name)
                if name.startswith(base + PARTIAL) and _owner_alive(name):
                    continue   # another process is building it right now
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _owner_alive(name: str) -> bool:
    """Whether the process that named a partial folder (…partial-PID-…) still runs."""
    try:
        pid = int(name.split(PARTIAL, 1)[1].split("-", 1)[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def publish_folder(folder: str, fields: dict, build, fmt: int, *, extra: dict | None = None) -> dict:
    """Build an artefact into `folder`: ``build(partial) -> details`` fills a private folder, its
    manifest (fields, details, file digests, build time) is written, and the folder is renamed into
    place — replacing an old one only once the new one is whole. Call it holding :func:`lock`."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(folder)
    partial = f"{folder}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(partial)
    try:
        start = time.perf_counter()
        details = build(partial) or {}
        manifest = sealed({"format": fmt, "fields": fields, "details": details, "files": files_digest(partial),
                           "build_seconds": round(time.perf_counter() - start, 2),
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {})})
        write_json(os.path.join(partial, MANIFEST), manifest)
        if os.path.exists(folder):
            retired = f"{folder}{RETIRED}{uuid.uuid4().hex[:8]}"
            os.rename(folder, retired)
            shutil.rmtree(retired, ignore_errors=True)
        os.rename(partial, folder)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial, ignore_errors=True)
    return manifest
