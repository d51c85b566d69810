"""Function-vector tasks (seed papers 000 and 004): instruction prompts with intensional frames.

A *task* is a list of input/output pairs (``"hot" -> "cold"``) and several *instructions*
that ask for it in different words. Each instruction carries its **intensional frame**
(paper 000, Sec. 3.1 and App. H): the minimal words that define the task, e.g.
``"opposite"`` in ``"Provide a word that is the semantic opposite"``. LRP head selection
reads the relevance of attention from the last position to the frame's token positions,
so each frame is stored as data (``fv_data/<task>.json``) and located in the tokenised
prompt through the tokenizer's character offsets. A frame that no token covers is an error.

Prompt styles (``fv_prompts``); the answer is always the first token of ``" {output}"``:

- ``"instruction"``: ``"{instruction}\\nQ: {input}\\nA:"`` (paper 000, Sec. 3.1).
- ``"chat"``: the model's chat template around the user message
  ``"{instruction}\\nQ: {input}"``, then the assistant prefix and ``"A:"``. Ending on ``"A:"``
  keeps ``" {output}"`` the natural next token, as in the other styles.
- ``"icl"``: ``n_shots`` demonstrations ``"Q: {x}\\nA: {y}\\n\\n"`` then
  ``"Q: {input}\\nA:"`` (Todd et al.). No instruction, so ``frames`` are empty;
  ``demo_positions`` holds each demonstration output's token positions.
- ``"zero_shot"``: ``"\\nQ: {input}\\nA:"``, the instruction prompt without its instruction
  (where FVs are evaluated).

``corrupt`` builds the *uninformative* prompts of the AIE (paper 000, Sec. 3.1): the
instruction's tokens are replaced by as many tokens drawn from a pool of ordinary words
unrelated to any task (built at token level, so token lengths and positions are unchanged;
texts are decoded), or, for ICL prompts, the demonstration labels are shuffled (Todd et al.).
``filter_correct`` keeps the items the model answers correctly (top-1); ``task_accuracy`` and
``select_tasks`` apply the paper's task filter (above chance, and at least 20 correct
predictions for each of the instructions kept), with chance = 1/3 for the list tasks and
1 / (number of distinct outputs) otherwise; "above chance" means more than two binomial
standard errors above it.

The pairs and instructions were written for mechsteer; the task names follow paper 000,
App. G, except five easier tasks for small models (``male-female``, ``country-language``,
``capital-country``, ``city-country``, ``country-continent``; their JSON ``source`` says
so). Lists for the ``choose_*`` and ``*_v_*`` tasks were generated from word pools.
On SmolLM2-135M-Instruct the ``"chat"`` style is the one that passes the filter: 12 tasks
with 5 instructions of >= 20 correct items each, against none in the ``"instruction"`` style,
where the model mostly repeats the input.
"""

from __future__ import annotations

import difflib
import functools
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer import kv_cache
from mechsteer._validate import nonneg_int, positive_int

STYLES = ("instruction", "chat", "icl", "zero_shot")
INSTRUCTION_TEMPLATE = "{instruction}\nQ: {input}\nA:"
ZERO_SHOT_TEMPLATE = "\nQ: {input}\nA:"
DEMO_TEMPLATE = "Q: {input}\nA: {output}\n\n"
# Ordinary words that define none of the tasks: the pool of tokens for corrupted instructions.
NEUTRAL_WORDS = (
    "the of and to in is was for on with as at by this from or be are which but have had they you were their "
    "there been has would will can more when who also some about into them then its only other very just such "
    "these so may most well much because any those where both each how through while should here could still "
    "why between again every without though"
).split()
_SENTINEL = "\x1fmechsteer-user-message\x1f"


@dataclass(frozen=True)
class FVPrompts:
    """Prompts of one task in one style, unpadded (prompts may differ in token length).

    ``tokens[n]`` is prompt n's 1-D token ids (BOS included when the model prepends one);
    the prediction is read at its LAST position. ``answers[n]`` is the first token of
    " {output}". ``frames[n]`` are the token positions of the instruction's intensional
    frame in prompt n (empty when the prompt has no instruction, e.g. zero-shot).
    ``instruction_positions[n]``: all token positions of the instruction (what ``corrupt``
    replaces); ``demo_positions[n][k]``: token positions of demonstration k's output (ICL).
    """

    task: str
    style: str  # "instruction" | "chat" | "icl" | "zero_shot" (+ "/corrupted" for corrupted prompts)
    texts: list[str]
    tokens: list[Int[Tensor, " _pos"]]  # "_pos": lengths differ between prompts (not bound across the list)
    answers: Int[Tensor, " batch"]
    frames: list[list[int]]
    instructions: list[int]  # index of the instruction phrasing per prompt (-1: none)
    inputs: list[str]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    instruction_positions: list[list[int]] = field(default_factory=list)  # empty list: not recorded
    demo_positions: list[list[list[int]]] = field(default_factory=list)  # ICL only

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Token length of each prompt."""
        return torch.tensor([len(t) for t in self.tokens], dtype=torch.long)

    def subset(self, index: Sequence[int]) -> "FVPrompts":
        """The prompts at ``index`` (in that order)."""
        idx = [int(i) for i in index]
        pick = lambda xs: [xs[i] for i in idx] if xs else []
        return FVPrompts(
            task=self.task,
            style=self.style,
            texts=pick(self.texts),
            tokens=pick(self.tokens),
            answers=self.answers[idx] if idx else self.answers[:0],
            frames=pick(self.frames),
            instructions=pick(self.instructions),
            inputs=pick(self.inputs),
            outputs=pick(self.outputs),
            meta=dict(self.meta),
            instruction_positions=pick(self.instruction_positions),
            demo_positions=pick(self.demo_positions),
        )

    def batches(self, batch_size: int = 32) -> Iterator[tuple[list[int], Int[Tensor, "batch pos"]]]:
        """Equal-length groups of at most ``batch_size`` prompts: yields (indices, stacked tokens).

        Every batch has one token length, so position -1 is every prompt's last token.
        """
        batch_size = positive_int("batch_size", batch_size)
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(self.tokens):
            by_len.setdefault(len(t), []).append(i)
        for n in sorted(by_len):
            idx = by_len[n]
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                yield chunk, torch.stack([self.tokens[i] for i in chunk])


@dataclass(frozen=True)
class Instruction:
    """One phrasing of a task and its intensional frame (substrings of ``text``)."""

    text: str
    frame: tuple[str, ...]


@dataclass(frozen=True)
class FVTask:
    """A task: input/output pairs and instruction phrasings. ``chance``: top-1 accuracy of
    guessing (given for list tasks, 1/3; else 1/number of distinct outputs)."""

    name: str
    pairs: list[tuple[str, str]]
    instructions: list[Instruction]
    source: str = ""
    description: str = ""
    chance: float | None = None

    def __post_init__(self):
        if not self.pairs:
            raise ValueError(f"Task {self.name!r} has no pairs; give at least one (input, output) pair.")
        for i, ins in enumerate(self.instructions):
            if not ins.frame:
                raise ValueError(f"Task {self.name!r}, instruction {i} ({ins.text!r}) has an empty frame.")
            for f in ins.frame:
                if not f.strip() or f not in ins.text:
                    raise ValueError(
                        f"Task {self.name!r}, instruction {i} ({ins.text!r}): frame {f!r} is not a substring of "
                        "the instruction; a frame must be words of its instruction."
                    )

    @property
    def chance_level(self) -> float:
        """Top-1 accuracy of a guess (``chance``, else 1 / number of distinct outputs)."""
        return self.chance if self.chance is not None else 1.0 / len({y for _, y in self.pairs})


def _data_dir():
    return resources.files("mechsteer.tasks") / "fv_data"


FV_TASKS: list[str] = sorted(p.name[: -len(".json")] for p in _data_dir().iterdir() if p.name.endswith(".json"))


@functools.cache
def load_task(name: str) -> FVTask:
    """The task ``name`` from ``fv_data/<name>.json`` (one of ``FV_TASKS``).

    >>> t = load_task("antonym")
    >>> t.instructions[0]
    Instruction(text='Provide a word that is the semantic opposite', frame=('opposite',))
    >>> len(t.pairs) >= 50, t.pairs[0]
    (True, ('hot', 'cold'))
    """
    if name not in FV_TASKS:
        close = difflib.get_close_matches(name, FV_TASKS, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Unknown FV task {name!r}.{hint} Choose one of {FV_TASKS}.")
    d = json.loads((_data_dir() / f"{name}.json").read_text(encoding="utf-8"))
    return FVTask(
        name=d["task"],
        pairs=[(str(x), str(y)) for x, y in d["pairs"]],
        instructions=[Instruction(i["text"], tuple(i["frame"])) for i in d["instructions"]],
        source=d.get("source", ""),
        description=d.get("description", ""),
        chance=d.get("chance"),
    )


def _encode(model, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``, BOS prepended exactly as ``model.to_tokens``."""
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if model.cfg.default_prepend_bos:
        ids, offs = [model.tokenizer.bos_token_id] + ids, [(0, 0)] + offs
    return ids, offs


def _covering(offs: list[tuple[int, int]], lo: int, hi: int, inside: bool = False) -> list[int]:
    """Positions whose character span overlaps [lo, hi) (``inside``: lies within it)."""
    if inside:
        return [i for i, (s, e) in enumerate(offs) if lo <= s < e <= hi]
    return [i for i, (s, e) in enumerate(offs) if e > s and s < hi and e > lo]


def _find_word(text: str, word: str, lo: int, hi: int) -> tuple[int, int] | None:
    """Character span of ``word`` in ``text[lo:hi]``, preferring a whole-word match."""
    m = re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text[lo:hi])
    start = m.start() if m else text[lo:hi].find(word)
    return None if start < 0 else (lo + start, lo + start + len(word))


def _chat_parts(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a single user message (with the assistant prefix)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("This model's tokenizer has no chat template; use style='instruction' instead of 'chat'.")
    msg = [{"role": "user", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise ValueError("The chat template did not render the user message verbatim; use style='instruction'.")
    before, after = text.split(_SENTINEL)
    return before, after


def _render(style, task, i, x, demos, chat) -> tuple[str, tuple[int, int] | None, list[tuple[int, int]]]:
    """Prompt text, the instruction's character span, and the demonstration outputs' spans."""
    if style == "zero_shot":
        return ZERO_SHOT_TEMPLATE.format(input=x), None, []
    if style == "icl":
        text, spans = "", []
        for dx, dy in demos:
            start = len(text) + len(f"Q: {dx}\nA:")
            text += DEMO_TEMPLATE.format(input=dx, output=dy)
            spans.append((start, start + 1 + len(dy)))  # " {dy}", with its space
        return text + f"Q: {x}\nA:", None, spans
    instr = task.instructions[i].text
    if style == "instruction":
        return INSTRUCTION_TEMPLATE.format(instruction=instr, input=x), (0, len(instr)), []
    before, after = chat
    text = before + f"{instr}\nQ: {x}" + after + "A:"
    return text, (len(before), len(before) + len(instr)), []


def fv_prompts(
    model,
    task: str | FVTask,
    *,
    style: str = "instruction",
    n: int | None = None,
    instructions: Sequence[int] | None = None,
    n_shots: int = 5,
    seed: int = 0,
) -> FVPrompts:
    """Prompts of ``task`` in ``style`` for ``model``'s tokenizer: ``n`` items (shuffled by
    ``seed``; all if None) for each instruction index in ``instructions`` (default all;
    instruction and chat styles only), instruction-major. Answer = first token of " {output}".

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> p = fv_prompts(model, "antonym", n=4, instructions=[0, 2])
    >>> len(p), p.instructions
    (8, [0, 0, 0, 0, 2, 2, 2, 2])
    >>> print(p.texts[0])
    Provide a word that is the semantic opposite
    Q: open
    A:
    >>> model.tokenizer.decode(p.tokens[0][p.frames[0]]).strip()  # the frame's tokens
    'opposite'
    >>> print(fv_prompts(model, "antonym", style="icl", n=1, n_shots=2).texts[0])
    Q: victory
    A: defeat
    <BLANKLINE>
    Q: thick
    A: thin
    <BLANKLINE>
    Q: open
    A:
    """
    t = task if isinstance(task, FVTask) else load_task(task)
    if style not in STYLES:
        raise ValueError(f"Unknown style {style!r}; choose one of {STYLES}.")
    n, seed, n_shots = positive_int("n", n, allow_none=True), nonneg_int("seed", seed), nonneg_int("n_shots", n_shots)
    rng = random.Random(seed)
    order = list(range(len(t.pairs)))
    rng.shuffle(order)
    items = order if n is None else order[:n]
    if style in ("instruction", "chat"):
        which = list(range(len(t.instructions))) if instructions is None else [int(i) for i in instructions]
        bad = [i for i in which if not 0 <= i < len(t.instructions)]
        if bad or not which:
            raise ValueError(f"Task {t.name!r} has instructions 0..{len(t.instructions) - 1}; got {which}.")
        jobs = [(i, j) for i in which for j in items]
    else:
        if instructions is not None:
            raise ValueError(f"Style {style!r} has no instruction; leave instructions=None.")
        jobs = [(-1, j) for j in items]
    if style == "icl" and not 1 <= n_shots < len(t.pairs):
        raise ValueError(f"n_shots must be in 1..{len(t.pairs) - 1} for task {t.name!r}, got {n_shots}.")
    chat = _chat_parts(model.tokenizer) if style == "chat" else None
    demo_rng = random.Random(seed + 1)
    rows, dropped = [], Counter()
    for i, j in jobs:
        x, y = t.pairs[j]
        answer = model.tokenizer(" " + y, add_special_tokens=False)["input_ids"]
        if not answer:
            dropped["empty_answer"] += 1
            continue
        demos = [t.pairs[k] for k in demo_rng.sample([k for k in order if k != j], n_shots)] if style == "icl" else []
        text, span, demo_spans = _render(style, t, i, x, demos, chat)
        ids, offs = _encode(model, text)
        frames, instr_pos = [], []
        if span is not None:
            instr_pos = _covering(offs, *span, inside=True)
            for f in t.instructions[i].frame:
                where = _find_word(text, f, *span)
                pos = _covering(offs, *where) if where else []
                if not pos:
                    raise ValueError(
                        f"Task {t.name!r}, instruction {i} ({t.instructions[i].text!r}): frame {f!r} not found in "
                        f"the tokenised prompt {text!r}. Fix the frame in fv_data/{t.name}.json."
                    )
                frames += pos
        demo_pos = [_covering(offs, s, e, inside=True) for s, e in demo_spans]
        rows.append((text, ids, answer[0], sorted(set(frames)), i, x, y, instr_pos, demo_pos))
    if not rows:
        raise ValueError(f"Task {t.name!r}: no usable item for this tokenizer (dropped: {dict(dropped)}).")
    texts, ids, answers, frames, instr, xs, ys, instr_pos, demo_pos = map(list, zip(*rows))
    return FVPrompts(
        task=t.name,
        style=style,
        texts=texts,
        tokens=[torch.tensor(r, dtype=torch.long) for r in ids],
        answers=torch.tensor(answers, dtype=torch.long),
        frames=frames,
        instructions=instr,
        inputs=xs,
        outputs=ys,
        meta={"seed": seed, "n_shots": n_shots if style == "icl" else 0, "dropped": dict(dropped),
              "instruction_texts": [ins.text for ins in t.instructions]},
        instruction_positions=instr_pos,
        demo_positions=demo_pos if style == "icl" else [],
    )


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
) -> pd.DataFrame:
    """Top-1 and top-3 accuracy per (task, instruction) on ``n`` items per instruction
    (``instruction = -1`` for styles without one); ``instructions[task]``: the indices to
    run (default all). Columns: task, instruction, text, n, correct, accuracy, top3.

    >>> from mechsteer.tiny import tiny_model
    >>> df = instruction_accuracy(tiny_model("gpt2"), ["antonym"], n=2, progress=False)
    >>> list(df.columns), len(df) == len(load_task("antonym").instructions)
    (['task', 'instruction', 'text', 'n', 'correct', 'accuracy', 'top3'], True)
    """
    rows = []
    for name in tqdm(list(tasks or FV_TASKS), desc="tasks", disable=not progress):
        which = (instructions or {}).get(name)
        p = fv_prompts(model, name, style=style, n=n, instructions=which, seed=seed)
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
