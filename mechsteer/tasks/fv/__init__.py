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
- ``"zero_shot"``: ``"\\nQ: {input}\\nA:"``, the instruction prompt without its instruction;
  ``"chat_zero_shot"``: the chat prompt without its instruction; ``"icl"`` with
  ``n_shots=0``: ``"Q: {input}\\nA:"``, the ICL prompt without its demonstrations.
  ``ZERO_SHOT_OF[style]`` names the zero-shot prompt in each extraction style's own
  format: FVs are evaluated there (``mechsteer.fv.protocol``), so extraction and
  evaluation never differ in format.

``corrupt`` builds the *uninformative* prompts of the AIE (paper 000, Sec. 3.1): the
instruction's tokens are replaced by as many tokens drawn from a pool of ordinary words
unrelated to any task (the paper asks for sequences equiprobable to the instruction; the
pool matches length only, see ``corrupt``) (built at token level, so token lengths and positions are unchanged;
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
With 10 demonstrations (``"icl"``, Todd et al.'s setting and ``run_fv``'s default protocol)
it answers most tasks correctly (top-1 0.6-1.0 on 32 items: antonym 0.91, capitalize 0.84,
choose_first_of_3 0.97; capitalize_last_letter 0.12, choose_middle_of_3 0.41), against
0.0-0.2 on the bare query.

Modules: ``data`` (tasks, ``load_task``), ``prompts`` (``FVPrompts``, ``fv_prompts``),
``corrupt`` (uninformative prompts), ``filter`` (top-k predictions, the item and task
filters, held-out splits); every public name is re-exported here.
"""

from __future__ import annotations

from mechsteer.tasks.fv.corrupt import NEUTRAL_WORDS, corrupt
from mechsteer.tasks.fv.data import FV_TASKS, FVTask, Instruction, load_task
from mechsteer.tasks.fv.filter import (
    filter_correct,
    instruction_accuracy,
    select_tasks,
    split,
    task_accuracy,
    top_k_predictions,
)
from mechsteer.tasks.fv.prompts import (
    DEMO_TEMPLATE,
    INSTRUCTION_TEMPLATE,
    STYLES,
    ZERO_SHOT_OF,
    ZERO_SHOT_TEMPLATE,
    FVPrompts,
    fv_prompts,
)

__all__ = [
    "DEMO_TEMPLATE",
    "FV_TASKS",
    "INSTRUCTION_TEMPLATE",
    "NEUTRAL_WORDS",
    "STYLES",
    "ZERO_SHOT_OF",
    "ZERO_SHOT_TEMPLATE",
    "FVPrompts",
    "FVTask",
    "Instruction",
    "corrupt",
    "filter_correct",
    "fv_prompts",
    "instruction_accuracy",
    "load_task",
    "select_tasks",
    "split",
    "task_accuracy",
    "top_k_predictions",
]
