"""Helpers shared by the benchmark scripts: machine facts and writing results."""

from __future__ import annotations

import argparse
import os
import platform

import torch

import mechsteer
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


def parse_args(doc: str, name: str, *, n: int, reps: int) -> argparse.Namespace:
    """The common flags: --model smollm2|tiny, --n prompts, --reps, --out JSON path."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                    help="embedded SmolLM2-135M (default) or the tiny random llama for a quick check")
    ap.add_argument("--n", type=int, default=n, help="IOI prompts in the batch")
    ap.add_argument("--reps", type=int, default=reps, help="timed repetitions per case (median reported)")
    ap.add_argument("--out", default=f"benchmarks/results/{name}.json", help="JSON results path")
    return ap.parse_args()


def load(choice: str):
    """The model a benchmark runs on: the embedded SmolLM2, or the tiny llama."""
    return mechsteer.load_model("tiny-llama" if choice == "tiny" else None)
