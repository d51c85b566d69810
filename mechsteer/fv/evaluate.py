"""Evaluating function vectors (seed paper 000, Sec. 4; Todd et al., 004).

The measure is **zero-shot accuracy**: run prompts that hold only the query (no
instruction, no demonstrations), steered by an FV or DFV, and check whether the answer's
first token is the model's top-1 (or among its top-3) prediction at the last position.
An FV's injection layer is a hyperparameter: ``fv_layer_sweep`` scores every layer on a
validation split and ``best_layer`` picks one, which ``compare_injections`` then uses on
the test split next to the unsteered baseline and the layer-free DFV. Paper 000's
Table 2 compares greedy continuations of one prompt under each injection:
``steered_continuations``.

Every accuracy comes with its sample size and a 95% interval (``mechsteer.fv.stats``):
``top1_lo, top1_hi`` are Wilson intervals; in ``compare_injections`` each steered row also
has ``gain = top1 - baseline top1`` on the same items with its paired (Newcombe) interval
``gain_lo, gain_hi``, and the counts behind them (``n, correct, wins, losses``), so
``pool`` can add tasks up.

Steering is passed as a *factory*: a function of no arguments that returns a fresh
context manager, e.g. ``lambda: inject_fv(model, fv, layer=3)``, so it can be entered
once per evaluation.

>>> import torch
>>> from mechsteer.fv.inject import function_vector, inject_dfv
>>> from mechsteer.tasks.fv import FVPrompts
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> toks = [model.to_tokens(t)[0] for t in ["Q: Paris\\nA:", "Q: Rome\\nA:"]]
>>> prompts = FVPrompts("demo", "zero_shot", ["a", "b"], toks, torch.tensor([5, 6]),
...                     [[], []], [-1, -1], ["", ""], ["", ""])
>>> r = zero_shot_accuracy(model, prompts, progress=False)
>>> sorted(r), r["n"]
(['n', 'rank', 'top1', 'top3'], 2)
>>> mean_z = torch.randn(2, 4, 16)
>>> df = compare_injections(model, prompts, mean_z, {"aie": [(0, 1), (1, 2)]}, {"aie": 0}, progress=False)
>>> df["name"].tolist()
['baseline', 'fv/aie', 'dfv/aie']
>>> [c for c in ("n", "top1_lo", "top1_hi", "gain", "gain_lo", "gain_hi") if c in df.columns]
['n', 'top1_lo', 'top1_hi', 'gain', 'gain_lo', 'gain_hi']
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer import kv_cache
from mechsteer.fv.inject import function_vector, inject_dfv, inject_fv
from mechsteer.fv.stats import interval_columns
from mechsteer.metrics import answer_rank
from mechsteer.tasks.fv import FVPrompts

Steer = Callable[[], contextlib.AbstractContextManager]


def _check_topk(topk: Sequence[int]) -> tuple[int, ...]:
    topk = tuple(int(k) for k in topk)
    if not topk or any(k < 1 for k in topk):
        raise ValueError(f"topk must be a non-empty list of ints >= 1, got {topk}.")
    return topk


@torch.no_grad()
def zero_shot_accuracy(
    model,
    prompts: FVPrompts,
    steer: Steer | None = None,
    topk: Sequence[int] = (1, 3),
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-k accuracy of the answer's first token at each prompt's last position.

    Returns ``{"top1": ..., "top3": ..., "n": N, "rank": (N,) ranks}`` (rank 0 = argmax;
    a tie with the answer's logit counts in the answer's favour). ``steer`` is entered once
    around all batches.
    """
    topk = _check_topk(topk)
    n = len(prompts)
    if n == 0:
        raise ValueError("prompts is empty: nothing to evaluate.")
    batches = list(prompts.batches(batch_size))
    device = model.cfg.device
    rank = torch.empty(n, dtype=torch.long)
    with steer() if steer is not None else contextlib.nullcontext():
        for idx, tokens in tqdm(batches, desc="zero-shot", disable=not progress):
            logits = model(tokens.to(device))  # (B, T, vocab)
            rank[idx] = answer_rank(logits, prompts.answers[idx]).cpu()
    out: dict[str, Any] = {f"top{k}": int((rank < k).sum()) / n for k in topk}
    out.update(n=n, rank=rank)
    return out


def fv_layer_sweep(
    model,
    fv: Float[Tensor, " d_model"],
    val_prompts: FVPrompts,
    layers: Sequence[int] | None = None,
    scale: float | int = 1.0,
    topk: Sequence[int] = (1, 3),
    batch_size: int = 32,
    progress: bool = True,
):
    """Zero-shot accuracy with the FV added after each of ``layers`` (default: all).

    Returns a DataFrame with columns ``layer, top1, top3`` (one ``top{k}`` per ``topk``),
    then ``n, correct, top1_lo, top1_hi`` (Wilson 95% interval of top-1).

    >>> import torch
    >>> from mechsteer.tasks.fv import FVPrompts
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> p = FVPrompts("t", "zero_shot", ["x"], [model.to_tokens("Q: Rome A:")[0]],
    ...               torch.tensor([5]), [[]], [-1], [""], [""])
    >>> df = fv_layer_sweep(model, torch.zeros(64), p, progress=False)
    >>> df.columns.tolist()[:3], best_layer(df)
    (['layer', 'top1', 'top3'], 0)
    """
    import pandas as pd

    layers = list(range(model.cfg.n_layers)) if layers is None else [int(l) for l in layers]
    if not layers:
        raise ValueError("layers is empty; give at least one layer (or None for all).")
    topk = _check_topk(topk)
    rows = []
    for layer in tqdm(layers, desc="FV layer sweep", disable=not progress):
        r = zero_shot_accuracy(
            model, val_prompts, lambda layer=layer: inject_fv(model, fv, layer, scale), topk, batch_size, progress=False
        )
        correct = int((r["rank"] < 1).sum())
        ci = interval_columns(r["n"], correct)
        rows.append({"layer": layer, **{f"top{k}": r[f"top{k}"] for k in topk}, "n": r["n"], "correct": correct,
                     "top1_lo": ci["top1_lo"], "top1_hi": ci["top1_hi"]})
    return pd.DataFrame(rows)


def best_layer(sweep, by: str = "top1") -> int:
    """The layer of ``fv_layer_sweep``'s table with the best ``by`` accuracy.

    Ties go to the better value of the other accuracy columns (in column order), then to
    the lower layer.
    """
    if by not in sweep.columns:
        raise ValueError(f"by={by!r} is not a column of the sweep; columns are {list(sweep.columns)}.")
    if len(sweep) == 0:
        raise ValueError("The sweep table is empty.")
    keys = [by] + [c for c in sweep.columns if c[:3] == "top" and c[3:].isdigit() and c != by]
    ranked = sweep.sort_values(keys + ["layer"], ascending=[False] * len(keys) + [True], kind="stable")
    return int(ranked["layer"].iloc[0])


def compare_injections(
    model,
    test_prompts: FVPrompts,
    mean_z: Float[Tensor, "layer head d_head"],
    heads_by_method: dict[str, Sequence[tuple[int, int]]],
    fv_layer_by_method: dict[str, int] | int,
    scale: float | int = 1.0,
    mode: str = "add",
    topk: Sequence[int] = (1, 3),
    batch_size: int = 32,
    progress: bool = True,
):
    """Zero-shot accuracy unsteered, and with FV and DFV for each head-selection method.

    Rows ``baseline``, ``fv/<method>`` (FV of the method's heads at its layer) and
    ``dfv/<method>`` (``inject_dfv`` in ``mode``), with columns ``name, injection, method,
    layer, n_heads, top1, top3``, then ``n, correct, wins, losses`` (items right only with
    the injection / only unsteered) and the 95% intervals ``top1_lo, top1_hi`` (Wilson) and
    ``gain, gain_lo, gain_hi`` (top-1 minus the baseline's on the same items, Newcombe's
    paired interval; 0 for the baseline row). ``mean_z`` is (layer, head, d_head); an int
    ``fv_layer_by_method`` is used for every method.
    """
    import pandas as pd

    if not heads_by_method:
        raise ValueError("heads_by_method is empty; give e.g. {'aie': top_heads(aie_scores, k)}.")
    if isinstance(fv_layer_by_method, int):
        fv_layer_by_method = {m: fv_layer_by_method for m in heads_by_method}
    missing = [m for m in heads_by_method if m not in fv_layer_by_method]
    if missing:
        raise ValueError(f"No FV layer for methods {missing}: pick them with fv_layer_sweep + best_layer.")
    topk = _check_topk(topk)

    base_right: list[Tensor] = []

    def row(name, injection, method, layer, n_heads, steer):
        r = zero_shot_accuracy(model, test_prompts, steer, topk, batch_size, progress=False)
        right = r["rank"] < 1
        if not base_right:
            base_right.append(right)  # the baseline runs first
        wins, losses = int((right & ~base_right[0]).sum()), int((~right & base_right[0]).sum())
        return dict(name=name, injection=injection, method=method, layer=layer, n_heads=n_heads,
                    **{f"top{k}": r[f"top{k}"] for k in topk}, n=r["n"], correct=int(right.sum()),
                    wins=wins, losses=losses, **_intervals(r["n"], int(right.sum()), wins, losses))

    jobs = [("baseline", "none", None, None, 0, None)]
    for method, heads in heads_by_method.items():
        layer, heads = int(fv_layer_by_method[method]), list(heads)
        fv = function_vector(model, mean_z, heads)
        jobs.append((f"fv/{method}", "fv", method, layer, len(heads),
                     lambda fv=fv, layer=layer: inject_fv(model, fv, layer, scale)))
        jobs.append((f"dfv/{method}", "dfv", method, None, len(heads),
                     lambda heads=heads: inject_dfv(model, mean_z, heads, scale, mode)))
    rows = [row(*job) for job in tqdm(jobs, desc="injections", disable=not progress)]
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


def _intervals(n: int, correct: int, wins: int, losses: int) -> dict[str, float]:
    ci = interval_columns(n, correct, wins, losses)
    return {k: ci[k] for k in ("top1_lo", "top1_hi", "gain", "gain_lo", "gain_hi")}


def pool(accuracy, by: Sequence[str] = ("name",)):
    """Rows of ``compare_injections`` tables (e.g. one per task) pooled over items: counts
    added per ``by`` group, top-1 = pooled correct / pooled n, the intervals recomputed
    from the pooled counts; ``top3`` is the n-weighted mean. Columns: ``by``, ``n, top1,
    top1_lo, top1_hi, gain, gain_lo, gain_hi, top3``.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"name": ["baseline", "fv", "baseline", "fv"], "n": [50, 50, 50, 50],
    ...                    "correct": [5, 20, 10, 30], "wins": [0, 16, 0, 22], "losses": [0, 1, 0, 2],
    ...                    "top3": [0.2, 0.5, 0.3, 0.7]})
    >>> pool(df).round(2)[["name", "n", "top1", "gain"]].values.tolist()
    [['baseline', 100, 0.15, 0.0], ['fv', 100, 0.5, 0.35]]
    """
    import pandas as pd

    rows = []
    for key, g in accuracy.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        n, c, w, l = (int(g[col].sum()) for col in ("n", "correct", "wins", "losses"))
        top3 = {"top3": float((g["top3"] * g["n"]).sum() / n)} if "top3" in g else {}
        rows.append({**dict(zip(by, key)), "n": n, "top1": c / n, **_intervals(n, c, w, l), **top3})
    return pd.DataFrame(rows)


def steered_continuations(
    model,
    prompt: str,
    injections: dict[str, Steer],
    max_new_tokens: int = 20,
    baseline: bool = True,
    use_past_kv_cache: bool = True,
):
    """Greedy continuations of ``prompt`` under each injection (paper 000's Table 2).

    Returns a DataFrame ``(name, text)``, ``baseline`` first when asked; ``text`` is the
    continuation only. Table 2's code steers every generated token: build the factories
    with ``every_step=True`` to match it.

    >>> import torch
    >>> from mechsteer.fv.inject import inject_fv
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> fv = torch.randn(64) * 10
    >>> df = steered_continuations(model, "Q: Paris A:", {"fv": lambda: inject_fv(model, fv, 1)}, 3)
    >>> df["name"].tolist()
    ['baseline', 'fv']
    """
    import pandas as pd

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    tokens = model.to_tokens(prompt).to(model.cfg.device)  # (1, T)
    runs = ([("baseline", None)] if baseline else []) + list(injections.items())
    rows = []
    use_cache = kv_cache.use_cache_for(model, use_past_kv_cache, who="steered_continuations")  # checked unsteered
    for name, steer in runs:
        with steer() if steer is not None else contextlib.nullcontext(), kv_cache.bridged(model):
            out = model.generate(
                tokens, max_new_tokens=max_new_tokens, do_sample=False, use_past_kv_cache=use_cache, verbose=False,
            )
        text = model.tokenizer.decode(out[0, tokens.shape[1]:].tolist(), skip_special_tokens=True)
        rows.append({"name": name, "text": text})
    return pd.DataFrame(rows)
