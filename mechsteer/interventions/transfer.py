"""Transfer of learned interventions across prompt templates and tasks (seed paper 003,
Sec. 5, Table 2, Fig. 6).

``transfer_matrix`` trains one intervention per named dataset (on its train split) and
evaluates it on every dataset's test split: effectiveness E_0 and faithfulness F
(Sec. 3.4), rows = the train set, columns = the test set, as in Fig. 6. The diagonal is
in-distribution; off-diagonal cells measure transfer to another template (another token
length) or another task.

Position-bound interventions (ActivScalar, SteerVec) built on token columns hold
parameters tied to token positions, so they cannot run on prompts of another length: those
cells are NaN (``runs_on``). Built on end-relative or named slots (``for_dataset`` on
mixed-length data, or ``slots=``) or with ``positions="last"`` they run on any length.
DynScalar runs everywhere: that is what it is for.

``include_all=True`` adds the row of Fig. 6 "trained on all tasks": one intervention
trained on the train splits of every dataset together (``concat``: prompts of different
lengths, right-padded) and tested on each test split, like the other rows.

``template_table`` is Table 2 itself: ActivScalar, SteerVec and DynScalar trained on CCC,
E_0 on A: train, B: test, C: a template change, which is a same-length paraphrase
(``tasks.ccc.ccc_paraphrase``) so that token-column interventions apply, as in the paper.

An optional ``"(none)"`` row holds the unsteered model (f~ = f at beta = +-1): E_0 is
then the model's own hinge, one error counts at beta = +1 for each prompt it gets wrong
and one at beta = -1 for each it gets right, and F = 0. Read a trained row against it.

>>> from mechsteer.interventions import DynScalar
>>> from mechsteer.interventions.train import TrainConfig
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> sets = {"ccc0": ccc(model, n=8), "ccc1": ccc(model, n=8, template=1)}
>>> make = lambda m, ds: DynScalar.for_model(m, sites=["attn_out"])
>>> df = transfer_matrix(model, make, sets, TrainConfig(epochs=1, progress=False), progress=False)
>>> df["effectiveness"].shape, list(df.index)
((3, 2), ['(none)', 'ccc0', 'ccc1'])
>>> transfer_matrix(model, make, sets, TrainConfig(epochs=1, progress=False), include_all=True,
...                 progress=False).index.tolist()
['(none)', 'ccc0', 'ccc1', '(all)']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from mechsteer.interventions.base import Intervention
from mechsteer.interventions.evaluate import evaluate
from mechsteer.interventions.objective import effectiveness
from mechsteer.interventions.train import TrainConfig, batched_clean_logits, train
from mechsteer.plots import heatmap
from mechsteer.tasks.base import ContrastiveDataset

METRICS = ("effectiveness", "faithfulness")
BASELINE = "(none)"
ALL = "(all)"


def runs_on_length(intervention: Intervention, n_pos: int) -> bool:
    """Whether ``intervention`` can run on prompts of ``n_pos`` tokens (position-bound
    ones on token columns only on the length they were built for, unless built without
    ``n_pos``; on slots, any length)."""
    return (not intervention.position_bound or intervention.n_pos is None or intervention.slots is not None
            or intervention.n_pos == n_pos)


def runs_on(intervention: Intervention, ds: ContrastiveDataset) -> bool:
    """Whether ``intervention`` can run on every prompt of ``ds`` (of any lengths)."""
    if not runs_on_length(intervention, ds.n_pos):
        return False
    try:
        intervention.token_index(ds)
    except ValueError:
        return False
    return True


def concat(datasets: list[ContrastiveDataset], name: str = "all") -> ContrastiveDataset:
    """The prompts of ``datasets`` in one dataset, in order (right-padded to the longest).

    >>> from mechsteer.tasks import ccc
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> both = concat([ccc(model, n=2), ccc(model, n=2, template=1)])
    >>> len(both), both.is_padded
    (4, True)
    """
    if not datasets:
        raise ValueError("concat needs at least one dataset.")
    width = max(d.n_pos for d in datasets)
    out = {}
    for f in dataclasses.fields(ContrastiveDataset):
        vals = [getattr(d, f.name) for d in datasets]
        if isinstance(vals[0], torch.Tensor) and vals[0].ndim >= 1 and vals[0].shape[0] == len(datasets[0]):
            vals = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=d.pad_id) if v.ndim == 2 else v
                    for v, d in zip(vals, datasets)]
            out[f.name] = torch.cat([v.to(vals[0].device) for v in vals])
        elif isinstance(vals[0], list):
            if any(vals) and not all(vals):  # e.g. named positions in some datasets only
                vals = [v or [{} for _ in range(len(d))] for v, d in zip(vals, datasets)]
            out[f.name] = [x for v in vals for x in v]
    return dataclasses.replace(datasets[0], name=name, dropped={}, **out)


@torch.no_grad()
def _unsteered(model, ds: ContrastiveDataset, batch_size: int) -> dict[str, float]:
    """E_0 and F of the identity intervention (f~+ = f~- = f)."""
    device = next(model.parameters()).device
    pos = ds.answer_pos
    clean = batched_clean_logits(model, ds.tokens.to(device), batch_size, pos.to(device) if isinstance(pos, torch.Tensor) else pos)
    e = effectiveness(clean, clean, ds.correct.to(device), ds.wrong.to(device), margin=0.0)
    return {"effectiveness": e.item(), "faithfulness": 0.0}


def transfer_matrix(
    model,
    make_intervention: Callable[[object, ContrastiveDataset], Intervention],
    datasets: Mapping[str, ContrastiveDataset],
    config: TrainConfig = TrainConfig(),
    *,
    test_fraction: float = 0.25,
    batch_size: int = 32,  # prompts per forward (each at beta = +1 and -1 in it)
    baseline: bool = True,
    include_all: bool = False,  # add the "(all)" row: trained on every train split together
    return_interventions: bool = False,
    progress: bool = True,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, Intervention]]:
    """Train ``make_intervention(model, train_split)`` on each dataset's train split; E_0
    and F of each on every dataset's test split.

    Returns a DataFrame indexed by train set (``"(none)"`` first when ``baseline``,
    ``"(all)"`` last when ``include_all``), with columns (metric, test set):
    ``df["effectiveness"]`` is the Fig. 6 matrix. NaN where a position-bound intervention
    on token columns meets another prompt length. ``return_interventions`` also returns
    the trained interventions by name. ``make_intervention(model, ds)`` gets the mixed-length
    train set for the "(all)" row: build with ``Cls.for_dataset(model, ds, ...)`` (or
    DynScalar) so it runs there.
    """
    if not datasets:
        raise ValueError("datasets is empty; pass {name: ContrastiveDataset}, e.g. one per template.")
    bad = [k for k, v in datasets.items() if not isinstance(v, ContrastiveDataset)]
    if bad:
        raise TypeError(f"datasets[{bad[0]!r}] is not a ContrastiveDataset.")
    for reserved in (BASELINE, ALL):
        if reserved in datasets:
            raise ValueError(f"{reserved!r} names a row of its own (unsteered / all together); rename that dataset.")
    splits = {k: v.split(test_fraction) for k, v in datasets.items()}
    names = list(datasets)
    train_sets = {k: splits[k][0] for k in names}
    if include_all:
        train_sets[ALL] = concat([splits[k][0] for k in names], name=ALL)
    rows: dict[str, dict[tuple[str, str], float]] = {}
    if baseline:
        rows[BASELINE] = {(m, t): v for t in names for m, v in _unsteered(model, splits[t][1], batch_size).items()}
    trained: dict[str, Intervention] = {}
    for name, train_ds in tqdm(train_sets.items(), desc="transfer", disable=not progress):
        iv = make_intervention(model, train_ds)
        if not isinstance(iv, Intervention):
            raise TypeError(f"make_intervention returned {type(iv).__name__}, not a mechsteer Intervention.")
        train(model, iv, train_ds, config)
        trained[name] = iv
        rows[name] = {}
        for t in names:
            test = splits[t][1]
            r = evaluate(model, iv, test, batch_size) if runs_on(iv, test) else {}
            for m in METRICS:
                rows[name][(m, t)] = float(r.get(m, np.nan))
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.columns = pd.MultiIndex.from_tuples(df.columns, names=["metric", "test"])
    df = df.reindex(columns=pd.MultiIndex.from_product([METRICS, names], names=["metric", "test"]))
    df.index.name = "train"
    return (df, trained) if return_interventions else df


def transfer_figure(df: pd.DataFrame, metric: str = "effectiveness", title: str | None = None) -> go.Figure:
    """Fig. 6: train set (rows) x test set (columns) heatmap of ``metric`` with the values
    written in each cell; NaN cells (lengths differ) show "n/a". Closer to 0 is better.

    >>> import pandas as pd
    >>> cols = pd.MultiIndex.from_product([["effectiveness", "faithfulness"], ["a", "b"]])
    >>> df = pd.DataFrame([[-0.1, float("nan"), 0.0, float("nan")]], index=["a"], columns=cols)
    >>> list(transfer_figure(df).data[0].text[0])
    ['-0.1', 'n/a']
    """
    if metric not in df.columns.get_level_values(0):
        raise ValueError(f"df has no metric {metric!r}; it has {sorted(set(df.columns.get_level_values(0)))}.")
    m = df[metric]
    z = m.to_numpy(dtype=float)
    name = {"effectiveness": "E_0", "faithfulness": "F"}.get(metric, metric)
    fig = heatmap(
        z,
        x_labels=list(m.columns),
        y_labels=list(m.index),
        x_title="test set",
        y_title="train set",
        zmid=None,
        colorbar_title=name,
        title=title or f"Transfer: {name} (closer to 0 is better)",
    )
    text = [["n/a" if np.isnan(v) else f"{v:.3g}" for v in row] for row in z]
    fig.update_traces(text=text, texttemplate="%{text}")
    fig.update_yaxes(autorange="reversed")
    return fig


TABLE2_COLUMNS = ("A: train", "B: test", "C: templ")


def template_table(
    model,
    kinds: Sequence[str] = ("activ_scalar", "steer_vec", "dyn_scalar"),
    config: TrainConfig | Mapping[str, TrainConfig] = TrainConfig(),  # one for all, or {kind: config}
    *,
    sites: Sequence[str] = ("attn_out", "mlp_out"),
    n: int | None = 64,
    seed: int = 0,
    test_fraction: float = 0.25,
    axis: str = "tokens",  # ActivScalar/SteerVec parameters per token column (the paper), or "end" / "named" slots
    template: int | None = None,  # None: ccc_paraphrase (template 0's length); an int: CCC_TEMPLATES[i] (slots only)
    batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Table 2: each kind trained on the CCC train split (template 0), E_0 on A: that train
    split, B: the CCC test split, C: the test split in another template (the same facts).

    Column C's default is the paper's: a paraphrase of template 0's token length
    (``tasks.ccc.ccc_paraphrase``), where the task's tokens sit at other positions, so the
    position-bound kinds run on token columns (``axis="tokens"``) with no NaN. With
    ``axis="end"`` or ``"named"`` they hold one parameter per end-relative / named slot and
    ``template=i`` may be a template of another length. Returns a DataFrame indexed by class
    name (ActivScalar, SteerVec, DynScalar) with the three E_0 columns, the matching F columns
    (``"F " + column``) and ``n_params``.

    >>> from mechsteer.tiny import tiny_model
    >>> df = template_table(tiny_model("gpt2"), config=TrainConfig(epochs=1, progress=False), n=8, progress=False)
    >>> list(df.index), list(df.columns[:3]), bool(df.notna().all().all())
    (['ActivScalar', 'SteerVec', 'DynScalar'], ['A: train', 'B: test', 'C: templ'], True)
    """
    from mechsteer.interventions.kinds import kind_class
    from mechsteer.tasks.ccc import ccc, ccc_paraphrase

    ds = ccc(model, n=n, seed=seed, template=0)
    other = ccc_paraphrase(model, n=n, seed=seed) if template is None else ccc(model, n=n, seed=seed, template=template)
    train_ds, test_ds = ds.split(test_fraction)
    templ = other.split(test_fraction)[1]
    rows = {}
    for kind in tqdm(kinds, desc="Table 2", disable=not progress):
        cls = kind_class(kind, "kinds")
        iv = cls.for_dataset(model, ds, sites=sites, axis=axis, seed=seed)
        if not runs_on(iv, templ):
            raise ValueError(f"{cls.__name__} on {axis!r} positions cannot run on the template-change prompts "
                             f"({templ.n_pos} tokens, trained on {ds.n_pos}); use template=None or axis='end'.")
        train(model, iv, train_ds, config[kind] if isinstance(config, Mapping) else config)
        res = [evaluate(model, iv, d, batch_size) for d in (train_ds, test_ds, templ)]
        rows[cls.__name__] = {**{c: r["effectiveness"] for c, r in zip(TABLE2_COLUMNS, res)},
                              **{f"F {c}": r["faithfulness"] for c, r in zip(TABLE2_COLUMNS, res)},
                              "n_params": iv.n_params}
    return pd.DataFrame.from_dict(rows, orient="index")
