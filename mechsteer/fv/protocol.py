"""The data side of ``run_fv``: which prompts build the function vector, which pick its
layer and which test it, for the two protocols (``FVConfig.protocol``).

- ``"icl"`` (Todd et al., paper 004): extraction prompts are ``n_shots``-shot in-context
  prompts ``"Q: {x}\\nA: {y}\\n\\n" ... "Q: {x}\\nA:"``; mean head activations over the
  ones the model answers correctly; the AIE's corrupted prompts shuffle the demonstration
  labels; the FV is evaluated on the query alone in the same format, ``"Q: {x}\\nA:"``.
- ``"instruction"`` (paper 000): extraction prompts are instruction prompts (raw or chat,
  ``FVConfig.style``), corrupted by replacing the instruction's tokens; evaluated on the same
  prompt without the instruction (``"\\nQ: {x}\\nA:"``, or the chat template around
  ``"Q: {x}"``): ``mechsteer.tasks.fv.ZERO_SHOT_OF``.

Splits, by distinct input (no input on two sides): the first ``n_train`` inputs (shuffled
by seed) are the only ones that appear in extraction prompts, as queries or as
demonstrations, and (instruction protocol) in the instruction ranking. The other inputs are
held out: taken in order, each is kept when the model answers it correctly *with* the
demonstrations (ICL prompt whose demonstrations come from the train inputs) or with the
task's best instruction, as the papers' filters keep the items a model can do; the first
``n_val`` kept pick the FV layer, the next ``n_test`` are the test set. Held-out items are
tried in chunks until both are filled (``TaskData.splits`` records every pair index, and
the rejected ones).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from mechsteer.tasks.fv import (
    ZERO_SHOT_OF,
    FVPrompts,
    corrupt,
    filter_correct,
    fv_prompts,
    load_task,
    top_k_predictions,
)

PROTOCOLS = ("icl", "instruction")


@dataclass
class TaskData:
    """One task's prompts: extraction (``clean`` for mean_z, ``scored`` and ``corrupted``
    for head scores), zero-shot ``val`` / ``test`` in the extraction prompts' format."""

    name: str
    protocol: str
    style: str  # extraction style: "icl", "instruction" or "chat"
    instructions: list[int]  # kept instructions (empty for ICL)
    clean: FVPrompts
    scored: FVPrompts
    corrupted: FVPrompts
    val: FVPrompts
    test: FVPrompts
    accuracy: float  # top-1 on the extraction prompts before filtering
    splits: dict[str, list[int]] = field(default_factory=dict)  # train / val / test / rejected pair indices


def split_pairs(task: str, n_train: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) pair indices of ``task``: its distinct inputs shuffled by ``seed``,
    the pairs of the first ``n_train`` inputs on the train side."""
    pairs = load_task(task).pairs
    inputs = sorted({x for x, _ in pairs})
    g = torch.Generator().manual_seed(seed)
    order = [inputs[i] for i in torch.randperm(len(inputs), generator=g).tolist()]
    if len(order) < n_train + 2:
        raise ValueError(f"Task {task!r} has {len(order)} distinct inputs; n_train={n_train} leaves too few to test.")
    rank = {x: r for r, x in enumerate(order)}
    by_rank = sorted(range(len(pairs)), key=lambda j: (rank[pairs[j][0]], j))
    train = [j for j in by_rank if rank[pairs[j][0]] < n_train]
    return train, [j for j in by_rank if rank[pairs[j][0]] >= n_train]


def _by_instruction(p: FVPrompts, per: int) -> list[int]:
    """Indices of the first ``per`` prompts of each instruction."""
    seen: dict[int, int] = {}
    out = []
    for i, ins in enumerate(p.instructions):
        if seen.get(ins, 0) < per:
            out.append(i)
        seen[ins] = seen.get(ins, 0) + 1
    return out


def _held_out(model, held: Sequence[int], probe, cfg) -> tuple[list[int], list[int], list[int]]:
    """(val, test, rejected) pair indices: held-out pairs whose ``probe(pairs)`` prompt
    (with demonstrations or instruction) the model answers correctly, tried in order, each
    chunk sized by the pass rate so far so that few extra prompts run."""
    want, kept, rejected, s = cfg.n_val + cfg.n_test, [], [], 0
    while len(kept) < want and s < len(held):
        rate = max(len(kept), 1) / s if s else 1.0
        size = max(8, min(64, math.ceil(1.1 * (want - len(kept)) / max(rate, 0.2))))
        p = probe(list(held[s : s + size]))
        s += size
        if cfg.filter:
            top1 = top_k_predictions(model, p, 1, progress=False, share_prefix=cfg.protocol == "instruction")[:, 0]
            ok = (top1 == p.answers).tolist()
        else:
            ok = [True] * len(p)
        kept += [j for j, good in zip(p.pairs, ok) if good]
        rejected += [j for j, good in zip(p.pairs, ok) if not good]
    if len(kept) < cfg.n_val + 1:
        raise ValueError(f"Task {p.task!r}: only {len(kept)} held-out items pass the filter; lower n_val / n_train.")
    if len(kept) < want:
        warnings.warn(f"Task {p.task!r}: {len(kept) - cfg.n_val} test items pass the filter, fewer than "
                      f"n_test={cfg.n_test} (the task ran out of held-out inputs); lower n_train for more.", stacklevel=3)
    return kept[: cfg.n_val], kept[cfg.n_val : want], rejected


def _zero_shot(model, task, style, val, test, seed) -> tuple[FVPrompts, FVPrompts]:
    zs, shots = ZERO_SHOT_OF[style]
    make = lambda items: fv_prompts(model, task, style=zs, n_shots=shots, items=items, seed=seed)  # noqa: E731
    return make(val), make(test)


def _with_demo_frames(p: FVPrompts) -> FVPrompts:
    """ICL prompts whose 'frame' (the positions AttnLRP reads attention to) is every
    demonstration output's tokens: the demonstrations, not an instruction, define the task."""
    return replace(p, frames=[sorted(q for d in demos for q in d) for demos in p.demo_positions])


def prepare_icl(model, task: str, cfg) -> TaskData:
    """Todd et al.'s prompts for ``task``: ``cfg.n_shots``-shot ICL extraction prompts built
    from the train pairs only, filtered to the correct ones; shuffled-label corruptions;
    zero-shot ``"Q: {x}\\nA:"`` validation and test prompts of held-out pairs the model
    answers correctly with demonstrations."""
    train, held = split_pairs(task, cfg.n_train, cfg.seed)
    if len(train) <= cfg.n_shots:
        raise ValueError(f"n_train={cfg.n_train} inputs give {len(train)} pairs: too few for n_shots={cfg.n_shots}.")
    need = 2 * max(cfg.n_queries, cfg.n_cie)  # each train pair queried up to a few times, other demonstrations
    queries = (train * (need // len(train) + 1))[:need]
    icl = lambda items, seed=cfg.seed: fv_prompts(model, task, style="icl", n_shots=cfg.n_shots, items=items,  # noqa: E731
                                                  demo_items=train, seed=seed)
    prompts = icl(queries)
    kept, info = filter_correct(model, prompts, progress=False)
    if not cfg.filter:
        kept = prompts
    if len(kept) == 0:
        raise ValueError(f"The model answers no {task!r} ICL prompt correctly; drop this task.")
    clean, scored = kept.subset(range(min(cfg.n_queries, len(kept)))), kept.subset(range(min(cfg.n_cie, len(kept))))
    val, test, rejected = _held_out(model, held, lambda items: icl(items, cfg.seed + 1), cfg)
    val_p, test_p = _zero_shot(model, task, "icl", val, test, cfg.seed)
    return TaskData(task, "icl", "icl", [], clean, _with_demo_frames(scored), corrupt(model, scored, seed=cfg.seed),
                    val_p, test_p, info["accuracy"], {"train": train, "val": val, "test": test, "rejected": rejected})


def prepare_instruction(model, task: str, instructions: Sequence[int], style: str, cfg) -> TaskData:
    """Paper 000's prompts for ``task``: instruction prompts (``style`` "instruction" or
    "chat") of the train pairs with the kept ``instructions``, filtered to the correct ones;
    instruction-replaced corruptions; zero-shot validation and test prompts in the same
    format without the instruction, of held-out pairs the model answers correctly with the
    best kept instruction."""
    train, held = split_pairs(task, cfg.n_train, cfg.seed)
    prompts = fv_prompts(model, task, style=style, instructions=list(instructions), items=train, seed=cfg.seed)
    kept, info = filter_correct(model, prompts, progress=False, share_prefix=True)  # unsteered: the prefix runs once
    if not cfg.filter:
        kept = prompts
    if len(kept) == 0:
        raise ValueError(f"The model answers no {task!r} instruction prompt correctly; drop this task.")
    clean, scored = kept.subset(_by_instruction(kept, cfg.n_queries)), kept.subset(_by_instruction(kept, cfg.n_cie))
    probe = lambda items: fv_prompts(model, task, style=style, instructions=[instructions[0]], items=items,  # noqa: E731
                                     seed=cfg.seed)
    val, test, rejected = _held_out(model, held, probe, cfg)
    val_p, test_p = _zero_shot(model, task, style, val, test, cfg.seed)
    return TaskData(task, "instruction", style, list(instructions), clean, scored, corrupt(model, scored, seed=cfg.seed),
                    val_p, test_p, info["accuracy"], {"train": train, "val": val, "test": test, "rejected": rejected})
