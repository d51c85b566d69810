"""Function vectors end to end (papers 004 and 000): data -> heads -> injection -> accuracy.

``run_fv`` runs one of two protocols (``FVConfig.protocol``; the prompts and splits are
``mechsteer.fv.protocol``):

- ``"icl"`` (default; Todd et al., 004): ``n_shots``-shot in-context prompts (10 in the
  paper) of the train items, filtered to those the model answers correctly, give the mean
  head activations ``mean_z``; the AIE scores heads on the same prompts with shuffled
  demonstration labels. This is the setting function vectors were defined in, and the one
  SmolLM2-135M-Instruct does well (top-1 0.6-0.9 with 10 demonstrations on most tasks).
- ``"instruction"`` (paper 000): instruction prompts (``style``: raw, chat, or "auto" =
  chat when the tokenizer has a template); the instructions the model answers correctly
  most often are kept (ranked on train items only), and the instruction is replaced by
  random ordinary words for the AIE (paper 000 samples "token sequences unrelated to the
  task but equiprobable to the task description"; mechsteer draws words from a fixed
  neutral pool of the same token length, without matching their probability).

Either way: held-out items (never in an extraction prompt) that the model answers
correctly *with* the demonstrations / instruction are the validation (``n_val``, picks the
FV layer) and test (``n_test``) sets, evaluated **zero-shot in the extraction prompts'
format** (the query alone: ``"Q: {x}\\nA:"`` for ICL, the instruction prompt without its
instruction otherwise). Head scores: AIE (fast mode, same numbers as the paper's naive
loop), AttnLRP relevance of the last position's attention to the intensional frame (for
ICL: to the demonstration outputs) and AtP; global scores average the tasks. Top-k heads
per method (global and per task) are injected as FV (at the layer best on validation) and
DFV; every accuracy has its n, a Wilson 95% interval, and the gain over the baseline a
paired Newcombe interval (``mechsteer.fv.stats``). Samples per minute of naive AIE (on
``naive_samples`` prompts and ``naive_layers`` layers, scaled to all), fast AIE, LRP, AtP.

``FVRun.summary()`` holds ``accuracy`` (baseline, fv/dfv per method), ``samples_per_minute``
and the top-k heads; ``FVRun.accuracy_table()`` has the CI columns; ``FVRun.write(out)``
writes figures, tables and ``summary.json``. ``FVConfig.paper(tasks)`` is the setting of
the demo, notebook 03 and the replication report.

>>> from mechsteer.tiny import tiny_model
>>> run = run_fv(tiny_model("gpt2"), FVConfig(tasks=("capitalize",), n_shots=3, n_train=8, n_queries=3,
...              n_cie=2, n_val=2, n_test=4, k=3, filter=False, lrp_max_rank=10**6, progress=False))
>>> sorted(run.summary()["samples_per_minute"])
['aie_fast', 'aie_naive', 'atp', 'lrp']
>>> list(run.accuracy_table().columns)
['name', 'n', 'top1', 'top1_lo', 'top1_hi', 'gain', 'gain_lo', 'gain_hi', 'top3']
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer import _io
from mechsteer._validate import finite_float, nonneg_int, positive_int
from mechsteer.attribution.compare import compare
from mechsteer.attribution.result import AttributionResult
from mechsteer.fv.evaluate import best_layer, compare_injections, fv_layer_sweep, pool, steered_continuations
from mechsteer.fv.indirect_effect import aie, aie_global
from mechsteer.fv.inject import function_vector, inject_dfv, inject_fv, top_heads
from mechsteer.fv.means import mean_head_z
from mechsteer.fv.plots import accuracy_figure, head_scores_figure, sweep_figure
from mechsteer.fv.protocol import PROTOCOLS, TaskData, prepare_icl, prepare_instruction, split_pairs
from mechsteer.fv.timing import table1
from mechsteer.fv.scores import atp_head_scores, lrp_head_scores, rank_correlation
from mechsteer.fv.stats import wilson
from mechsteer.plots import figures_page
from mechsteer.tasks.fv import FV_TASKS, instruction_accuracy, select_tasks

SELECTIONS = ("aie", "lrp", "atp")
SPM_KEYS = {"naive": "aie_naive", "fast": "aie_fast", "lrp": "lrp", "atp": "atp"}  # fv.timing's methods -> summary keys
INJECTIONS = ("fv", "dfv")
# Tasks FVConfig.paper() runs by default: where FV/DFV raise SmolLM2's zero-shot top-1 (see README).
PAPER_TASKS = ("antonym", "capitalize_first_letter", "present-past")


@dataclass(frozen=True)
class FVConfig:
    """Settings of ``run_fv`` (papers 004 / 000 defaults where they give them).

    ``protocol="icl"`` is the default: function vectors are Todd et al.'s in-context
    construct (the papers' zero-shot claim is that an FV restores a task demonstrated in
    context), and SmolLM2-135M follows 10-shot prompts on most tasks, while it passes paper
    000's instruction filter only in its chat template. ``FVConfig.paper(tasks)``: the
    preset of the demo, notebook 03 and the replication report.

    >>> FVConfig(protocol="icl").n_shots
    10
    """

    tasks: tuple[str, ...] | None = None  # None: every task in FV_TASKS
    protocol: str = "icl"  # "icl" (Todd et al., 004) or "instruction" (paper 000)
    n_shots: int = 10  # demonstrations per ICL extraction prompt (Todd et al.: 10)
    style: str = "auto"  # instruction protocol: "instruction", "chat", or "auto" (chat when the tokenizer has a template)
    select: tuple[str, ...] = SELECTIONS  # head-selection methods
    inject: tuple[str, ...] = INJECTIONS  # "fv" (one layer) and/or "dfv" (distributed)
    k: int = 10  # top-k heads (Todd et al.: 10)
    n_train: int = 30  # inputs used for extraction (queries and demonstrations; instruction ranking)
    n_instructions: int = 5  # instruction protocol: instructions kept per task (paper 000: 5)
    n_queries: int = 20  # filtered extraction prompts (per instruction) for mean_z (paper 000: 20)
    n_cie: int = 10  # extraction prompts (per instruction) scored by AIE / LRP / AtP (paper 000: 5 per instruction)
    n_val: int = 10  # held-out items, answered correctly in context, that pick the FV layer
    n_test: int = 50  # held-out test items, answered correctly in context (fewer when the task runs out)
    min_correct: int = 20  # instruction protocol: correct items an instruction needs (paper 000: 20)
    pool: int = 60  # instruction protocol: train items per instruction tried when ranking instructions
    sweep_layers: tuple[int, ...] | None = None  # FV layers tried (None: every sweep_step-th layer from 0)
    sweep_step: int = 1  # with sweep_layers=None: try layers 0, sweep_step, 2 * sweep_step, ...
    scale: float = 1.0  # injection scale
    naive_samples: int = 1  # prompts every method is timed on, at batch 1 and in one batch (Table 1, fv.timing)
    naive_layers: int | None = None  # layers timed with naive AIE (None: all); its rate is scaled to all layers
    lrp_max_rank: int = 5  # LRP skips prompts whose answer ranks below this (paper's code)
    filter: bool = True  # False: keep every task, the first instructions and all items (tests)
    seed: int = 0
    progress: bool = True

    @classmethod
    def paper(cls, tasks: Sequence[str] = PAPER_TASKS, **overrides: Any) -> "FVConfig":
        """Todd et al.'s ICL protocol at a size SmolLM2 runs in about 3 minutes per task on
        one CPU thread: 10-shot extraction prompts built from 20 train inputs, top-10 heads,
        20 prompts for mean_z, 8 for the head scores, 10 validation items (FV layer tried at
        every other layer) and 50 test items (held out, answered correctly with
        demonstrations), naive AIE timed on 1 layer. ``PAPER_TASKS``: three tasks where FV
        and DFV raise SmolLM2's zero-shot top-1 with the 95% interval of the gain above 0.

        >>> FVConfig.paper().protocol, FVConfig.paper().n_test
        ('icl', 50)
        """
        base = dict(tasks=tuple(tasks), protocol="icl", n_shots=10, k=10, n_train=20, n_queries=20, n_cie=8,
                    n_val=10, n_test=50, sweep_step=2, naive_layers=1, naive_samples=8)
        return cls(**{**base, **overrides})

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("k", "n_instructions", "n_queries", "n_cie", "n_test", "n_val", "n_train", "pool",
                     "naive_samples", "lrp_max_rank", "sweep_step"):
            set_(name, positive_int(name, getattr(self, name)))  # bools refused
        set_("min_correct", nonneg_int("min_correct", self.min_correct))
        set_("n_shots", nonneg_int("n_shots", self.n_shots))
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
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")
        if self.style not in ("auto", "instruction", "chat"):
            raise ValueError(f"style must be 'auto', 'instruction' or 'chat', got {self.style!r}.")
        if self.protocol == "icl" and self.n_shots < 1:
            raise ValueError(f"n_shots must be >= 1 for protocol='icl' (demonstrations per prompt), got {self.n_shots}.")


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

    def accuracy_table(self, heads: str = "global", by_task: bool = False) -> pd.DataFrame:
        """Zero-shot test accuracy per injection row (``heads`` "global" or "task" head
        sets; the baseline always), pooled over the tasks' items, or per task with
        ``by_task``: ``n, top1, top1_lo, top1_hi`` (Wilson 95%), ``gain, gain_lo, gain_hi``
        (minus the baseline on the same items, Newcombe's paired 95% interval), ``top3``."""
        df = self.accuracy[self.accuracy["heads"].isin([heads, "none"])]
        return pool(df, by=("task", "name") if by_task else ("name",))

    def summary(self) -> dict[str, Any]:
        """accuracy (baseline, fv/dfv per method; global and per-task heads), samples per
        minute, top-k heads, FV layers, AIE-vs-AtP/LRP rank correlations, the setup."""
        acc: dict[str, Any] = {}
        for heads in ("global", "task"):
            t = self.accuracy_table(heads).set_index("name")
            t = t[["top1", "top1_lo", "top1_hi", "gain", "gain_lo", "gain_hi", "top3", "n"]]
            row = lambda name: {**t.loc[name].to_dict(), "n": int(t.loc[name, "n"])}  # noqa: E731
            acc[heads] = {"baseline": row("baseline")} if "baseline" in t.index else {}
            for inj in self.config.inject:
                acc[heads][inj] = {m: row(f"{inj}/{m}") for m in self.config.select if f"{inj}/{m}" in t.index}
        out = {
            "tasks": list(self.tasks),
            "accuracy": {**acc["global"], "per_task_heads": acc["task"]},
            "accuracy_by_task": self.accuracy.to_dict(orient="records"),
            "samples_per_minute": self.samples_per_minute,
            "top_heads": {m: [list(h) for h in hs] for m, hs in self.heads.items()},
            "fv_layer": self.fv_layer,
            "rank_correlation": self.extra.get("rank_correlation", {}),
            "table1": self.extra["table1"].to_dict(orient="records") if "table1" in self.extra else [],
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
        if "table1" in self.extra:
            _io.write_text(out / "table1.csv", self.extra["table1"].to_csv(index=False))
        _io.write_text(out / "figures.html", figures_page("mechsteer function vectors", list(self.figures().values())))
        return _io.write_json(out / "summary.json", self.summary())


def head_frame(results: dict[str, AttributionResult]) -> pd.DataFrame:
    """Long table (method, layer, head, score) of (layer, head) results."""
    return pd.concat([r.to_frame().assign(method=m) for m, r in results.items()], ignore_index=True)


def prompt_style(model, cfg: FVConfig) -> str:
    """The extraction prompts' style: "icl" for the ICL protocol; else ``cfg.style``, or
    for "auto" the model's chat template when it has one (instruct models; SmolLM2-135M-
    Instruct passes paper 000's instruction filter only this way), else "instruction"."""
    if cfg.protocol == "icl":
        return "icl"
    if cfg.style != "auto":
        return cfg.style
    return "chat" if getattr(model.tokenizer, "chat_template", None) else "instruction"


def _instruction_tasks(model, tasks, cfg) -> tuple[pd.DataFrame, dict[str, TaskData]]:
    """Paper 000's instruction ranking (on train items only) and task filter, then the prompts."""
    style = prompt_style(model, cfg)
    train = {t: split_pairs(t, cfg.n_train, cfg.seed)[0] for t in tasks}
    table = instruction_accuracy(model, tasks, style=style, n=cfg.pool, seed=cfg.seed, items=train,
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
    return table, {t: prepare_instruction(model, t, ins, style, cfg) for t, ins in chosen.items()}


def _icl_tasks(model, tasks, cfg) -> tuple[pd.DataFrame, dict[str, TaskData]]:
    """Todd et al.'s prompts per task; the table holds each task's ICL accuracy (train items)."""
    data = {t: prepare_icl(model, t, cfg) for t in tqdm(tasks, desc="ICL prompts", disable=not cfg.progress)}
    table = pd.DataFrame([{"task": t, "instruction": -1, "text": f"{cfg.n_shots}-shot ICL", "n": len(d.clean),
                           "accuracy": d.accuracy, "n_val": len(d.val), "n_test": len(d.test)} for t, d in data.items()])
    return table, data


def run_fv(model, config: FVConfig = FVConfig()) -> FVRun:
    """The function-vector pipeline on ``config.tasks`` (``config.protocol``): see the
    module docstring. Returns an ``FVRun``."""
    cfg, t0 = config, time.perf_counter()
    tasks = list(cfg.tasks) if cfg.tasks is not None else list(FV_TASKS)
    table, data = (_icl_tasks if cfg.protocol == "icl" else _instruction_tasks)(model, tasks, cfg)
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
    # Table 1 like for like (fv.timing): every method on the same naive_samples prompts of the
    # first task at batch 1 and in one batch; naive AIE timed on naive_layers, scaled to all.
    n = min(cfg.naive_samples, len(first.scored))
    timing = table1(model, first.scored.subset(range(n)), first.corrupted.subset(range(n)), mean_z[first.name],
                    batch_sizes=sorted({1, n}), naive_layers=cfg.naive_layers,
                    methods=("naive", "fast", *(m for m in ("lrp", "atp") if m in cfg.select)))
    spm = {SPM_KEYS[m]: float(v) for m, v in timing[timing["batch_size"] == n].set_index("method")["samples_per_minute"].items()}

    sweep, fv_layer = _layer_sweep(model, data, mean_z, heads, cfg) if "fv" in cfg.inject else (pd.DataFrame(), {})
    accuracy = _evaluate(model, data, mean_z, heads, scores, fv_layer, cfg)
    corr = {f"aie_vs_{m}": rank_correlation(global_scores["aie"], global_scores[m])
            for m in global_scores if m != "aie" and "aie" in global_scores}
    example = _example(model, data, mean_z, heads, fv_layer, cfg)
    return FVRun(cfg, table, data, mean_z, scores, global_scores, heads, sweep, fv_layer, accuracy, spm,
                 example, time.perf_counter() - t0, {"rank_correlation": corr, "table1": timing})


def _layer_sweep(model, data, mean_z, heads, cfg) -> tuple[pd.DataFrame, dict[str, int]]:
    """Per method: FV top-1/top-3 on the validation prompts for each layer, pooled over
    tasks' items (n, top1 with its Wilson interval)."""
    rows = []
    for m, hs in heads.items():
        for t, d in data.items():
            fv = function_vector(model, mean_z[t], hs)
            layers = cfg.sweep_layers or tuple(range(0, model.cfg.n_layers, cfg.sweep_step))
            sw = fv_layer_sweep(model, fv, d.val, layers=layers, scale=cfg.scale, progress=False)
            rows.append(sw.assign(method=m, task=t))
    per_task = pd.concat(rows, ignore_index=True)
    sweep = per_task.groupby(["method", "layer"], sort=False).apply(_pooled_row, include_groups=False).reset_index()
    sweep["n"] = sweep["n"].astype(int)
    return sweep, {m: best_layer(sweep[sweep["method"] == m][["layer", "top1", "top3"]]) for m in heads}


def _pooled_row(g: pd.DataFrame) -> pd.Series:
    n, c = int(g["n"].sum()), int(g["correct"].sum())
    lo, hi = wilson(c, n)
    return pd.Series({"top1": c / n, "top3": float((g["top3"] * g["n"]).sum() / n), "n": n, "top1_lo": lo, "top1_hi": hi})


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
