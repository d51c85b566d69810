from types import SimpleNamespace

import pytest
import torch
from jaxtyping import TypeCheckError

from mechsteer import metrics


@pytest.fixture
def logits():
    # batch 2, pos 3, vocab 4; last position decides.
    x = torch.zeros(2, 3, 4)
    x[0, -1] = torch.tensor([0.0, 3.0, 1.0, 0.0])
    x[1, -1] = torch.tensor([2.0, 0.0, 1.0, 5.0])
    return x


def test_logit_diff(logits):
    c, w = torch.tensor([1, 3]), torch.tensor([2, 0])
    assert metrics.logit_diff(logits, c, w, reduce="none").tolist() == [2.0, 3.0]
    assert metrics.logit_diff(logits, c, w).item() == 2.5
    assert metrics.logit_diff(logits, c, w, reduce="sum").item() == 5.0


def test_logit_diff_per_prompt_positions(logits):
    pos = torch.tensor([0, 2])
    assert metrics.logit_diff(logits, torch.tensor([1, 3]), torch.tensor([2, 0]), pos=pos, reduce="none").tolist() == [0.0, 3.0]


def test_answer_prob_matches_softmax(logits):
    p = metrics.answer_prob(logits, torch.tensor([1, 3]), reduce="none")
    expected = logits[:, -1].softmax(-1)[[0, 1], [1, 3]]
    torch.testing.assert_close(p, expected)


def test_kl_is_zero_for_equal_and_positive_otherwise(logits):
    assert metrics.kl_div(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    other = logits.clone()
    other[:, -1, 0] += 1.0
    kl = metrics.kl_div(logits, other, reduce="none")
    assert (kl > 0).all()
    p, q = logits[:, -1].softmax(-1), other[:, -1].softmax(-1)
    torch.testing.assert_close(kl, (p * (p / q).log()).sum(-1))


def test_rank_and_accuracy(logits):
    assert metrics.answer_rank(logits, torch.tensor([1, 2])).tolist() == [0, 2]
    assert metrics.accuracy(logits, torch.tensor([1, 2])).item() == 0.5
    assert metrics.accuracy(logits, torch.tensor([1, 2]), k=3).item() == 1.0


def test_resolve_metric_names_and_callables():
    assert metrics.resolve_metric(None) == metrics.resolve_metric("logit_diff") == (None, "logit_diff")
    fn, name = metrics.resolve_metric("answer_prob")
    assert name == "answer_prob" and fn is metrics.DATASET_METRICS["answer_prob"]

    def mine(logits, ds):
        return logits.sum()

    assert metrics.resolve_metric(mine) == (mine, "mine")
    with pytest.raises(ValueError, match="known metric names"):
        metrics.resolve_metric("prob")
    with pytest.raises(TypeError, match="callable"):
        metrics.resolve_metric(3)


def test_dataset_metrics_read_the_last_position():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 2.0, 1.0]], [[0.0, 0.0, 0.0], [3.0, 0.0, 1.0]]])
    ds = SimpleNamespace(correct=torch.tensor([1, 0]), wrong=torch.tensor([2, 2]))
    assert metrics.DATASET_METRICS["logit_diff"](logits, ds).item() == 1.5
    assert metrics.DATASET_METRICS["logit"](logits, ds).item() == 2.5
    p = metrics.DATASET_METRICS["answer_prob"](logits, ds)
    assert p.item() == pytest.approx(metrics.answer_prob(logits, ds.correct).item())


def test_normalize():
    assert metrics.normalize(torch.tensor(1.5), 2.0, 1.0).item() == 0.5
    with pytest.raises(ValueError, match="equal"):
        metrics.normalize(torch.tensor(1.0), 1.0, 1.0)


def test_bad_shapes_are_clear_errors(logits):
    # Under the test suite's runtime jaxtyping checks, the annotation catches a bad shape
    # first; without them (as users run), mechsteer's own ValueError does.
    with pytest.raises((ValueError, TypeCheckError)):
        metrics.logit_diff(logits, torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match=r"answer ids of shape \(2,\)"):
        metrics._ids(torch.tensor([1, 2, 3]), 2, "cpu")
    with pytest.raises((ValueError, TypeCheckError)):
        metrics.last_logits(torch.zeros(1, 1, 1, 4))
    with pytest.raises((ValueError, TypeCheckError), match="reduce"):
        metrics._reduce(torch.zeros(2), "max")
