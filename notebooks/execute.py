"""Execute the notebooks on the embedded SmolLM2 model and save them with their outputs
(``make notebooks``). Plotly figures are saved as plotly's JSON mime bundle
(``PLOTLY_RENDERER=plotly_mimetype``), not with plotly.js inlined per figure, so each notebook
stays small; execution order is fixed and the notebooks seed themselves, so a rerun gives a
small diff. The test suite keeps running them on the tiny model (tests/test_notebooks.py).

    python notebooks/execute.py [NOTEBOOK ...]     # default: every notebooks/*.ipynb
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
MAX_BYTES = 2_000_000


def execute(path: Path) -> float:
    os.environ.pop("MECHSTEER_NOTEBOOK_MODEL", None)  # the embedded model, not the tiny one
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype"  # figures as JSON, plotly.js not inlined
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:  # drop run-specific metadata so reruns diff only in outputs
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, path)
    size = path.stat().st_size
    print(f"{path.name}: {seconds:.0f} s, {size / 1e6:.2f} MB", flush=True)
    if size > MAX_BYTES:
        print(f"warning: {path.name} is over {MAX_BYTES / 1e6:.0f} MB", file=sys.stderr)
    return seconds


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(HERE.glob("*.ipynb"))
    total = sum(execute(p) for p in paths)
    print(f"all: {total:.0f} s")
