"""What a benchmark ran on: the command, date, CPU, load, GPU and library versions, for BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(argv, packages=("torch", "diffusers", "transformers")) -> dict:
    return {
        "command": " ".join(["python"] + argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        **{name: version(name) for name in packages},
    }


def save_report(path: str, script: str, argv, **fields) -> None:
    """Write `fields` to the JSON file `path`, under the environment of ``python script argv``."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": environment([script, *argv]), **fields}, f, indent=2)
