"""Tiny random-weight models for fast tests, built in memory with no hub access.

Two families, from Hugging Face configs, bridged exactly like the real models:

- ``"gpt2"``: LayerNorm, learned positions, biases everywhere, GELU MLP.
- ``"llama"``: RMSNorm, rotary, grouped-query attention (4 query heads, 2 KV heads),
  gated SiLU MLP, no biases.

The tokenizer is a byte-level BPE trained in memory (milliseconds) on text made from
mechsteer's own task data, so task words such as " Paris" or " Anne" are single tokens,
as they are for real tokenizers.
"""

from __future__ import annotations

import functools

import torch

from mechsteer.tasks import data

TINY_VOCAB = 2048
SPECIAL = ["<|endoftext|>", "<pad>"]


def _corpus() -> list[str]:
    words = [c for c, _ in data.COUNTRY_CAPITALS] + [k for _, k in data.COUNTRY_CAPITALS]
    words += data.NAMES + data.OBJECTS + data.PLACES
    lines = [" ".join(words)] * 50  # every word frequent enough to become one token
    lines += [t.replace("{", "").replace("}", "") for t in data.IOI_TEMPLATES] * 20
    lines += [data.CCC_TEMPLATE.replace("{", "").replace("}", "")] * 20
    lines += ["The quick brown fox jumps over the lazy dog. Q: A: 0123456789"] * 5
    return lines


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer trained offline in memory (vocab capped at
    2048; about 1,065 tokens are learned from the task words).

    >>> tok = tiny_tokenizer()
    >>> len(tok(" Paris", add_special_tokens=False)["input_ids"])
    1
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        # TransformerLens re-loads a tokenizer by name unless it already adds BOS; an
        # in-memory tokenizer has no name to re-load from, so it adds BOS itself.
        name_or_path="mechsteer-tiny",
        add_bos_token=True,
    )


def tiny_hf_model(kind: str = "llama", *, seed: int = 0, n_layers: int = 2, d_model: int = 64):
    """A random-weight Hugging Face causal LM of the given family (``"gpt2"`` or ``"llama"``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = len(tiny_tokenizer())
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=d_model, n_layer=n_layers, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, attn_implementation="eager",
        )
        model = GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=1, attn_implementation="eager",
        )
        model = LlamaForCausalLM(cfg)
        with torch.no_grad():  # random norm weights, so that folding them is exercised
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
    else:
        raise ValueError(f"Unknown tiny model kind {kind!r}; choose 'gpt2' or 'llama'.")
    return model.eval()


def tiny_model(kind: str = "llama", *, seed: int = 0, n_layers: int = 2, d_model: int = 64):
    """A tiny random-weight model bridged with TransformerLens in compatibility mode.

    >>> model = tiny_model("gpt2")
    >>> model.cfg.n_layers, model.cfg.n_heads
    (2, 4)
    """
    from mechsteer.bridge import bridge_hf

    hf = tiny_hf_model(kind, seed=seed, n_layers=n_layers, d_model=d_model)
    return bridge_hf(f"tiny-{kind}", hf, tiny_tokenizer())
