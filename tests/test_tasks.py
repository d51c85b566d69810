import pytest

from mechsteer.tasks import ccc, ioi, make_task
from mechsteer.tasks.base import Candidate, build_dataset, single_token


@pytest.mark.parametrize("task", ["ccc", "ioi"])
def test_datasets_are_valid_for_the_tokenizer(tiny, task):
    ds = make_task(task, tiny, n=12, seed=1)
    assert len(ds) == 12
    assert ds.tokens.shape == ds.corrupted_tokens.shape == (12, ds.n_pos)
    for i in range(len(ds)):
        assert single_token(tiny.tokenizer, ds.correct_answers[i]) == ds.correct[i].item()
        assert single_token(tiny.tokenizer, ds.wrong_answers[i]) == ds.wrong[i].item()
        assert ds.correct_answers[i].startswith(" ")
        assert (ds.tokens[i] == tiny.to_tokens(ds.prompts[i])[0]).all()
    assert len(ds.labels) == ds.n_pos == len(ds.str_tokens[0])


def test_ccc_prompts_follow_the_paper(tiny_gpt2):
    ds = ccc(tiny_gpt2, n=5)
    for p, q, c, w in zip(ds.prompts, ds.corrupted_prompts, ds.correct_answers, ds.wrong_answers):
        country = p.split("The capital of ")[1].split(" is")[0]
        assert p == f"The capital of {country} is{w}. Q: What is the capital of {country}? A:"
        assert q == f"The capital of {country} is{c}. Q: What is the capital of {country}? A:"


def test_ioi_corruption_swaps_the_second_subject(tiny_llama):
    ds = ioi(tiny_llama, n=5, template=1)
    for p, q, c, w in zip(ds.prompts, ds.corrupted_prompts, ds.correct_answers, ds.wrong_answers):
        assert p == f"When{c} met with{w},{w} gave the {p.split(' the ')[1].split(' to')[0]} to"
        assert q == p.replace(f",{w} gave", f",{c} gave")
        assert (ds.tokens != ds.corrupted_tokens).sum() == 5  # exactly one token per prompt


def test_generation_is_deterministic_and_seeded(tiny_gpt2):
    assert ioi(tiny_gpt2, n=8, seed=3).prompts == ioi(tiny_gpt2, n=8, seed=3).prompts
    assert ioi(tiny_gpt2, n=8, seed=3).prompts != ioi(tiny_gpt2, n=8, seed=4).prompts


def test_split_and_subset(tiny_gpt2):
    ds = ccc(tiny_gpt2, n=12)
    train, test = ds.split(0.25)
    assert (len(train), len(test)) == (9, 3)
    assert not set(train.prompts) & set(test.prompts)
    assert train.subset([0, 2]).prompts == [train.prompts[0], train.prompts[2]]
    assert list(ds.to_frame().columns) == ["prompt", "corrupted_prompt", "correct", "wrong", "correct_id", "wrong_id", "length", "positions"]
    with pytest.raises(ValueError, match="test_fraction"):
        ds.split(1.5)


def test_invalid_items_are_dropped_and_counted(tiny_gpt2):
    cands = [
        Candidate("When Mary met with John, John gave the book to", "When Mary met with John, Mary gave the book to", " Mary", " John"),
        Candidate("When Mary met with John, John gave the map to", "x", " Mary", " John"),  # corrupted length differs
        Candidate("When Mary met with John, John gave the key to", "When Mary met with John, Mary gave the key to", " Maryxyzzy", " John"),
        Candidate("When Mary met with John, John gave the book to", "When Mary met with John, Mary gave the book to", " Mary", " John"),
        Candidate("Then, Mary and John had a long talk. John handed the book to", "Then, Mary and John had a long talk. Mary handed the book to", " Mary", " John"),
        Candidate("When Anne met with Tom, Tom gave the ring to", "When Anne met with Tom, Anne gave the ring to", " Anne", " Tom"),
    ]
    ds = build_dataset("toy", tiny_gpt2, cands, n=None, seed=0)
    assert len(ds) == 2
    assert ds.dropped == {"duplicate": 1, "corrupted_length_differs": 1, "answer_not_single_token": 1, "length_not_modal": 1}


def test_too_few_valid_items_is_a_clear_error(tiny_gpt2):
    cands = [Candidate("a b", "a c", " Maryxyzzy", " John")]
    with pytest.raises(ValueError, match=r"only 0 valid items.*answer_not_single_token"):
        build_dataset("toy", tiny_gpt2, cands, n=None, seed=0)
    with pytest.raises(ValueError, match="Unknown task"):
        make_task("sst2", tiny_gpt2)
    with pytest.raises(ValueError, match="template index 9"):
        ioi(tiny_gpt2, template=9)


def test_evaluate_reports_accuracy(tiny_gpt2):
    stats = ioi(tiny_gpt2, n=8).evaluate(tiny_gpt2)
    assert set(stats) == {"n", "accuracy", "logit_diff", "corrupted_accuracy", "corrupted_logit_diff"}
    assert 0.0 <= stats["accuracy"] <= 1.0
