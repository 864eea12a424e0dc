"""The tuning layer: offline searches that write artefacts the runtime loads.

- :func:`search_steps` — timestep search (evolution, dynamic programming, Align Your Steps) →
  a :class:`Schedule` JSON file, loaded by ``fastdiff.accelerate(pipe, schedule=...)`` and
  ``fastdiff.Stream(pipe, steps=...)``.
"""

from .fitness import DEFAULT_WEIGHTS, Trajectories, shapes_judge
from .schedules import Schedule, load_schedule
from .steps import METHODS, search_steps

__all__ = ["DEFAULT_WEIGHTS", "METHODS", "Schedule", "Trajectories", "load_schedule", "search_steps",
           "shapes_judge"]
