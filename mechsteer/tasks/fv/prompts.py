"""Function-vector prompts: the four prompt styles, tokenised with the frames located.

Styles (``fv_prompts``); the answer is always the first token of ``" {output}"``:
``"instruction"`` (``"{instruction}\\nQ: {input}\\nA:"``), ``"chat"`` (the model's chat
template around ``"{instruction}\\nQ: {input}"``, then ``"A:"``), ``"icl"`` (``n_shots``
demonstrations, no instruction; ``n_shots=0`` is the ICL query alone, ``"Q: {input}\\nA:"``),
``"zero_shot"`` (the instruction prompt without its instruction, ``"\\nQ: {input}\\nA:"``) and
``"chat_zero_shot"`` (the chat prompt without its instruction). ``ZERO_SHOT_OF`` maps each
extraction style to the zero-shot prompt in its own format, where function vectors are
evaluated. Frames are located in
the tokenised prompt through the tokenizer's character offsets; a frame that no token
covers is an error.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechsteer._validate import nonneg_int, positive_int
from mechsteer.tasks.fv.data import FVTask, load_task

STYLES = ("instruction", "chat", "icl", "zero_shot", "chat_zero_shot")
# Extraction style -> (zero-shot style, n_shots) in the same format: the prompt minus its
# instruction, or minus its demonstrations.
ZERO_SHOT_OF = {"instruction": ("zero_shot", 0), "chat": ("chat_zero_shot", 0), "icl": ("icl", 0)}
INSTRUCTION_TEMPLATE = "{instruction}\nQ: {input}\nA:"
ZERO_SHOT_TEMPLATE = "\nQ: {input}\nA:"
DEMO_TEMPLATE = "Q: {input}\nA: {output}\n\n"
_SENTINEL = "\x1fmechsteer-user-message\x1f"


@dataclass(frozen=True)
class FVPrompts:
    """Prompts of one task in one style, unpadded (prompts may differ in token length).

    ``tokens[n]`` is prompt n's 1-D token ids (BOS included when the model prepends one);
    the prediction is read at its LAST position. ``answers[n]`` is the first token of
    " {output}". ``frames[n]`` are the token positions of the instruction's intensional
    frame in prompt n (empty when the prompt has no instruction, e.g. zero-shot).
    ``instruction_positions[n]``: all token positions of the instruction (what ``corrupt``
    replaces); ``demo_positions[n][k]``: token positions of demonstration k's output (ICL);
    ``pairs[n]`` / ``demo_pairs[n]``: the task's pair indices of the query and of the
    demonstrations (what held-out splits are checked on).
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
    pairs: list[int] = field(default_factory=list)  # the task's pair index queried by each prompt
    demo_pairs: list[list[int]] = field(default_factory=list)  # pair indices of each prompt's demonstrations

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
            pairs=pick(self.pairs),
            demo_pairs=pick(self.demo_pairs),
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
    if style == "chat_zero_shot":
        return chat[0] + f"Q: {x}" + chat[1] + "A:", None, []
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
    items: Sequence[int] | None = None,
    demo_items: Sequence[int] | None = None,
) -> FVPrompts:
    """Prompts of ``task`` in ``style`` for ``model``'s tokenizer: ``n`` items (shuffled by
    ``seed``; all if None) for each instruction index in ``instructions`` (default all;
    instruction and chat styles only), instruction-major. Answer = first token of " {output}".
    ``items``: the pair indices to query, in this order (instead of the shuffled pairs);
    ``demo_items``: the pair indices ICL demonstrations are drawn from (default: all pairs
    but the query), so held-out items can be kept out of every demonstration.

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
    for name, idx in (("items", items), ("demo_items", demo_items)):
        if idx is not None and not all(0 <= int(i) < len(t.pairs) for i in idx):
            raise ValueError(f"{name} must be pair indices of task {t.name!r} in 0..{len(t.pairs) - 1}, got {list(idx)}.")
    order_q = order if items is None else [int(i) for i in items]
    demo_pool = order if demo_items is None else [int(i) for i in demo_items]
    items = order_q if n is None else order_q[:n]
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
    if style == "icl" and not 0 <= n_shots < len(t.pairs):
        raise ValueError(f"n_shots must be in 0..{len(t.pairs) - 1} for task {t.name!r}, got {n_shots}.")
    if style == "icl" and n_shots and any(len([k for k in demo_pool if k != j]) < n_shots for _, j in jobs):
        raise ValueError(f"demo_items holds {len(demo_pool)} pairs: too few for {n_shots} demonstrations per query.")
    chat = _chat_parts(model.tokenizer) if style in ("chat", "chat_zero_shot") else None
    demo_rng = random.Random(seed + 1)
    rows, dropped, used = [], Counter(), []
    for i, j in jobs:
        x, y = t.pairs[j]
        answer = model.tokenizer(" " + y, add_special_tokens=False)["input_ids"]
        if not answer:
            dropped["empty_answer"] += 1
            continue
        demo_idx = demo_rng.sample([k for k in demo_pool if k != j], n_shots) if style == "icl" else []
        demos = [t.pairs[k] for k in demo_idx]
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
        used.append((j, demo_idx))
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
        pairs=[j for j, _ in used],
        demo_pairs=[d for _, d in used],
    )

