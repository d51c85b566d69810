"""Uninformative prompts p~ for the AIE (paper 000, Sec. 3.1; Todd et al.).

Instruction and chat prompts: the instruction's tokens are replaced by as many tokens drawn
from a pool of ordinary words unrelated to any task (at token level, so token lengths and
positions are unchanged; texts are decoded). ICL prompts: the demonstration labels are
shuffled across demonstrations (Todd et al.'s recipe).

Difference from paper 000: it samples "token sequences unrelated to the task but
equiprobable to the task description" (Sec. 3.1), i.e. matched in probability to the
instruction; mechsteer matches the token *length* only and draws uniformly from a fixed
pool of function words (``NEUTRAL_WORDS``), so a corrupted instruction may be less (or more)
likely under the model than the one it replaces.
"""

from __future__ import annotations

import functools
import random
from dataclasses import replace

import torch
from torch import Tensor

from mechsteer._validate import nonneg_int
from mechsteer.tasks.fv.prompts import FVPrompts

# Ordinary words that define none of the tasks: the pool of tokens for corrupted instructions.
NEUTRAL_WORDS = (
    "the of and to in is was for on with as at by this from or be are which but have had they you were their "
    "there been has would will can more when who also some about into them then its only other very just such "
    "these so may most well much because any those where both each how through while should here could still "
    "why between again every without though"
).split()


@functools.lru_cache(maxsize=8)
def _word_pool(tokenizer) -> tuple[int, ...]:
    """Token ids of ordinary words (``NEUTRAL_WORDS``): single-token words when there are
    at least 8, else every piece the words tokenise into (small test vocabularies)."""
    pieces = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in NEUTRAL_WORDS]
    single = sorted({p[0] for p in pieces if len(p) == 1})
    special = set(tokenizer.all_special_ids)
    return tuple(single) if len(single) >= 8 else tuple(sorted({i for p in pieces for i in p} - special))


def _decode(model, ids: Tensor) -> str:
    ids = ids[1:] if model.cfg.default_prepend_bos else ids
    return model.tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def _shuffle_labels(tokens: Tensor, demos: list[list[int]], rng: random.Random):
    """Permute the demonstrations' output tokens across demonstrations (a derangement when
    one exists in 100 tries): the total length is unchanged; returns (tokens, new positions)."""
    labels = [tokens[p] for p in demos]
    perm = list(range(len(demos)))
    for _ in range(100):
        rng.shuffle(perm)
        if all(not torch.equal(labels[perm[k]], labels[k]) for k in range(len(perm))):
            break
    parts, new_pos, cursor = [], [], 0
    for k, p in enumerate(demos):
        if p != list(range(p[0], p[-1] + 1)):
            raise ValueError(f"Demonstration output positions {p} are not contiguous.")
        parts.append(tokens[cursor : p[0]])
        start = sum(len(x) for x in parts)
        parts.append(labels[perm[k]])
        new_pos.append(list(range(start, start + len(labels[perm[k]]))))
        cursor = p[-1] + 1
    parts.append(tokens[cursor:])
    return torch.cat(parts), new_pos


def corrupt(model, prompts: FVPrompts, seed: int = 0) -> FVPrompts:
    """Uninformative prompts p~ for the AIE, one per prompt, same answers and token lengths.

    Instruction/chat: the instruction's tokens are replaced by as many random tokens of
    ordinary words (``NEUTRAL_WORDS``); other positions are untouched, so ``frames`` still
    name the positions that held the frame. ICL: the demonstration outputs are shuffled
    across demonstrations (Todd et al.). Texts are decoded from the tokens.

    >>> from mechsteer.tasks.fv import fv_prompts
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> p = fv_prompts(model, "antonym", n=3, instructions=[1])
    >>> c = corrupt(model, p)
    >>> c.style, bool((c.lengths == p.lengths).all()), bool((c.answers == p.answers).all())
    ('instruction/corrupted', True, True)
    """
    base = prompts.style
    rng = random.Random(nonneg_int("seed", seed))
    if base in ("instruction", "chat"):
        if len(prompts.instruction_positions) != len(prompts) or not all(prompts.instruction_positions):
            raise ValueError("These prompts record no instruction_positions; build them with fv_prompts().")
        pool = _word_pool(model.tokenizer)
        tokens, demo_pos = [], prompts.demo_positions
        for toks, pos in zip(prompts.tokens, prompts.instruction_positions):
            new = toks.clone()
            new[pos] = torch.tensor([rng.choice(pool) for _ in pos], dtype=toks.dtype)
            tokens.append(new)
    elif base == "icl":
        if len(prompts.demo_positions) != len(prompts) or any(len(d) < 2 for d in prompts.demo_positions):
            raise ValueError("Shuffling labels needs ICL prompts from fv_prompts(style='icl', n_shots >= 2).")
        tokens, demo_pos = map(list, zip(*(_shuffle_labels(t, d, rng) for t, d in
                                          zip(prompts.tokens, prompts.demo_positions))))
    else:
        raise ValueError(f"Cannot corrupt prompts of style {base!r}: corrupt 'instruction', 'chat' or 'icl' prompts.")
    return replace(
        prompts,
        style=base + "/corrupted",
        texts=[_decode(model, t) for t in tokens],
        tokens=tokens,
        meta={**prompts.meta, "corruption": "shuffled labels" if base == "icl" else "random instruction", "corrupt_seed": seed},
        demo_positions=demo_pos,
    )

