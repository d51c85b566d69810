"""Function-vector tasks as data: input/output pairs and instruction phrasings with their
intensional frames, one JSON file per task in ``mechsteer/tasks/fv_data``.

A frame is the minimal words of an instruction that define the task (paper 000, Sec. 3.1
and App. H), e.g. ``"opposite"`` in ``"Provide a word that is the semantic opposite"``;
``FVTask`` checks that every frame is a substring of its instruction.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from importlib import resources


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
