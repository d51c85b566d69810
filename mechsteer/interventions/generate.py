"""Reading steered text: generate from a model under an intervention at strength beta.

A learned intervention is judged by its logits (Sec. 3.4), but reading what the steered
model writes is the quickest sanity check: at beta = 0 the text must be the model's own,
at beta = +1 / -1 it should lean towards / away from the trained behaviour.

``steered_generate`` runs ``model.generate`` inside ``intervention.apply(model, beta,
generation=True)`` (see ``mechsteer.interventions.base`` for what is steered while
generating: position-bound interventions steer the prompt's n_pos positions, DynScalar
every token). Decoding is greedy by default (``do_sample=False``), so the texts of
different betas differ only through the intervention. ``compare_generations`` puts the
texts of several betas side by side in a DataFrame.

>>> from mechsteer.interventions.scalars import ActivScalar
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> prompt = "The capital of France is"
>>> iv = ActivScalar.for_model(model, sites=["attn_out"], n_pos=model.to_tokens(prompt).shape[1])
>>> df = compare_generations(model, iv, prompt, betas=(-1, 0, 1), max_new_tokens=3)
>>> list(df.columns), df["beta"].tolist()
(['beta', 'text', 'continuation'], [-1.0, 0.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from mechsteer import kv_cache
from mechsteer.interventions.base import Intervention
from mechsteer.tasks.base import ContrastiveDataset


def _prompt_tokens(model, intervention: Intervention, prompt: str) -> torch.Tensor:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string, got {type(prompt).__name__}.")
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention must be a mechsteer Intervention, got {type(intervention).__name__}.")
    tokens = model.to_tokens(prompt)  # (1, pos); follows model.cfg.default_prepend_bos
    n = tokens.shape[1]
    if intervention.position_bound and intervention.slots is None and intervention.n_pos is not None and n != intervention.n_pos:
        raise ValueError(
            f"{type(intervention).__name__} was built for prompts of {intervention.n_pos} tokens; {prompt!r} has "
            f"{n} (model.to_tokens). Use a prompt of that length (e.g. one of its task's prompts), or DynScalar."
        )
    return tokens


def _generate(model, intervention, tokens, beta, max_new_tokens, seed, generate_kwargs, where=None) -> torch.Tensor:
    kwargs = {"do_sample": False, "verbose": False} | generate_kwargs
    for bad in ("input", "return_type", "max_new_tokens", "output_logits", "return_cache", "return_input_tokens"):
        if bad in kwargs:
            raise ValueError(
                f"Do not pass {bad}= in generate_kwargs: these helpers return text. For more, call "
                "model.generate inside `with intervention.apply(model, beta, generation=True):`."
            )
    if seed is not None:
        torch.manual_seed(seed)
    kwargs["use_past_kv_cache"] = kv_cache.use_cache_for(model, kwargs.get("use_past_kv_cache", True),
                                                         who="steered generation")  # checked unsteered
    with intervention.apply(model, beta, generation=True, where=where), kv_cache.bridged(model):
        return model.generate(tokens, max_new_tokens=max_new_tokens, return_type="tokens", **kwargs)


def steered_generate(
    model,
    intervention: Intervention,
    prompt: str | ContrastiveDataset,
    beta: float | int = 1.0,
    max_new_tokens: int = 20,
    *,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> str | list[str]:
    """Text of f~^beta continuing ``prompt``: prompt + up to ``max_new_tokens`` new tokens.

    ``prompt`` may be a ContrastiveDataset: one text per prompt (a list), each generated
    from that prompt's own tokens (right-padded prompts are cut at their length, so no
    prompt continues after pads) with the intervention bound to its positions (named or
    end-relative slots, its last token).

    Greedy unless ``do_sample=True`` is passed (then ``seed`` seeds torch first). Other
    keyword arguments go to ``model.generate`` (e.g. ``use_past_kv_cache=False``,
    ``stop_at_eos=False``). At beta = 0 the text equals ``model.generate(prompt, ...)``'s.

    >>> from mechsteer.interventions.scalars import DynScalar
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> iv = DynScalar.for_model(model, sites=["mlp_out"])
    >>> text = steered_generate(model, iv, "The capital of France is", beta=0.0, max_new_tokens=3)
    >>> text == model.generate("The capital of France is", max_new_tokens=3, do_sample=False, verbose=False)
    True
    """
    if isinstance(prompt, ContrastiveDataset):
        return [model.tokenizer.decode(out[0], skip_special_tokens=True)
                for out in _per_prompt(model, intervention, prompt, beta, max_new_tokens, seed, generate_kwargs)]
    tokens = _prompt_tokens(model, intervention, prompt)
    out = _generate(model, intervention, tokens, beta, max_new_tokens, seed, generate_kwargs)
    return model.tokenizer.decode(out[0], skip_special_tokens=True)


def _per_prompt(model, intervention, ds, beta, max_new_tokens, seed, generate_kwargs):
    """Token ids generated from each prompt of ``ds`` alone (its real tokens, its positions bound)."""
    if not isinstance(intervention, Intervention):
        raise TypeError(f"intervention must be a mechsteer Intervention, got {type(intervention).__name__}.")
    where = intervention.token_index(ds)  # (N, n_sel) or None; ValueError on column-bound mixed lengths
    device = next(model.parameters()).device
    for b in range(len(ds)):
        tokens = ds.tokens[b : b + 1, : int(ds.lengths[b])].to(device)  # no pads
        w = None if where is None else where[b : b + 1].to(device)
        yield _generate(model, intervention, tokens, beta, max_new_tokens, seed, generate_kwargs, where=w)


def compare_generations(
    model,
    intervention: Intervention,
    prompt: str,
    betas: Sequence[float | int] = (-1, 0, 1),
    max_new_tokens: int = 20,
    *,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> pd.DataFrame:
    """One row per beta: ``beta``, ``text`` (prompt + continuation) and ``continuation``
    (the new tokens alone), to read the steered texts side by side."""
    tokens = _prompt_tokens(model, intervention, prompt)
    if len(betas) == 0:
        raise ValueError("betas is empty; give at least one strength, e.g. (-1, 0, 1).")
    rows = []
    for beta in betas:
        out = _generate(model, intervention, tokens, beta, max_new_tokens, seed, generate_kwargs)
        rows.append(
            {
                "beta": float(beta),
                "text": model.tokenizer.decode(out[0], skip_special_tokens=True),
                "continuation": model.tokenizer.decode(out[0, tokens.shape[1] :], skip_special_tokens=True),
            }
        )
    return pd.DataFrame(rows, columns=["beta", "text", "continuation"])
