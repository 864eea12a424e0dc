"""Attention backends: which kernel computes the denoiser's attention.

- ``"sdpa"`` (the default) — PyTorch's scaled-dot-product attention, letting PyTorch pick its kernel;
- ``"sdpa-flash"``, ``"sdpa-efficient"``, ``"sdpa-math"``, ``"sdpa-cudnn"`` — PyTorch's SDPA held to one
  kernel (``torch.nn.attention.sdpa_kernel`` around each denoiser call: no model code is touched);
- ``"xformers"`` — xformers' memory-efficient kernels, through diffusers'
  ``enable_xformers_memory_efficient_attention`` (the processors change);
- any other name of diffusers' attention dispatcher (``"flash"``, ``"flex"``, ``"sage"``, ...) — through
  ``set_attention_backend``, for models whose attention processors dispatch through it.

A backend that cannot run here is an error naming what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect

import torch

__all__ = ["SDPA_KERNELS", "ATTENTION_BACKENDS", "check_attention", "apply_attention", "attention_context"]

SDPA_KERNELS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH",
                "sdpa-cudnn": "CUDNN_ATTENTION"}


def _dispatcher_names() -> tuple[str, ...]:
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName
    except ImportError:   # a diffusers without the dispatcher
        return ()
    return tuple(b.value for b in AttentionBackendName if b.value != "xformers")


ATTENTION_BACKENDS = ("sdpa", *SDPA_KERNELS, "xformers", *_dispatcher_names())


def check_attention(name: str) -> str:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS[:6]} or a diffusers attention backend "
                         f"({', '.join(ATTENTION_BACKENDS[6:12])}, ...), got {name!r}")
    if name == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ImportError("attention='xformers' needs xformers: pip install xformers (a build matching your torch "
                          "and CUDA; its kernels run on CUDA only)")
    return name


def _dispatches(module: torch.nn.Module) -> bool:
    """Whether the module's attention processors call diffusers' dispatcher (the backend switch)."""
    processors = getattr(module, "attn_processors", None) or {}
    for processor in processors.values():
        try:
            return "dispatch_attention_fn" in inspect.getsource(type(processor).__call__)
        except (OSError, TypeError):
            return False
    return False


def apply_attention(module: torch.nn.Module, name: str) -> None:
    """Switch `module`'s attention to the backend `name` (sdpa kernels apply per call, see
    :func:`attention_context`)."""
    name = check_attention(name)
    if name == "xformers":
        try:
            module.enable_xformers_memory_efficient_attention()
        except Exception as error:  # noqa: BLE001 - xformers fails in many ways; say which
            raise ImportError(f"attention='xformers' failed here ({error}); xformers needs CUDA and a build matching "
                              "this torch") from error
        return
    if name == "sdpa" or name in SDPA_KERNELS:
        from diffusers.models.attention_processor import AttnProcessor2_0

        processors = getattr(module, "attn_processors", {}) or {}
        if any(type(p).__name__.startswith("XFormers") for p in processors.values()):
            module.set_attn_processor(AttnProcessor2_0())   # back from xformers to SDPA
        return
    if not _dispatches(module):
        raise ValueError(f"attention={name!r} goes through diffusers' attention dispatcher, which this "
                         f"{type(module).__name__}'s processors do not call; use 'sdpa' or one of "
                         f"{tuple(SDPA_KERNELS)} (PyTorch's kernels), or 'xformers'")
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements, AttentionBackendName

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as error:
        raise ImportError(f"attention={name!r} cannot run here: {error}") from error
    module.set_attention_backend(name)


_NOTHING = contextlib.nullcontext()   # reusable: one fewer object a denoiser call


def attention_context(name: str | None):
    """The context each denoiser call runs in: PyTorch's SDPA held to one kernel, or nothing."""
    if name not in SDPA_KERNELS:
        return _NOTHING
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[name])])
