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

from mechsteer.models import bridge_hf
from mechsteer.tiny import tiny_hf_model, tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def gpt2_biased():
    """Tiny GPT-2 with random biases and LayerNorm weights (HF initialises them to 0/1),
    so that b_O, b_U (the folded final-norm bias) and norm folding are exercised."""
    hf = tiny_hf_model("gpt2", seed=1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return bridge_hf("tiny-gpt2-biased", hf, tiny_tokenizer())


@pytest.fixture(scope="session")
def gemma3():
    """Tiny Gemma-3: post-attention/post-MLP RMSNorms (offset weights), GQA, sliding window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, attn_implementation="eager",
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
    )
    hf = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    return bridge_hf("tiny-gemma3", hf, tok)


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
