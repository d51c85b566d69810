"""Which items and tasks the model does (paper 000, Sec. 4): top-k predictions, the
correct-item filter, held-out splits by input, and the task filter.

``filter_correct`` keeps the items the model answers correctly (top-1); ``task_accuracy`` and
``select_tasks`` apply the paper's task filter (above chance, and at least 20 correct
predictions for each of the instructions kept), with chance = 1/3 for the list tasks and
1 / (number of distinct outputs) otherwise; "above chance" means more than two binomial
standard errors above it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer import kv_cache
from mechsteer._validate import nonneg_int, positive_int
from mechsteer.tasks.fv.data import FV_TASKS, load_task
from mechsteer.tasks.fv.prompts import FVPrompts, fv_prompts


@torch.no_grad()
def top_k_predictions(
    model, prompts: FVPrompts, k: int = 1, batch_size: int = 32, progress: bool = True, *, share_prefix: bool = False
) -> Int[Tensor, "batch k"]:
    """The model's ``k`` most likely next tokens at each prompt's last position (on CPU).
    ``share_prefix``: unsteered runs compute a batch's common token prefix once
    (``mechsteer.kv_cache.last_logits``)."""
    k, batch_size = positive_int("k", k), positive_int("batch_size", batch_size)
    out = torch.empty(len(prompts), k, dtype=torch.long)
    groups = list(prompts.batches(batch_size))
    for idx, toks in tqdm(groups, desc=f"{prompts.task} top-{k}", disable=not progress):
        logits = kv_cache.last_logits(model, toks.to(model.cfg.device), share_prefix=share_prefix)  # (B, V)
        out[idx] = logits.topk(k, dim=-1).indices.cpu()
    return out


def filter_correct(
    model, prompts: FVPrompts, batch_size: int = 32, progress: bool = True, *, share_prefix: bool = False
) -> tuple[FVPrompts, dict[str, Any]]:
    """The prompts whose answer is the model's top-1 prediction, and
    ``{"accuracy", "n", "kept", "kept_per_instruction"}``.

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> prompts = fv_prompts(model, "capitalize", n=5, instructions=[0, 1])
    >>> kept, info = filter_correct(model, prompts, progress=False)
    >>> sorted(info), info["n"], len(kept) == info["kept"]
    (['accuracy', 'kept', 'kept_per_instruction', 'n'], 10, True)
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to filter.")
    top1 = top_k_predictions(model, prompts, 1, batch_size, progress, share_prefix=share_prefix)[:, 0]
    keep = [i for i in range(len(prompts)) if top1[i] == prompts.answers[i]]
    per = Counter(prompts.instructions[i] for i in keep)
    info = {"accuracy": len(keep) / len(prompts), "n": len(prompts), "kept": len(keep),
            "kept_per_instruction": {i: per.get(i, 0) for i in sorted(set(prompts.instructions))}}
    return prompts.subset(keep), info


def split(prompts: FVPrompts, fraction: float = 0.25, seed: int = 0) -> tuple[FVPrompts, FVPrompts]:
    """(train, held-out) prompts: a ``fraction`` of the distinct inputs (chosen by ``seed``)
    is held out with all its prompts, so no input appears on both sides.

    >>> from mechsteer.tiny import tiny_model
    >>> p = fv_prompts(tiny_model("gpt2"), "antonym", n=8, instructions=[0, 1])
    >>> train, test = split(p, 0.25)
    >>> len(train), len(test), set(train.inputs) & set(test.inputs)
    (12, 4, set())
    """
    seed = nonneg_int("seed", seed)
    inputs = sorted(set(prompts.inputs))
    n_test = round(len(inputs) * fraction)
    if not 0 < fraction < 1 or not 0 < n_test < len(inputs):
        raise ValueError(f"Cannot hold out fraction={fraction} of {len(inputs)} distinct inputs; use 0 < fraction < 1.")
    held = set(random.Random(seed).sample(inputs, n_test))
    test = [i for i, x in enumerate(prompts.inputs) if x in held]
    train = [i for i, x in enumerate(prompts.inputs) if x not in held]
    return prompts.subset(train), prompts.subset(test)


def instruction_accuracy(
    model,
    tasks: Sequence[str] | None = None,
    *,
    style: str = "instruction",
    n: int | None = 20,
    instructions: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    share_prefix: bool = False,
    items: Mapping[str, Sequence[int]] | None = None,
) -> pd.DataFrame:
    """Top-1 and top-3 accuracy per (task, instruction) on ``n`` items per instruction
    (``instruction = -1`` for styles without one); ``instructions[task]``: the indices to
    run (default all); ``items[task]``: the pair indices to draw the ``n`` items from
    (default all; e.g. the train side of a held-out split). Columns: task, instruction,
    text, n, correct, accuracy, top3.

    >>> from mechsteer.tiny import tiny_model
    >>> df = instruction_accuracy(tiny_model("gpt2"), ["antonym"], n=2, progress=False)
    >>> list(df.columns), len(df) == len(load_task("antonym").instructions)
    (['task', 'instruction', 'text', 'n', 'correct', 'accuracy', 'top3'], True)
    """
    rows = []
    for name in tqdm(list(tasks or FV_TASKS), desc="tasks", disable=not progress):
        which = (instructions or {}).get(name)
        p = fv_prompts(model, name, style=style, n=n, instructions=which, seed=seed, items=(items or {}).get(name))
        top3 = top_k_predictions(model, p, 3, batch_size, progress=False, share_prefix=share_prefix)
        hit1 = top3[:, 0] == p.answers
        hit3 = (top3 == p.answers[:, None]).any(-1)
        for i in sorted(set(p.instructions)):
            m = torch.tensor([k == i for k in p.instructions])
            text = p.meta["instruction_texts"][i] if i >= 0 else ""
            rows.append({"task": name, "instruction": i, "text": text, "n": int(m.sum()), "correct": int(hit1[m].sum()),
                         "accuracy": hit1[m].float().mean().item(), "top3": hit3[m].float().mean().item()})
    return pd.DataFrame(rows)


def task_accuracy(
    model,
    tasks: Sequence[str] | None = None,
    *,
    table: pd.DataFrame | None = None,
    min_correct: int = 20,
    n_instructions: int = 5,
    **kwargs: Any,
) -> pd.DataFrame:
    """The paper's task filter (000, Sec. 4), one row per task: n, accuracy (top-1) and top3
    over all instructions; chance; instructions_ok (instructions with >= ``min_correct``
    correct items); selected (the best ``n_instructions`` of those, most correct first);
    selected_accuracy; above_chance (selected_accuracy more than two binomial standard
    errors above chance; all instructions when none is selected); usable (above chance with
    ``n_instructions`` selected). ``table``: a result of ``instruction_accuracy`` to
    summarise instead of running ``model`` (kwargs go there).

    >>> from mechsteer.tiny import tiny_model
    >>> df = task_accuracy(tiny_model("gpt2"), ["antonym", "capitalize"], n=2, progress=False)
    >>> df["task"].tolist(), bool(df["usable"].any())
    (['antonym', 'capitalize'], False)
    """
    min_correct, n_instructions = nonneg_int("min_correct", min_correct), positive_int("n_instructions", n_instructions)
    table = instruction_accuracy(model, tasks, **kwargs) if table is None else table
    rows = []
    for name, g in table.groupby("task", sort=False):
        n, chance = int(g["n"].sum()), load_task(name).chance_level
        ok = g[g["correct"] >= min_correct].sort_values(["correct", "instruction"], ascending=[False, True])
        sel = ok.head(n_instructions)
        s = sel if len(sel) else g
        s_acc = int(s["correct"].sum()) / int(s["n"].sum())
        above = s_acc > chance + 2 * (chance * (1 - chance) / int(s["n"].sum())) ** 0.5
        rows.append({"task": name, "n": n, "accuracy": int(g["correct"].sum()) / n,
                     "top3": float((g["top3"] * g["n"]).sum() / n), "chance": chance, "instructions_ok": len(ok),
                     "selected": [int(i) for i in sel["instruction"]], "selected_accuracy": s_acc,
                     "above_chance": bool(above), "usable": bool(above and len(sel) >= min(n_instructions, len(g)))})
    return pd.DataFrame(rows)


def select_tasks(table: pd.DataFrame, *, min_correct: int = 20, n_instructions: int = 5) -> dict[str, list[int]]:
    """The usable tasks of ``task_accuracy`` with their selected instructions (paper 000,
    Sec. 4: above chance, >= ``min_correct`` correct items for each of ``n_instructions``
    instructions). ``table``: a result of ``instruction_accuracy``.

    >>> table = pd.DataFrame({"task": ["antonym"] * 3, "instruction": [0, 1, 2], "text": [""] * 3,
    ...                       "n": [30] * 3, "correct": [21, 25, 3], "accuracy": [0.7, 0.83, 0.1], "top3": [0.9] * 3})
    >>> select_tasks(table, n_instructions=2)
    {'antonym': [1, 0]}
    """
    summary = task_accuracy(None, table=table, min_correct=min_correct, n_instructions=n_instructions)
    return {r.task: list(r.selected) for r in summary.itertuples() if r.usable}
