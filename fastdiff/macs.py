"""The one MACs counter: multiply-accumulates of a module's call, as torch's FLOP counter counts them
(matrix products, convolutions, attention; one MAC = two FLOPs), in total and per submodule."""

from __future__ import annotations

import torch

__all__ = ["module_macs", "call_macs"]


def module_macs(module: torch.nn.Module, *args, **kwargs) -> tuple[float, dict[str, float]]:
    """(MACs of ``module(*args, **kwargs)``, {submodule name: its MACs}) — names as
    ``module.named_modules()`` gives them ("" is the whole)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    root = type(module).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        key = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
        per_module[key] = sum(ops.values()) / 2
    return counter.get_total_flops() / 2, per_module


def call_macs(fn, *args, **kwargs) -> float:
    """MACs of any call ``fn(*args, **kwargs)``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() / 2
