"""The engine build script's implementation (``fastdiff build`` and ``engines/build.py``).

For each asked component of a pipeline: export, optimise and build the backend's artefact into the
output folder (the engine cache by default), one progress bar per component with a step per stage,
skipping artefacts that are already up to date; then a summary of what was built, its size and key.
Streams and ``accelerate`` find these artefacts when pointed at the same folder
(``engine_options={"cache_dir": ...}``) and their shapes lie within the built profile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import cache
from .backends import STAGES, build_artefact, check_precision, engine_fields, resolve_backend
from .components import available_components, component
from .onnx_export import MIN_OPSET
from .profiles import ShapeProfile, check_resolutions, family_profile_names, load_family_profile


@dataclass
class BuiltEngine:
    component: str
    backend: str
    precision: str
    status: str          # "built" or "up to date"
    folder: str
    key: str
    bytes: int
    exporter: str | None


def default_profile(model: str, pipe) -> dict:
    """The family profile file for `model` when there is one, else the model's native size, batch 1..4."""
    if model in family_profile_names():
        return load_family_profile(model)
    from ..denoiser import denoiser_for
    from ..vae import LatentCodec

    native = denoiser_for(pipe).native_latent_size * LatentCodec(pipe.vae).scale_factor
    # batch up to 8 rows: what accelerate's defaults (4 images, full CFG) and a 2-step stream use
    return {"resolutions": [[native, native]], "batch": [1, 2, 8], "components": available_components(pipe)}


def build_engines(pipe, *, components=None, backend: str = "auto", precision: str | None = None,
                  resolutions=None, batch=None, out_dir: str | None = None, rebuild: bool = False,
                  opset: int = MIN_OPSET, exporter: str = "auto", defaults: dict | None = None,
                  progress: bool = True) -> list[BuiltEngine]:
    """Build `components` of `pipe` (default: the profile's, else all the pipeline holds) for
    `backend` at `precision`, for `resolutions` [(h, w), ...] and `batch` (min, opt, max)."""
    from tqdm import tqdm

    defaults = defaults or {}
    components = list(components or defaults.get("components") or available_components(pipe))
    held = available_components(pipe)
    for name in components:
        if name not in held:
            raise ValueError(f"components: {name!r} is not one of this pipeline's {held}")
    resolutions = check_resolutions(resolutions or defaults.get("resolutions") or [])
    batch = tuple(batch or defaults.get("batch") or (1, 2, 8))
    heights, widths = [h for h, _ in resolutions], [w for _, w in resolutions]
    profile = ShapeProfile(batch, (min(heights), heights[0], max(heights)), (min(widths), widths[0], max(widths)))
    device = next(pipe.unet.parameters() if getattr(pipe, "unet", None) is not None
                  else pipe.transformer.parameters()).device
    backend = resolve_backend(backend, device)
    if backend == "inductor":
        raise ValueError("backend: 'inductor' (torch.compile) builds nothing to keep; use 'aoti' for persisted "
                         "Inductor engines, or 'onnxruntime' / 'tensorrt'")
    out_dir = out_dir or cache.default_cache_dir()
    built = []
    for name in components:
        part = component(pipe, name, text_length=defaults.get("text_length"))
        chosen = check_precision(precision, part)
        fields = engine_fields(part, backend, chosen, profile, opset)
        folder = os.path.join(out_dir, cache.slot_name(fields))
        stages = STAGES[backend]
        with tqdm(total=len(stages), desc=f"{name} ({backend}, {chosen})", unit="stage", disable=not progress) as bar:
            def advance(stage, bar=bar):
                bar.set_postfix_str(stage)
                bar.update(1)
            manifest, now = build_artefact(part, folder, fields, rebuild=rebuild, exporter=exporter, progress=advance)
            if not now:
                bar.set_postfix_str("up to date")
                bar.update(len(stages) - bar.n)
        built.append(BuiltEngine(name, backend, chosen, "built" if now else "up to date", folder, manifest["key"],
                                 sum(f["bytes"] for f in manifest["files"].values()), manifest["details"].get("exporter")))
    return built


def summary(built: list[BuiltEngine]) -> str:
    """A table of what was built: component, backend, precision, status, size, key, folder."""
    rows = [("component", "backend", "precision", "status", "size", "exporter", "key", "folder")]
    for b in built:
        rows.append((b.component, b.backend, b.precision, b.status, f"{b.bytes / 1e6:.1f} MB", b.exporter or "-",
                     b.key, b.folder))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
