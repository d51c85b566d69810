"""Average indirect effect (AIE) of each attention head: which heads carry the task.

Todd et al. (2024), as used in "Fast & Faithful Function Vectors" (Sec. 3.1): on a
*corrupted* prompt p~ (shuffled labels, or an instruction swapped for unrelated tokens),
replace one head's output at the last token by its task mean ``mean_z[l, h]``
(``mechsteer.fv.means.mean_head_z`` on clean prompts) and measure how much the
probability of the correct answer y rises:

    CIE(l, h | p~) = P(y | p~, z_{l,h}[-1] := mean_z[l, h]) - P(y | p~)
    AIE(l, h)      = mean over corrupted prompts p~ of CIE(l, h | p~)

``aie_global`` averages per-task AIE over tasks (the paper's global head set).

Two modes give the same numbers (tested to 1e-5):

- ``mode="naive"``: the paper's procedure, one full forward of a prompt group per head
  (layer x head forwards per group: 270 on SmolLM2).
- ``mode="fast"`` (default): one forward of the group caches the residual entering every
  block at the last token and the keys and values of all tokens. The patch changes only
  the last token, from its layer on, so every patched run is a *one-token* run: it
  starts at the patched layer (``start_at_layer``; blocks below are skipped), reads the
  unchanged earlier tokens from the cached keys and values, and computes only the last
  position's logits. Many heads run in one batched forward: row r is a (layer, head,
  prompt) triple whose head is patched by index arithmetic in one ``hook_z`` hook per
  layer; rows are chunked to a memory budget, and a chunk starts at its lowest layer
  (rows of higher layers recompute the few blocks in between unpatched). If resuming
  from the cache does not reproduce the model's own logits on this model, the fast mode
  falls back (with a warning) to full forwards of many patched rows at once.

Caveat: CIE is a probability difference on one answer token; heads that matter by
suppressing competitors, or only jointly with others, score low. Results are
``AttributionResult`` (``("layer", "head")``, method ``"aie"``, metric ``"P(answer)"``)
with ``meta["samples_per_minute"]`` (a sample = one prompt scored over all heads).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer import kv_cache
from mechsteer.attribution.result import AttributionResult
from mechsteer._validate import naming
from mechsteer.fv.means import check_layers, check_mean_z, check_prompts
from mechsteer.metrics import answer_prob
from mechsteer.runs import (
    PrefixKV,
    float32_logits,
    logit_atol,
    memory_budget,
    cache_at,
    skip_blocks_below,
    skipping_works,
    timer,
)
from mechsteer.sites import hook_name, hooked
from mechsteer.tasks.fv import FVPrompts

MODES = ("naive", "fast")


def _patch_hook(rows: Tensor, heads: Tensor, values: Tensor):
    """hook_z callback: row ``rows[i]`` gets head ``heads[i]`` set to ``values[i]`` at the
    last position (in place, as the patching engine does; the tensor is returned too)."""

    def fn(act, hook):  # (R, T, H, d_head)
        act[rows, -1, heads] = values.to(act.dtype)
        return act

    return fn


def _naive_group(model, tokens, answers, mean_z, layers, bar) -> tuple[Tensor, Tensor]:
    """P(y | p~) (B,) and the patched P(y) (B, n_layers, H): one full forward per head."""
    B, H = tokens.shape[0], model.cfg.n_heads
    p_base = answer_prob(model(tokens), answers, reduce="none")
    patched = torch.zeros(B, len(layers), H, device=p_base.device)
    every = torch.arange(B, device=tokens.device)
    for i, layer in enumerate(layers):
        for h in range(H):
            head = torch.full((B,), h, device=tokens.device)
            hook = _patch_hook(every, head, mean_z[layer, h].expand(B, -1))
            with hooked(model, [(hook_name("z", layer, model), hook)]):
                patched[:, i, h] = answer_prob(model(tokens), answers, reduce="none")
            bar.update(1)
    return p_base, patched


class _Reuse:
    """What the fast mode may reuse on this model, checked once per call on one prompt:
    ``skip`` (blocks below the start layer skipped) and ``prefix`` (earlier tokens from
    the KV cache; False: rows run their whole prompt from the embedding)."""

    def __init__(self) -> None:
        self.checked, self.skip, self.prefix = False, None, True

    def check(self, model, tokens, resid, prefix, logits, layers) -> None:
        """``prefix``: the first group's ``runs.PrefixKV`` (None: it cannot be reused)."""
        if self.checked:
            return
        self.checked = True
        last = layers[-1]
        self.skip = skipping_works(model, resid[last][:1], last, who="aie")
        if tokens.shape[1] == 1:  # one-token prompts: no earlier tokens to reuse
            return
        if prefix is None:
            self.prefix = False
            return
        one = torch.zeros(1, dtype=torch.long, device=tokens.device)
        for start in dict.fromkeys((layers[0], last)):  # resume prompt 0, nothing patched
            got = _resume(model, resid[start][one], start, tokens.shape[1], prefix, one, self.skip, [])
            if not torch.allclose(got[:, -1], logits[:1, -1], atol=logit_atol(model, logits[:1, -1], 1e-4), rtol=0):
                warnings.warn("aie(mode='fast'): resuming the last token from the cached keys and values "
                              "changed the logits on this model; patched rows run their whole prompt "
                              "(same numbers, slower).", stacklevel=4)
                self.prefix = False
                return


def _resume(model, resid, start: int, n_pos: int, prefix, prompts, skip, hooks) -> Tensor:
    """Logits of the last token of ``prompts``, from the residual entering block ``start``
    (earlier tokens' keys and values from ``prefix``, a ``runs.PrefixKV``)."""
    kwargs = {"logits_to_keep": 1}
    if n_pos > 1:
        kwargs["past_key_values"] = prefix.cache(prompts, n_pos - 1, start)
    with skip_blocks_below(model, start, skip), kv_cache.bridged(model), hooked(model, hooks):
        return model(resid, start_at_layer=start, **kwargs)


def _fast_rows(model, n_pos: int, rows: int | None, max_memory=None) -> int:
    """Patched one-token rows per forward: ``rows``, or rows of the memory budget
    (``runs.memory_budget``; per row: the copied keys and values of every layer and one
    token's activations at the model's dtype, the logits in float32)."""
    if rows is not None:
        if rows < 1:
            raise ValueError(f"rows must be a positive number of patched rows per forward, got {rows}.")
        return rows
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    itemsize = next(model.parameters()).element_size()
    per_row = (itemsize * (4 * cfg.n_layers * n_pos * n_kv * cfg.d_head + 2 * cfg.n_heads * n_pos * cfg.d_head
                           + 8 * cfg.d_model + 3 * d_mlp) + 4 * 3 * cfg.d_vocab)
    return max(1, memory_budget(cfg.device, max_memory) // per_row)


def _fast_group(model, tokens, answers, mean_z, layers, n_rows, reuse: _Reuse, bar) -> tuple[Tensor, Tensor]:
    """Same as ``_naive_group``, from one cached forward and batched one-token rows."""
    B, T = tokens.shape
    H, dev = model.cfg.n_heads, tokens.device
    with kv_cache.bridged(model):  # the residual entering each scored layer at the last token, and the KV cache
        (logits, past), store = cache_at(model, tokens, [("resid_pre", l) for l in layers],
                                         keep=lambda x: x[:, -1:].clone(), return_type="logits_and_cache",
                                         logits_to_keep=1)
    resid = {l: store[("resid_pre", l)] for l in layers}  # (B, 1, d_model) each
    prefix = None  # this group's own keys and values (warns once, naming why, when not reusable)
    if reuse.prefix and T > 1:
        prefix = PrefixKV.of(past, B, T, who="aie(mode='fast')")
    reuse.check(model, tokens, resid, prefix, logits, layers)
    resume = reuse.prefix and (T == 1 or prefix is not None)
    p_base = answer_prob(logits, answers, reduce="none")
    patched = torch.zeros(B, len(layers), H, device=p_base.device)
    total = len(layers) * H * B
    for r0 in range(0, total, n_rows):
        r = torch.arange(r0, min(r0 + n_rows, total), device=dev)
        li, head, prompt = r // (H * B), (r // B) % H, r % B  # row r: (layer, head, prompt)
        hooks = []
        for i in li.unique().tolist():
            sel = (li == i).nonzero().squeeze(1)
            l = layers[i]
            hooks.append((hook_name("z", l, model), _patch_hook(sel, head[sel], mean_z[l, head[sel]])))
        if resume:
            start = layers[int(li[0])]
            out = _resume(model, resid[start][prompt], start, T, prefix, prompt, reuse.skip, hooks)
        else:
            with hooked(model, hooks):
                out = model(tokens[prompt], logits_to_keep=1)
        patched[prompt, li, head] = answer_prob(out, answers[prompt], reduce="none")
        bar.update(1)
    return p_base, patched


def aie(
    model,
    corrupted: FVPrompts,
    mean_z: Float[Tensor, "layer head d_head"],
    *,
    mode: str = "fast",  # "fast" | "naive" (str, so a typo gets our ValueError)
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    rows: int | None = None,
    per_prompt: bool = False,
    progress: bool = True,
    max_memory: int | str | None = None,  # bytes (or "2GB") per chunk of patched rows; None: runs.memory_budget
) -> AttributionResult:
    """AIE(l, h) = mean over corrupted prompts p~ of
    P(y | p~, z_{l,h}[-1] := mean_z[l, h]) - P(y | p~)  (Todd et al.; paper 000 Sec. 3.1).

    ``corrupted``: the task's corrupted prompts (style ``".../corrupted"``), answers = the
    correct answers y. ``mean_z``: ``mean_head_z`` of the clean prompts. ``mode``:
    ``"naive"`` (one forward per head per group of ``batch_size`` equal-length prompts) or
    ``"fast"`` (same numbers; see the module docstring; ``rows`` patched rows per forward,
    default from a memory budget). ``layers`` scores only those layers (the result's layer
    axis then has those labels). ``per_prompt=True`` keeps every prompt's CIE.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks.fv import FVPrompts
    >>> from mechsteer.fv.means import mean_head_z
    >>> model = tiny_model("gpt2")
    >>> texts = ["Opposite: hot ->", "Opposite: tall ->"]
    >>> toks = [model.to_tokens(t)[0] for t in texts]
    >>> clean = FVPrompts("antonym", "instruction", texts, toks, torch.tensor([5, 6]),
    ...                   [[1], [1]], [0, 0], ["hot", "tall"], ["cold", "short"])
    >>> corrupted = replace(clean, style="instruction/corrupted")
    >>> r = aie(model, corrupted, mean_head_z(model, clean, progress=False), progress=False)
    >>> r.axes, tuple(r.scores.shape), r.method
    (('layer', 'head'), (2, 4), 'aie')
    """
    check_prompts(model, corrupted, "corrupted")
    check_mean_z(model, mean_z)
    layers = check_layers(model, layers)
    if mode not in MODES:
        raise ValueError(f"mode must be 'fast' or 'naive', got {mode!r}.")
    if not corrupted.style.endswith("/corrupted"):
        warnings.warn(f"aie: prompts of style {corrupted.style!r} are not corrupted prompts; AIE patches task "
                      "means into prompts that lack the task (style '.../corrupted').", stacklevel=2)
    H, dev = model.cfg.n_heads, model.cfg.device
    mean_z = mean_z.to(dev)
    groups = list(corrupted.batches(batch_size))
    n_rows = {t.shape[1]: _fast_rows(model, t.shape[1], rows, max_memory) for _, t in groups}
    if mode == "naive":
        n_fwd = len(groups) * len(layers) * H
    else:
        n_fwd = sum(math.ceil(len(layers) * H * len(idx) / n_rows[t.shape[1]]) for idx, t in groups)
    N = len(corrupted)
    cie = torch.zeros(N, len(layers), H)
    p_corr = torch.zeros(N)
    reuse = _Reuse()
    with (timer() as t, naming("aie"), torch.no_grad(), float32_logits(model),  # bf16/fp16: P(y) from float32 logits
          tqdm(total=n_fwd, desc=f"aie ({mode})", disable=not progress) as bar):
        for idx, tokens in groups:
            tokens, answers = tokens.to(dev), corrupted.answers[idx].to(dev)
            if mode == "naive":
                p, patched = _naive_group(model, tokens, answers, mean_z, layers, bar)
            else:
                p, patched = _fast_group(model, tokens, answers, mean_z, layers, n_rows[tokens.shape[1]], reuse, bar)
            cie[idx] = (patched - p[:, None, None]).cpu()
            p_corr[idx] = p.cpu()
    labels = {} if len(layers) == model.cfg.n_layers else {"layer": [str(l) for l in layers]}
    meta = {"mode": mode, "task": corrupted.task, "style": corrupted.style, "n_prompts": N, "layers": layers,
            "p_corrupted": float(p_corr.mean()), "samples_per_minute": 60.0 * N / t["seconds"]}
    if mode == "fast":
        meta.update(rows_per_forward=sorted(set(n_rows.values())), reuse_prefix=reuse.prefix, skip_blocks=reuse.skip is not None)
    return AttributionResult(scores=cie.mean(0), axes=("layer", "head"), method="aie", metric="P(answer)",
                             labels=labels, seconds=t["seconds"], per_prompt=cie if per_prompt else None, meta=meta)


def aie_global(per_task: dict[str, AttributionResult]) -> AttributionResult:
    """Global head scores: the mean over tasks t of each task's AIE(l, h) (equal weight per
    task, as the paper averages over tasks). Also works for per-task LRP / AtP scores.

    >>> r = AttributionResult(torch.ones(2, 3), ("layer", "head"), "aie", "P(answer)", seconds=1.0)
    >>> g = aie_global({"a": r, "b": replace(r, scores=torch.zeros(2, 3))})
    >>> g.scores[0].tolist(), g.meta["tasks"]
    ([0.5, 0.5, 0.5], ['a', 'b'])
    """
    if not per_task:
        raise ValueError("per_task is empty; pass {task name: AttributionResult} for at least one task.")
    first = next(iter(per_task.values()))
    for name, r in per_task.items():
        if r.axes != first.axes or r.scores.shape != first.scores.shape or r.method != first.method:
            raise ValueError(
                f"Task {name!r} has {r.method} scores of axes {r.axes} and shape {tuple(r.scores.shape)}; the first "
                f"task has {first.method} {first.axes} {tuple(first.scores.shape)}. Average results of one method and grid."
            )
    results = list(per_task.values())
    seconds = sum(r.seconds for r in results)
    n = sum(r.meta.get("n_prompts", 0) for r in results)
    meta = {"tasks": list(per_task), "n_prompts": n, "per_task_seconds": {k: r.seconds for k, r in per_task.items()}}
    if n and seconds > 0:
        meta["samples_per_minute"] = 60.0 * n / seconds
    return replace(first, scores=torch.stack([r.scores for r in results]).mean(0), per_prompt=None,
                   seconds=seconds, forward_equivalents=None, meta=meta)
