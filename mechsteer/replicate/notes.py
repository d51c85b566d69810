"""What REPLICATION.md says besides the rows: how each protocol point of the papers is
followed (with the test that checks it), and where mechsteer's protocol differs, one line
each. Kept as data so that every written report carries them."""

from __future__ import annotations

# (protocol point, what mechsteer does, where it is tested)
PROTOCOL = [
    ("FV extraction and evaluation (000, 004)",
     "Todd et al.'s ICL protocol is the default (`FVConfig(protocol=\"icl\")`, `FVConfig.paper()`): mean head outputs "
     "over 10-shot prompts, AIE on shuffled-label prompts, evaluation on the bare query in the extraction prompts' "
     "own format (`tasks.fv.ZERO_SHOT_OF`; the old chat-extracted / raw-evaluated mismatch is gone); >= 50 held-out "
     "test items per task, never in an extraction prompt, answered correctly in context; a separate validation set "
     "picks the FV layer", "tests/test_fv_pipeline.py, tests/test_fv_tasks.py"),
    ("Table 1 like for like (000)",
     "every head-scoring method timed on the same prompts at batch 1 and in one batch (`fv.timing.table1`); the "
     "paper's procedure is named `naive`, mechsteer's faster AIE `fast`", "tests/test_fv_timing.py"),
    ("Sec. 6.1 / Fig. 9 (003)",
     "raw attribution scores as alphas and a beta sweep by default (`sweep_beta`); normalised scores and a fitted "
     "beta are options (`normalize=True, beta=\"fit\"`); per-position DLA `dla_per_position`",
     "tests/test_from_attribution.py, tests/test_dla_positions.py"),
    ("Table 2 column C (003)", "a paraphrase of template 0 with its token length (`tasks.ccc.ccc_paraphrase`), so "
     "position-bound interventions apply; `template_table` computes the whole table, no NaN", "tests/test_transfer.py"),
    ("Fig. 6 trained on all tasks (003)", "mixed-length training: `transfer_matrix(..., include_all=True)`",
     "tests/test_transfer.py, tests/test_padding_steering.py"),
    ("Fig. 4 statistics (003)", "`refit_stability`: 5 seeds, Kendall tau of per-location effects and cosine "
     "distance per pair of refits", "tests/test_stability.py"),
    ("Fig. 7 v site (003)", "`sites=[\"v\"]`: value vectors per KV head (GQA) as an intervention site",
     "tests/test_v_site.py"),
    ("App. A.1 init (003)", "`init_std=\"std\"` (1e-5, default) or `\"var\"` (sqrt(1e-5)); E_0 and F do not change "
     "between them on SmolLM2 CCC (ActivScalar test E_0 -0.138 vs -0.141), Fig. 4's refits do (rows above)",
     "tests/test_interventions.py, tests/test_stability.py"),
    ("CP-LRP as lxt (000)", "`attnlrp(variant=\"cp-lxt\")` holds the gated MLP's gate constant, as lxt does; "
     "`\"cp\"` splits the product uniformly. Both conserve the logit (|sum R - f| <= 6e-6 on SmolLM2); input-"
     "relevance Spearman 0.84, FV top-20 head overlap 14/20 and 18/20", "tests/test_lrp_cp_lxt.py"),
    ("Show the effect (000, 004, 003)", "the FV rows run `FVConfig.paper` on `PAPER_TASKS`, the tasks where the "
     "injection works on SmolLM2; the demo and notebook 03 use them; the demo's alpha heatmap trains ActivScalar at "
     "lambda_M = 0.1 (`SPARSE_LAMBDA_M`: 137 of 1080 alphas non-negligible, the sparsest point of the CCC front that "
     "still flips nearly every train prompt)", "tests/test_report_cli.py, tests/test_replicate.py"),
]

DIFFERENCES = [
    "FV (000): head scores on 8 ICL prompts per task (paper 000: 5 per instruction x 5 instructions); mean_z on 20 "
    "prompts built on 20 train inputs; top-10 heads (3.7% of 270); injection scale 1.",
    "FV (000): AttnLRP on ICL prompts reads the attention to the demonstration outputs' tokens (an ICL prompt has no "
    "instruction, so no intensional frame).",
    "FV (000, 004): test and validation items are the held-out items the model answers correctly with 10 "
    "demonstrations, so the zero-shot baseline is near 0 by construction.",
    "FV (000): paper 000's instruction protocol runs (`protocol=\"instruction\"`) but no task passes its filter on "
    "SmolLM2 (the best instruction gets <= 16 of 30 train items right in the chat template).",
    "FV (000): corrupted instructions replace the instruction's tokens by as many neutral-word tokens; paper 000 "
    "samples sequences 'equiprobable to the task description', which is not implemented.",
    "Steering (003): 10 epochs at 10x App. A.1's learning rates (1e-2 scalars, 1e-3 vectors) with batches of 8, on "
    "half of 78 CCC items (the other half is the test set); the paper trains 25 epochs and does not give its batch "
    "setting for Table 2.",
    "Sec. 6.1 (003): the paper gives neither its beta range nor its choice rule; mechsteer sweeps +-10^[-3, 2] and "
    "keeps the largest E_0 (ties: F). AtP stands in for AttrPatch; DLA is read per position through the unembedding "
    "(`dla_per_position` mode 'vectors'), which the paper does not spell out.",
    "Table 2 C (003): the paper's other template is not given; mechsteer's is a same-length paraphrase.",
    "Fig. 4 (003): at init std 1e-5 the five refits of a SteerVec coincide on SmolLM2; the rows use the variance "
    "reading of App. A.1 (std sqrt(1e-5)), under which the seeds matter.",
    "Fig. 3 (003): lambda_M = 0.1 was picked from a SmolLM2 sweep; M_1 sums over parameters, so the value depends "
    "on the parameter count. Fig. 7: the v site scales per KV head (3 on SmolLM2, each read by 3 query heads); the "
    "row uses z (per query head) at the last position.",
    "Scale: SmolLM2-135M-Instruct on 2 CPU cores, against GPT-2/Pythia (003), Llama-3/Qwen3 (000) and GPT-J (004).",
]


def markdown() -> str:
    rows = ["| protocol point | what mechsteer does | tested in |", "|---|---|---|"]
    rows += [f"| {a} | {b} | {c} |" for a, b, c in PROTOCOL]
    return "\n".join(["## How the papers' protocols are followed", "", *rows, "",
                      "## Documented differences", "", *[f"- {d}" for d in DIFFERENCES]]) + "\n"
