"""The tuning layer: offline searches that write artefacts the runtime loads, each a function
(pipeline, prompts, budget) → an artefact with a manifest, plus the loader the front doors use.

- :func:`search_steps` — timestep search (evolution, dynamic programming, Align Your Steps) → a
  :class:`Schedule` JSON file; ``fastdiff.accelerate(pipe, schedule=...)``, ``fastdiff.Stream(pipe, steps=...)``.
- :func:`train_onestep` — a one-step LoRA adapter (HiPA-style) → a diffusers-loadable LoRA folder;
  ``accelerate(pipe, adapter=...)``, ``Stream(pipe, adapter=...)``, ``stream.set_adapter(...)``.
- :func:`train_router` — prompt-routed pruning (APTP) → a router folder with its pruned
  sub-networks; ``accelerate(pipe, router=...)``, ``Stream(pipe, router=...)``; :func:`join_routers`
  routes over the codes of routers (or single pruned models) made apart; :func:`calibrate_router` sets
  the MACs a router spends on the prompts it will serve.
"""

from .adapters import FLOW_FAMILIES, KNOWN_FAMILIES, Adapter, known_families, load_adapter
from .fitness import DEFAULT_WEIGHTS, Trajectories, shapes_judge
from .onestep import train_onestep
from .routers import Router, load_router
from .routing import calibrate_router, join_routers, train_router
from .schedules import Schedule, load_schedule
from .steps import METHODS, search_steps

__all__ = ["Adapter", "DEFAULT_WEIGHTS", "FLOW_FAMILIES", "KNOWN_FAMILIES", "METHODS", "Router", "Schedule", "Trajectories",
           "calibrate_router", "join_routers", "known_families", "load_adapter", "load_router", "load_schedule", "search_steps",
           "shapes_judge", "train_onestep", "train_router"]
