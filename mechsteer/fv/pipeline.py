"""Function vectors end to end (paper 000, Sec. 3-4): data -> heads -> injection -> accuracy.

``run_fv`` follows the paper's recipe for each task:

1. instruction prompts ("{instruction}\\nQ: {input}\\nA:"), the inputs split into a
   held-out part (for the zero-shot validation and test prompts) and the rest;
2. the instructions that the model answers correctly most often are kept, and of the
   remaining inputs only the items it answers correctly (top-1) with the instruction;
3. mean head activations ``mean_z`` over ``n_queries`` filtered prompts per instruction;
4. head scores on ``n_cie`` prompts per instruction: AIE (fast mode) and AtP on the
   corrupted prompts (instruction replaced by neutral tokens), AttnLRP relevance of the
   attention from the last position to the intensional frame on the clean ones; global
   scores average the tasks;
5. top-k heads per method (global, and per task), FV layer picked on the validation
   prompts (accuracy averaged over tasks), then zero-shot top-1/top-3 accuracy on the test
   prompts: unsteered, FV and DFV, for every selection method;
6. samples per minute of naive AIE (on ``naive_samples`` prompts, timed on
   ``naive_layers`` layers and scaled to all), fast AIE, LRP and AtP.

``FVRun.summary()`` holds ``accuracy`` (baseline, fv/dfv per method), ``samples_per_minute``
and the top-k heads; ``FVRun.write(out)`` writes figures, tables and ``summary.json``.

>>> from mechsteer.tiny import tiny_model
>>> run = run_fv(tiny_model("gpt2"), FVConfig(tasks=("capitalize",), n_instructions=2, n_queries=3,
...              n_cie=2, n_test=4, k=3, pool=4,
...              filter=False, lrp_max_rank=10**6, progress=False))
>>> sorted(run.summary()["samples_per_minute"])
['aie', 'aie_naive', 'atp', 'lrp']
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from mechsteer import _io
from mechsteer._validate import finite_float, nonneg_int, positive_int
from mechsteer.attribution.compare import compare
from mechsteer.attribution.result import AttributionResult
from mechsteer.fv.evaluate import (
    best_layer,
    compare_injections,
    fv_layer_sweep,
    steered_continuations,
)
from mechsteer.fv.indirect_effect import aie, aie_global
from mechsteer.fv.inject import function_vector, inject_dfv, inject_fv, top_heads
from mechsteer.fv.means import mean_head_z
from mechsteer.fv.plots import accuracy_figure, head_scores_figure, sweep_figure
from mechsteer.fv.scores import atp_head_scores, lrp_head_scores, rank_correlation
from mechsteer.plots import figures_page
from mechsteer.tasks.fv import (
    FV_TASKS,
    FVPrompts,
    corrupt,
    filter_correct,
    fv_prompts,
    instruction_accuracy,
    select_tasks,
)

SELECTIONS = ("aie", "lrp", "atp")
INJECTIONS = ("fv", "dfv")


@dataclass(frozen=True)
class FVConfig:
    """Settings of ``run_fv`` (paper 000 Sec. 4 defaults where it gives them)."""

    tasks: tuple[str, ...] | None = None  # None: every task in FV_TASKS
    style: str = "auto"  # "instruction", "chat", or "auto": chat when the tokenizer has a chat template
    select: tuple[str, ...] = SELECTIONS  # head-selection methods
    inject: tuple[str, ...] = INJECTIONS  # "fv" (one layer) and/or "dfv" (distributed)
    k: int = 20  # top-k heads
    n_instructions: int = 5  # instructions kept per task (paper: 5)
    n_queries: int = 20  # filtered prompts per instruction for mean_z (paper: 20)
    n_cie: int = 5  # prompts per instruction scored by AIE / LRP / AtP (paper: 5)
    n_test: int = 20  # held-out inputs per task: half validation (FV layer), half test
    min_correct: int = 20  # an instruction needs this many correct items (paper: 20)
    pool: int = 60  # items per instruction tried when ranking instructions
    sweep_layers: tuple[int, ...] | None = None  # FV layers tried (None: all)
    scale: float = 1.0  # injection scale
    naive_samples: int = 1  # prompts timed with naive AIE (one forward per head each)
    naive_layers: int | None = None  # layers timed with naive AIE (None: all); its rate is scaled to all layers
    lrp_max_rank: int = 5  # LRP skips prompts whose answer ranks below this (paper's code)
    filter: bool = True  # False: keep every task, the first instructions and all items (tests)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("k", "n_instructions", "n_queries", "n_cie", "n_test", "pool", "naive_samples", "lrp_max_rank"):
            set_(name, positive_int(name, getattr(self, name)))  # bools refused
        set_("min_correct", nonneg_int("min_correct", self.min_correct))
        if self.naive_layers is not None:
            set_("naive_layers", positive_int("naive_layers", self.naive_layers))
        set_("scale", finite_float("scale", self.scale))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r} ({type(self.seed).__name__}).")
        for name in ("tasks", "select", "inject", "sweep_layers"):
            if isinstance(getattr(self, name), str):
                value = getattr(self, name)
                raise TypeError(f"{name} must be a tuple, got the string {value!r}; write ({value!r},).")
        if self.sweep_layers is not None:
            set_("sweep_layers", tuple(nonneg_int("sweep_layers", layer) for layer in self.sweep_layers))
            if not self.sweep_layers:
                raise ValueError("sweep_layers is empty; pass at least one layer, or None for all.")
        bad = [s for s in self.select if s not in SELECTIONS] + [i for i in self.inject if i not in INJECTIONS]
        if bad or not self.select or not self.inject:
            raise ValueError(f"select must come from {SELECTIONS} and inject from {INJECTIONS}; got {self.select}, {self.inject}.")
        if self.style not in ("auto", "instruction", "chat"):
            raise ValueError(f"style must be 'auto', 'instruction' or 'chat', got {self.style!r}.")
        if self.n_test < 2:
            raise ValueError(f"n_test must be >= 2 (half validation, half test), got {self.n_test}.")


@dataclass
class TaskData:
    """One task's prompts: filtered instruction prompts, corrupted ones, zero-shot val/test."""

    name: str
    instructions: list[int]
    clean: FVPrompts  # filtered, for mean_z
    scored: FVPrompts  # the n_cie per instruction scored by AIE / LRP / AtP
    corrupted: FVPrompts
    val: FVPrompts  # zero-shot, held-out inputs
    test: FVPrompts
    accuracy: float  # top-1 with the kept instructions, before filtering


@dataclass
class FVRun:
    """Everything ``run_fv`` computed."""

    config: FVConfig
    table: pd.DataFrame  # per (task, instruction) accuracy
    tasks: dict[str, TaskData]
    mean_z: dict[str, Tensor]
    scores: dict[str, dict[str, AttributionResult]]  # method -> task -> (layer, head)
    global_scores: dict[str, AttributionResult]
    heads: dict[str, list[tuple[int, int]]]  # global top-k per method
    sweep: pd.DataFrame  # method, layer, top1, top3 (mean over tasks)
    fv_layer: dict[str, int]
    accuracy: pd.DataFrame  # task, heads (global|task), name, injection, method, top1, top3
    samples_per_minute: dict[str, float]
    example: pd.DataFrame | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def accuracy_table(self, heads: str = "global") -> pd.DataFrame:
        """Mean top-1 / top-3 over tasks per injection row, for ``heads`` global or task."""
        df = self.accuracy[self.accuracy["heads"].isin([heads, "none"])]
        return df.groupby("name", sort=False)[["top1", "top3"]].mean().reset_index()

    def summary(self) -> dict[str, Any]:
        """accuracy (baseline, fv/dfv per method; global and per-task heads), samples per
        minute, top-k heads, FV layers, AIE-vs-AtP/LRP rank correlations, the setup."""
        acc: dict[str, Any] = {}
        for heads in ("global", "task"):
            t = self.accuracy_table(heads).set_index("name")
            acc[heads] = {"baseline": t.loc["baseline"].to_dict()} if "baseline" in t.index else {}
            for inj in self.config.inject:
                acc[heads][inj] = {m: t.loc[f"{inj}/{m}"].to_dict() for m in self.config.select if f"{inj}/{m}" in t.index}
        out = {
            "tasks": list(self.tasks),
            "accuracy": {**acc["global"], "per_task_heads": acc["task"]},
            "accuracy_by_task": self.accuracy.to_dict(orient="records"),
            "samples_per_minute": self.samples_per_minute,
            "top_heads": {m: [list(h) for h in hs] for m, hs in self.heads.items()},
            "fv_layer": self.fv_layer,
            "rank_correlation": self.extra.get("rank_correlation", {}),
            "config": asdict(self.config),
            "seconds": self.seconds,
        }
        if self.example is not None:
            out["example"] = self.example.to_dict(orient="records")
        return out

    def figures(self) -> dict[str, go.Figure]:
        """Head scores of the selection methods side by side, zero-shot accuracy per task,
        and the FV layer sweep (when FV was injected)."""
        figs = {"head_scores": head_scores_figure(self.global_scores, self.config.k, len(self.tasks)),
                "accuracy": accuracy_figure(self.accuracy)}
        if len(self.sweep):
            figs["layer_sweep"] = sweep_figure(self.sweep)
        return figs

    def write(self, out: str | Path) -> Path:
        """``figures.html`` (``figures()``), CSV tables (accuracy, instruction accuracy, layer
        sweep, head scores, head agreement, the example continuations) and ``summary.json``;
        returns its path."""
        out = Path(out)
        _io.write_text(out / "accuracy.csv", self.accuracy.to_csv(index=False))
        _io.write_text(out / "instructions.csv", self.table.to_csv(index=False))
        _io.write_text(out / "layer_sweep.csv", self.sweep.to_csv(index=False))
        _io.write_text(out / "head_scores.csv", head_frame(self.global_scores).to_csv(index=False))
        if len(self.global_scores) > 1:  # Spearman and top-k Jaccard of every pair of methods
            cmp = compare(list(self.global_scores.values()), k=self.config.k, names=list(self.global_scores))
            _io.write_text(out / "head_agreement.csv", cmp.pairs.to_csv(index=False))
        if self.example is not None:
            _io.write_text(out / "example.csv", self.example.to_csv(index=False))
        _io.write_text(out / "figures.html", figures_page("mechsteer function vectors", list(self.figures().values())))
        return _io.write_json(out / "summary.json", self.summary())


def head_frame(results: dict[str, AttributionResult]) -> pd.DataFrame:
    """Long table (method, layer, head, score) of (layer, head) results."""
    return pd.concat([r.to_frame().assign(method=m) for m, r in results.items()], ignore_index=True)


def _by_instruction(p: FVPrompts, per: int, skip: int = 0) -> list[int]:
    """Indices of up to ``per`` prompts per instruction, after skipping ``skip`` of each."""
    seen: dict[int, int] = {}
    out = []
    for i, ins in enumerate(p.instructions):
        c = seen.get(ins, 0)
        if skip <= c < skip + per:
            out.append(i)
        seen[ins] = c + 1
    return out


def prompt_style(model, cfg: FVConfig) -> str:
    """The prompt style: ``cfg.style``, or for "auto" the model's chat template when it has
    one (instruct models; SmolLM2-135M-Instruct passes the filter only this way), else
    "{instruction}\\nQ: {input}\\nA:"."""
    if cfg.style != "auto":
        return cfg.style
    return "chat" if getattr(model.tokenizer, "chat_template", None) else "instruction"


def prepare_task(model, task: str, instructions: Sequence[int], cfg: FVConfig) -> TaskData:
    """Held-out zero-shot val/test prompts, filtered instruction prompts, corrupted ones."""
    zero = fv_prompts(model, task, style="zero_shot", seed=cfg.seed)
    inputs = sorted(set(zero.inputs))
    g = torch.Generator().manual_seed(cfg.seed)
    order = [inputs[i] for i in torch.randperm(len(inputs), generator=g).tolist()]
    held = order[: cfg.n_test]
    if len(order) - len(held) < 2:
        raise ValueError(f"Task {task!r} has {len(inputs)} inputs; n_test={cfg.n_test} leaves too few to build FVs.")
    val_in, test_in = set(held[: len(held) // 2]), set(held[len(held) // 2 :])
    pick = lambda p, keep: p.subset([i for i, x in enumerate(p.inputs) if x in keep])  # noqa: E731
    prompts = fv_prompts(model, task, style=prompt_style(model, cfg), instructions=list(instructions), seed=cfg.seed)
    train = pick(prompts, set(order[cfg.n_test :]))
    kept, info = filter_correct(model, train, progress=False, share_prefix=True)  # unsteered: the prefix runs once
    if not cfg.filter:
        kept = train
    if len(kept) == 0:
        raise ValueError(f"The model answers no {task!r} instruction prompt correctly; drop this task.")
    clean = kept.subset(_by_instruction(kept, cfg.n_queries))
    scored = kept.subset(_by_instruction(kept, cfg.n_cie))
    return TaskData(task, list(instructions), clean, scored, corrupt(model, scored, seed=cfg.seed),
                    pick(zero, val_in), pick(zero, test_in), info["accuracy"])


def _samples_per_minute(r: AttributionResult) -> float:
    return float(r.meta.get("samples_per_minute", float("nan")))


def run_fv(model, config: FVConfig = FVConfig()) -> FVRun:
    """Paper 000's pipeline on ``config.tasks``: see the module docstring."""
    cfg, t0 = config, time.perf_counter()
    tasks = list(cfg.tasks) if cfg.tasks is not None else list(FV_TASKS)
    table = instruction_accuracy(model, tasks, style=prompt_style(model, cfg), n=cfg.pool, seed=cfg.seed,
                                 progress=cfg.progress, share_prefix=True)
    chosen = select_tasks(table, min_correct=cfg.min_correct, n_instructions=cfg.n_instructions)
    if not cfg.filter:
        chosen = {t: sorted(table[table["task"] == t]["instruction"])[: cfg.n_instructions] for t in tasks}
    if not chosen:
        raise ValueError(
            f"No task passes the filter (above chance, {cfg.n_instructions} instructions with >= {cfg.min_correct} "
            f"correct of {cfg.pool}); lower min_correct / n_instructions. Per-instruction accuracy:\n"
            + table.to_string(index=False)
        )
    data = {t: prepare_task(model, t, ins, cfg) for t, ins in chosen.items()}
    mean_z = {t: mean_head_z(model, d.clean, progress=False) for t, d in data.items()}
    kw = {"progress": cfg.progress}
    scores: dict[str, dict[str, AttributionResult]] = {m: {} for m in cfg.select}
    for t, d in data.items():
        if "aie" in scores:
            scores["aie"][t] = aie(model, d.corrupted, mean_z[t], mode="fast", **kw)
        if "lrp" in scores:
            scores["lrp"][t] = lrp_head_scores(model, d.scored, max_rank=cfg.lrp_max_rank, **kw)
        if "atp" in scores:
            scores["atp"][t] = atp_head_scores(model, d.corrupted, mean_z[t], **kw)
    global_scores = {m: aie_global(per) for m, per in scores.items()}
    heads = {m: top_heads(r, cfg.k) for m, r in global_scores.items()}

    first = next(iter(data.values()))
    # Naive AIE costs one full forward per head, the same for every head: timing it on the
    # first naive_layers layers and scaling to all layers gives the same samples per minute.
    n_layers = model.cfg.n_layers
    timed = n_layers if cfg.naive_layers is None else min(cfg.naive_layers, n_layers)
    naive = aie(model, first.corrupted.subset(range(min(cfg.naive_samples, len(first.corrupted)))),
                mean_z[first.name], mode="naive", layers=list(range(timed)), **kw)
    spm = {"aie_naive": _samples_per_minute(naive) * timed / n_layers}
    spm.update({m: _samples_per_minute(r) for m, r in global_scores.items()})

    sweep, fv_layer = _layer_sweep(model, data, mean_z, heads, cfg) if "fv" in cfg.inject else (pd.DataFrame(), {})
    accuracy = _evaluate(model, data, mean_z, heads, scores, fv_layer, cfg)
    corr = {f"aie_vs_{m}": rank_correlation(global_scores["aie"], global_scores[m])
            for m in global_scores if m != "aie" and "aie" in global_scores}
    example = _example(model, data, mean_z, heads, fv_layer, cfg)
    return FVRun(cfg, table, data, mean_z, scores, global_scores, heads, sweep, fv_layer, accuracy, spm,
                 example, time.perf_counter() - t0, {"rank_correlation": corr})


def _layer_sweep(model, data, mean_z, heads, cfg) -> tuple[pd.DataFrame, dict[str, int]]:
    """Per method: FV top-1/top-3 on the validation prompts for each layer, mean over tasks."""
    rows = []
    for m, hs in heads.items():
        for t, d in data.items():
            fv = function_vector(model, mean_z[t], hs)
            sw = fv_layer_sweep(model, fv, d.val, layers=cfg.sweep_layers, scale=cfg.scale, progress=False)
            rows.append(sw.assign(method=m, task=t))
    sweep = pd.concat(rows, ignore_index=True).groupby(["method", "layer"], sort=False)[["top1", "top3"]].mean().reset_index()
    return sweep, {m: best_layer(sweep[sweep["method"] == m].drop(columns="method")) for m in heads}


def _evaluate(model, data, mean_z, heads, scores, fv_layer, cfg) -> pd.DataFrame:
    """Zero-shot test accuracy per task: baseline, FV and DFV with global and per-task heads."""
    frames = []
    for t, d in data.items():
        for which in ("global", "task"):
            hs = heads if which == "global" else {m: top_heads(scores[m][t], cfg.k) for m in heads}
            df = compare_injections(model, d.test, mean_z[t], hs, fv_layer or 0, scale=cfg.scale, progress=False)
            if "fv" not in cfg.inject:
                df = df[df["injection"] != "fv"]
            if "dfv" not in cfg.inject:
                df = df[df["injection"] != "dfv"]
            df = df.assign(task=t, heads=which)
            df.loc[df["name"] == "baseline", "heads"] = "none"
            frames.append(df if which == "global" else df[df["name"] != "baseline"])
    return pd.concat(frames, ignore_index=True)


def _example(model, data, mean_z, heads, fv_layer, cfg) -> pd.DataFrame | None:
    """Paper 000 Table 2: one held-out zero-shot query continued with and without injection
    (every generated token steered, as the paper's code does)."""
    d = next(iter(data.values()))
    if len(d.test) == 0:
        return None
    m = "lrp" if "lrp" in heads else next(iter(heads))
    inj = {}
    if "fv" in cfg.inject:
        fv = function_vector(model, mean_z[d.name], heads[m])
        inj[f"fv/{m}"] = lambda: inject_fv(model, fv, fv_layer[m], cfg.scale, every_step=True)
    if "dfv" in cfg.inject:
        inj[f"dfv/{m}"] = lambda: inject_dfv(model, mean_z[d.name], heads[m], cfg.scale, every_step=True)
    df = steered_continuations(model, d.test.texts[0], inj, max_new_tokens=12)
    return df.assign(task=d.name, prompt=d.test.texts[0])
