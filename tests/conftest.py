"""Fixtures: tiny random-weight models (fast, in memory) and the embedded SmolLM2 model.

Tests marked ``integration`` use the real embedded model; they load it once per session.
"""

from __future__ import annotations

import os

import pytest
import torch

# Under pytest-xdist (`make test` runs `-n auto --dist loadfile`), share the cores among the
# workers instead of letting each torch use them all (oversubscribed threads run slower).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from mechsteer.tiny import tiny_model


@pytest.fixture(scope="session")
def tiny_gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny(request, tiny_gpt2, tiny_llama):
    """Both tiny families, one after the other."""
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]


@pytest.fixture(scope="session")
def smollm2():
    import mechsteer

    return mechsteer.load_model()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
