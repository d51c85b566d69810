"""Bad input never passes silently: datasets, tasks, metrics, sites and attribution results.

One test per case from the issue; each would have passed (or failed deep inside torch)
before the checks. The tests run with jaxtyping's runtime checks off, as users run
mechsteer (the test suite's import hook would otherwise answer some of them first), so
that the error seen is mechsteer's own.
"""

from __future__ import annotations

import dataclasses

import jaxtyping
import pytest
import torch

from mechsteer.attribution.result import AttributionResult, stack_sites
from mechsteer.metrics import accuracy, answer_prob, answer_rank, kl_div, logit_diff, normalize
from mechsteer.sites import Location, hook_name, hooked, live_hooks
from mechsteer.tasks import ccc, ioi, make_task
from mechsteer.tasks.base import build_dataset
from mechsteer.tasks.ccc import ccc_candidates
from mechsteer.tasks.fv import fv_prompts, split, task_accuracy, top_k_predictions
from mechsteer.tasks.ioi import ioi_candidates
from mechsteer.tiny import tiny_model


def _jaxtyping(on: bool) -> bool:
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", not on)
    return not before


@pytest.fixture(autouse=True)
def production():
    """jaxtyping's checks off (users run without the test suite's import hook)."""
    before = _jaxtyping(False)
    yield
    _jaxtyping(before)


@pytest.fixture(scope="module")
def ds(tiny_gpt2):
    return ccc(tiny_gpt2, n=8)


def _nan_model(family: str):
    """A fresh tiny model with one NaN weight in its final norm (every logit becomes NaN)."""
    model = tiny_model(family)
    p = next(p for n, p in model.named_parameters() if ("ln_f" in n or "model.norm" in n) and "weight" in n)
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    return model


# ---- 1. counts ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: ccc(m, n=-3), "n must be a positive integer, got -3"),
        (lambda m: ccc(m, n=0), "n must be a positive integer, got 0"),
        (lambda m: ioi(m, n=True), "n must be a positive integer, got True"),
        (lambda m: ioi(m, n=4, seed=1.5), "seed must be a non-negative integer, got 1.5"),
        (lambda m: ioi(m, n=4, seed=-1), "seed must be a non-negative integer, got -1"),
        (lambda m: make_task("ioi", m, n=-1), "n must be a positive integer, got -1"),
        (lambda m: ccc(m, n=4, template=True), "template index must be an int, got True"),
        (lambda m: ioi(m, n=4, template=[1, False]), "template index must be an int, got False"),
        (lambda m: build_dataset("toy", m, [], n=None, seed=0, min_items=0), "min_items must be a positive integer"),
        (lambda m: ccc_candidates(per_country=0), "per_country must be a positive integer, got 0"),
        (lambda m: ccc_candidates(per_country=1000), "per_country must be at most"),
        (lambda m: ioi_candidates(n_per_template=-2), "n_per_template must be a positive integer, got -2"),
    ],
)
def test_task_counts_must_be_positive_integers(tiny_gpt2, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(tiny_gpt2)


def test_fv_counts_must_be_positive_integers(tiny_gpt2):
    with pytest.raises(ValueError, match="n must be a positive integer, got -2"):
        fv_prompts(tiny_gpt2, "antonym", n=-2)
    with pytest.raises(TypeError, match="n_shots must be a non-negative integer, got True"):
        fv_prompts(tiny_gpt2, "antonym", style="icl", n=2, n_shots=True)
    p = fv_prompts(tiny_gpt2, "antonym", n=4, instructions=[0])
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        top_k_predictions(tiny_gpt2, p, k=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        list(p.batches(0))
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        split(p, 0.25, seed=-1)
    with pytest.raises(ValueError, match="n_instructions must be a positive integer, got 0"):
        task_accuracy(None, table=None, n_instructions=0)


# ---- 2. datasets -------------------------------------------------------------------------
def test_empty_dataset_is_refused(ds):
    with pytest.raises(ValueError, match=r"index \[\] selects no items"):
        ds.subset([])
    with pytest.raises(ValueError, match="is empty"):
        dataclasses.replace(ds, prompts=[], corrupted_prompts=[], correct_answers=[], wrong_answers=[],
                            tokens=ds.tokens[:0], corrupted_tokens=ds.corrupted_tokens[:0],
                            correct=ds.correct[:0], wrong=ds.wrong[:0], str_tokens=[], meta=[])


def test_float_token_tensors_are_refused(ds):
    with pytest.raises(TypeError, match=r"tokens must be a tensor of integer token ids.*float32"):
        dataclasses.replace(ds, tokens=ds.tokens.float())
    with pytest.raises(TypeError, match=r"correct must be a tensor of integer token ids"):
        dataclasses.replace(ds, correct=ds.correct.float())
    with pytest.raises(ValueError, match=r"corrupted_tokens has shape"):
        dataclasses.replace(ds, corrupted_tokens=ds.corrupted_tokens[:, :-1])
    with pytest.raises(ValueError, match="negative token id"):
        dataclasses.replace(ds, wrong=ds.wrong - 10_000)


def test_float_tokens_are_refused_under_jaxtyping_too(ds):
    _jaxtyping(True)
    with pytest.raises(TypeError):
        dataclasses.replace(ds, tokens=ds.tokens.float())


def test_answer_id_beyond_the_vocabulary(tiny_gpt2, ds):
    bad = dataclasses.replace(ds, correct=ds.correct + tiny_gpt2.cfg.d_vocab)
    msg = rf"correct holds token id \d+, beyond the model's vocabulary \(d_vocab = {tiny_gpt2.cfg.d_vocab}"
    with pytest.raises(ValueError, match=msg):
        bad.validate_for(tiny_gpt2)
    with pytest.raises(ValueError, match=msg):
        bad.evaluate(tiny_gpt2)
    assert ds.validate_for(tiny_gpt2) is ds
    logits = torch.zeros(2, 3, 10)
    with pytest.raises(ValueError, match=r"correct holds token id 10; ids must be in 0..9"):
        logit_diff(logits, torch.tensor([10, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"wrong holds token id -1"):
        logit_diff(logits, torch.tensor([1, 1]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"answer holds token id 12"):
        answer_prob(logits, torch.tensor([12, 1]))


def test_subset_index_out_of_range(ds):
    with pytest.raises(ValueError, match=r"index 100 is out of range: this dataset has 8 items \(0..7\)"):
        ds.subset([100])
    with pytest.raises(TypeError, match="index must hold ints"):
        ds.subset([True])
    with pytest.raises(TypeError, match="index must be a slice or a list of ints"):
        ds.subset(3)
    assert ds.subset([-1]).prompts == [ds.prompts[-1]]


# ---- attribution results -----------------------------------------------------------------
@pytest.fixture
def result():
    return AttributionResult(torch.arange(6.0).reshape(2, 3), ("layer", "pos"), "test")


def test_result_top_k_and_select_out_of_range(result):
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        result.top_k(0)
    with pytest.raises(ValueError, match=r"select\(layer=9\) is out of range: axis 'layer' has 2 entries \(0..1\)"):
        result.select(layer=9)
    with pytest.raises(TypeError, match=r"select\(layer=...\) takes an int index or a str label, got True"):
        result.select(layer=True)
    with pytest.raises(ValueError, match=r"select\(pos='x'\): no such label"):
        result.select(pos="x")
    with pytest.raises(ValueError, match="no axis 'head'"):
        result.sum("head")
    with pytest.raises(ValueError, match="one result per site"):
        stack_sites([result], ["attn_out", "mlp_out"])
    assert result.select(layer=-1).scores.tolist() == [3.0, 4.0, 5.0]


# ---- sites -------------------------------------------------------------------------------
def test_bool_is_not_a_layer_head_or_position(tiny_gpt2):
    with pytest.raises(TypeError, match="Location layer must be an int, got True"):
        Location("attn_out", True)
    with pytest.raises(TypeError, match="Location head must be an int or None, got False"):
        Location("z", 0, head=False)
    with pytest.raises(TypeError, match="Location pos must be an int or None, got 1.0"):
        Location("z", 0, pos=1.0)
    with pytest.raises(ValueError, match="Layer True is out of range"):
        hook_name("attn_out", True, tiny_gpt2)


def test_hook_returning_the_wrong_shape(tiny):
    name = hook_name("attn_out", 0)
    tokens = tiny.to_tokens(["Hello there"])
    with pytest.raises(ValueError, match=rf"hook at '{name}' returned shape \(1, \d+, \d+\), but its input has shape"):
        with hooked(tiny, [(name, lambda x, hook: x[:, :, :-1])]):
            tiny(tokens)
    with pytest.raises(TypeError, match=rf"hook at '{name}' returned tuple"):
        with hooked(tiny, [(name, lambda x, hook: (x,))]):
            tiny(tokens)
    assert live_hooks(tiny) == []


# ---- 3. non-finite values ----------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_evaluate_raises_on_nan_logits(family):
    model = _nan_model(family)
    ds = ioi(model, n=4)
    with pytest.raises(FloatingPointError, match="ioi: model logits at the last position of the clean prompts"):
        ds.evaluate(model)


def test_metrics_raise_instead_of_returning_nan():
    logits = torch.zeros(2, 3, 10)
    logits[1, -1, 4] = float("nan")
    ok = torch.tensor([1, 2])
    with pytest.raises(FloatingPointError, match="logit_diff"):
        logit_diff(logits, ok, torch.tensor([0, 4]))
    with pytest.raises(FloatingPointError, match="answer_prob"):
        answer_prob(logits, ok)
    with pytest.raises(FloatingPointError, match="kl_div"):
        kl_div(logits, torch.zeros(2, 3, 10))
    with pytest.raises(FloatingPointError, match="answer_rank"):
        answer_rank(logits, torch.tensor([0, 4]))
    with pytest.raises(FloatingPointError, match="normalize"):
        normalize(torch.tensor([1.0]), torch.tensor(float("nan")), 0.0)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        accuracy(logits, ok, k=0)
    with pytest.raises(ValueError, match=r"pos must be an int in -3..2"):
        logit_diff(logits, ok, ok + 1, pos=3)
    assert logit_diff(torch.zeros(2, 3, 10), ok, ok + 1).item() == 0.0
