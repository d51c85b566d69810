"""The documentation site builds offline in strict mode (a broken link, a missing README
section or an API reference that does not resolve fails), from mkdocs.yml, as `make docs`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings", reason='the docs need the dev extra: pip install -e ".[dev]" (or ".[docs]")')
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = tmp_path / "site"
    index = (site / "index.html").read_text()
    assert "make demo" in index and "readme:" not in index  # README sections included
    api = (site / "api" / "attribution" / "index.html").read_text()
    assert "AttributionResult" in api and "token_view" in api  # docstrings rendered
    assert (site / "report.png").exists()
    assert "<script src=\"http" not in index  # nothing fetched when the page is opened
    print(f"docs built in {seconds:.1f} s")
