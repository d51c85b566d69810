"""Helpers shared by the benchmark scripts: machine facts and writing results."""

from __future__ import annotations

import os
import platform

import torch

from mechsteer import _io


def machine_info(**extra) -> dict:
    """Platform, cores, Python and torch versions, torch threads, and the 1-minute load."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **extra,
        "loadavg_1m_at_end": os.getloadavg()[0],
    }


def write_result(path: str, result: dict) -> None:
    """Write ``result`` as JSON to ``path`` atomically and say where."""
    print(f"wrote {_io.write_json(path, result)}")
