"""Every notebook in ``notebooks/`` runs top to bottom without an error.

By default a notebook runs on the tiny random-weight model (``MECHSTEER_NOTEBOOK_MODEL=
tiny-llama`` in the kernel's environment), which takes seconds. The quickstart also runs on
the embedded SmolLM2 model under the ``integration`` marker (``-m integration``).

The kernel is ipykernel's ``python3``: jupyter_client starts a kernel spec whose command is
``python`` with ``sys.executable``, so the kernel runs in the interpreter running pytest (the
project's virtualenv); no kernelspec needs installing. The first cell the test prepends
checks that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ENV_VAR = "MECHSTEER_NOTEBOOK_MODEL"
CELL_TIMEOUT = 600


def _cases() -> list:
    cases = [pytest.param(nb, "tiny-llama", id=f"{nb.stem}-tiny-llama") for nb in NOTEBOOKS]
    cases.append(
        pytest.param(
            NOTEBOOK_DIR / "00_quickstart.ipynb", None, id="00_quickstart-embedded", marks=pytest.mark.integration
        )
    )
    return cases


def _same_interpreter_cell():
    """A cell that fails unless the kernel runs in pytest's interpreter environment."""
    return nbformat.v4.new_code_cell(
        "import sys\n"
        f"assert sys.prefix == {sys.prefix!r}, "
        f"f'kernel runs in {{sys.executable}}, not in pytest\\'s {sys.executable}'"
    )


@pytest.mark.parametrize(("path", "model"), _cases())
def test_notebook_runs(path: Path, model: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if model is None:
        from mechsteer.embedded import DEFAULT_MODEL, EMBEDDED, is_installed

        if not is_installed(EMBEDDED[DEFAULT_MODEL]):
            pytest.skip(f"embedded model not installed: {EMBEDDED[DEFAULT_MODEL].install}")
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, model)  # the kernel inherits os.environ when it starts

    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, _same_interpreter_cell())
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(path.parent)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
