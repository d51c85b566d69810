"""Bring your own data: ``from_records`` on lists, DataFrames and files; padding; named
positions; multi-token answers and the teacher-forced log-prob metric; bad input."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import torch

from mechsteer.metrics import DATASET_METRICS, answer_logprob, resolve_metric
from mechsteer.tasks import ccc, from_records, ioi

# six prompts of different token lengths; record 2 has multi-token answers sharing " New"
RECORDS = [
    {"prompt": "The capital of France is Rome. Q: What is the capital of France? A:",
     "corrupted": "The capital of France is Paris. Q: What is the capital of France? A:",
     "correct": " Paris", "wrong": " Rome", "positions": {"country": "France", "context": "Rome"}},
    {"prompt": "The sky is", "corrupted": "The grass is", "correct": " blue", "wrong": " green"},
    {"prompt": "The largest city of the USA is", "corrupted": "The largest city of the UAE is",
     "correct": " New York", "wrong": " New Delhi", "positions": {"country": "USA"}},
    {"prompt": "When Mary met John, John gave it to", "corrupted": "When Mary met John, Mary gave it to",
     "correct": " Mary", "wrong": " John", "positions": {"IO": "Mary", "S1": "John", "S2": [20, 24]}},
    {"prompt": "Snow is", "corrupted": "Grass is", "correct": " white", "wrong": " green"},
    {"prompt": "The capital of Japan is", "corrupted": "The capital of China is", "correct": " Tokyo", "wrong": " Beijing",
     "topic": "geo"},
]


def _records(model):
    """RECORDS whose clean and corrupted prompts have one token length for ``model``."""
    return [r for r in RECORDS if len(model.to_tokens(r["prompt"])[0]) == len(model.to_tokens(r["corrupted"])[0])]


def _same(a, b):
    assert a.prompts == b.prompts and a.corrupted_prompts == b.corrupted_prompts
    for key in ("tokens", "corrupted_tokens", "correct", "wrong", "lengths"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.positions == b.positions and a.correct_tokens == b.correct_tokens and a.wrong_tokens == b.wrong_tokens
    assert a.meta == b.meta and a.dropped == b.dropped


@pytest.fixture(scope="module")
def recs(tiny_gpt2):
    return _records(tiny_gpt2)


@pytest.fixture(scope="module")
def ds(tiny_gpt2, recs):
    return from_records(tiny_gpt2, recs)


def test_lists_frames_and_files_give_one_dataset(tiny_gpt2, recs, ds, tmp_path):
    assert len(recs) >= 5  # the fixture is what it says: mixed lengths, all kept
    jsonl, js, csv_path = tmp_path / "d.jsonl", tmp_path / "d.json", tmp_path / "d.csv"
    jsonl.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    js.write_text(json.dumps(recs))
    cols = ["prompt", "corrupted", "correct", "wrong", "positions", "topic"]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in recs:
            w.writerow({**r, "positions": json.dumps(r["positions"]) if "positions" in r else "", "topic": r.get("topic", "")})
    frame = pd.DataFrame(recs)
    for other in (frame, jsonl, str(jsonl), js):
        _same(ds, from_records(tiny_gpt2, other))
    from_csv = from_records(tiny_gpt2, csv_path)  # CSV cells are strings: an empty "topic" is ""
    assert [m.get("topic") or None for m in from_csv.meta] == [m.get("topic") for m in ds.meta]
    assert torch.equal(from_csv.tokens, ds.tokens) and from_csv.positions == ds.positions


def test_order_is_kept_and_n_takes_the_first(tiny_gpt2, recs, ds):
    assert [m["record"] for m in ds.meta] == list(range(len(recs)))
    assert [p.startswith(r["prompt"]) for p, r in zip(ds.prompts, recs)] == [True] * len(recs)
    assert from_records(tiny_gpt2, recs, n=3).prompts == ds.prompts[:3]
    shuffled = from_records(tiny_gpt2, recs, seed=1)
    assert sorted(shuffled.prompts) == sorted(ds.prompts) and shuffled.prompts != ds.prompts


def test_mixed_lengths_are_right_padded(tiny_gpt2, ds):
    assert ds.is_padded and len(set(ds.lengths.tolist())) >= 4
    for b, text in enumerate(ds.prompts):
        ids = tiny_gpt2.to_tokens(text)[0].cpu()
        L = int(ds.lengths[b])
        assert L == len(ids) and int(ds.last[b]) == L - 1
        assert torch.equal(ds.tokens[b, :L].cpu(), ids)
        assert (ds.tokens[b, L:] == ds.pad_id).all() and (ds.corrupted_tokens[b, L:] == ds.pad_id).all()
        assert ds.mask[b].sum() == L
    one = ds.subset([1])
    assert one.n_pos == int(ds.lengths[1]) and not one.is_padded


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_named_positions_sit_at_the_last_character(family, tiny_gpt2, tiny_llama):
    model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family]
    ds = from_records(model, _records(model))
    checked = 0
    for b, pos in enumerate(ds.positions):
        rec = RECORDS[ds.meta[b]["record"]]
        for name, idx in pos.items():
            v = rec["positions"][name]
            last = (rec["prompt"][v[1] - 1] if isinstance(v, list) else v[-1])
            assert last in ds.str_tokens[b][idx], (name, v, ds.str_tokens[b][idx])
            checked += 1
    assert checked >= 5
    io = ds.positions[[m["record"] for m in ds.meta].index(3)]
    assert io["IO"] < io["S1"] < io["S2"]  # S2 = the second "John", given as a span


def test_builtin_tasks_name_their_positions(tiny_llama):
    d = ioi(tiny_llama, n=6, same_length=False)
    for b, m in enumerate(d.meta):
        p = d.positions[b]
        assert m["io"][-1] in d.str_tokens[b][p["IO"]] and m["subject"][-1] in d.str_tokens[b][p["S1"]]
        assert m["subject"][-1] in d.str_tokens[b][p["S2"]] and p["IO"] < p["S2"] < int(d.last[b])
    c = ccc(tiny_llama, n=6, same_length=False, template=[0, 1])
    for b, m in enumerate(c.meta):
        p = c.positions[b]
        assert set(p) == {"country", "context", "query"} and p["country"] < p["context"] < p["query"]
        assert m["in_context"][-1] in c.str_tokens[b][p["context"]]
    assert c.position_axis().labels[:3] == ["country", "context", "query"] or not c.is_padded


def test_mixed_builtin_tasks_keep_more(tiny_gpt2):
    assert len(ccc(tiny_gpt2, n=None, template=[0, 1], same_length=False)) > len(ccc(tiny_gpt2, n=None, template=[0, 1]))
    mixed = ioi(tiny_gpt2, n=None, same_length=False)
    assert mixed.is_padded and len(mixed) > len(ioi(tiny_gpt2, n=None))


def test_multi_token_answers_share_their_prefix(tiny_gpt2, recs, ds):
    b = [m["record"] for m in ds.meta].index(2)
    c, w = ds.correct_tokens[b], ds.wrong_tokens[b]
    k = next(i for i, (x, y) in enumerate(zip(c, w)) if x != y)
    assert k >= 1 and ds.multi_token
    L = int(ds.lengths[b])
    assert ds.tokens[b, L - k:L].tolist() == c[:k] == ds.corrupted_tokens[b, L - k:L].tolist()
    assert (int(ds.correct[b]), int(ds.wrong[b])) == (c[k], w[k])
    assert ds.prompts[b] == recs[2]["prompt"] + ds.meta[b]["answer_prefix"]
    assert tiny_gpt2.to_tokens(recs[2]["prompt"] + recs[2]["correct"])[0].tolist()[L - k:] == c


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("answer", ["correct", "wrong"])
@torch.no_grad()
def test_answer_logprob_is_the_sum_of_single_steps(family, answer, tiny_gpt2, tiny_llama):
    model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[family]
    ds = from_records(model, _records(model))
    tf = ds.teacher_forced(model, answer)
    per = answer_logprob(model(tf.tokens), tf, reduce="none")
    for b in range(len(ds)):
        rec = RECORDS[ds.meta[b]["record"]]
        ids = model.to_tokens(rec["prompt"])[0].tolist()
        by_hand = 0.0
        for a in (ds.correct_tokens if answer == "correct" else ds.wrong_tokens)[b]:  # one forward per answer token
            by_hand += model(torch.tensor([ids]))[0, -1].double().log_softmax(-1)[a].item()
            ids.append(a)
        assert per[b].item() == pytest.approx(by_hand, rel=1e-4, abs=1e-5)
    fn, label = resolve_metric("answer_logprob")
    assert label == "answer_logprob" and fn is DATASET_METRICS["answer_logprob"]
    assert fn(model(tf.tokens), tf).item() == pytest.approx(per.mean().item(), rel=1e-6)
    sub = tf.subset([2, 0])
    assert answer_logprob(model(sub.tokens), sub, reduce="none").tolist() == pytest.approx(per[[2, 0]].tolist(), rel=1e-4)


def test_answer_logprob_needs_teacher_forcing_for_multi_token_answers(tiny_gpt2, ds):
    logits = torch.zeros(len(ds), ds.n_pos, tiny_gpt2.cfg.d_vocab)
    with pytest.raises(ValueError, match="teacher_forced"):
        answer_logprob(logits, ds)
    single = ds.subset([0])  # single-token answers: log p(correct) at the last token
    lg = tiny_gpt2(single.tokens)
    assert answer_logprob(lg, single).item() == pytest.approx(lg[0, -1].log_softmax(-1)[single.correct[0]].item(), rel=1e-5)
    with pytest.raises(ValueError, match="already teacher-forced"):
        ds.teacher_forced(tiny_gpt2).teacher_forced(tiny_gpt2)


TWIN = {"prompt": "The capital of Japan is", "corrupted": "The capital of the country Japan is", "correct": " Tokyo",
        "wrong": " Beijing"}
SAME = {"prompt": "Snow is", "corrupted": "Grass is", "correct": " white", "wrong": " white"}


def test_length_mismatch_and_equal_answers_drop_or_raise(tiny_gpt2, recs):
    with pytest.warns(UserWarning, match=r"dropped 2 of .*corrupted_length_differs: 1 \(first: record 1\)"):
        ds = from_records(tiny_gpt2, [recs[0], TWIN, SAME, recs[1]])
    assert ds.dropped == {"corrupted_length_differs": 1, "answers_equal": 1} and len(ds) == 2
    with pytest.raises(ValueError, match=r"record 1: the prompt has \d+ tokens, its corrupted twin \d+"):
        from_records(tiny_gpt2, [recs[0], TWIN], strict=True)
    with pytest.raises(ValueError, match=r"record 0: the correct and wrong answers are equal"):
        from_records(tiny_gpt2, [SAME], strict=True)
    with pytest.raises(ValueError, match="only 0 valid items"), pytest.warns(UserWarning):
        from_records(tiny_gpt2, [TWIN])


GOOD = {"prompt": "Snow is", "corrupted": "Grass is", "correct": " white", "wrong": " green"}


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ({"prompt": "Snow is", "corrupted": "Grass is", "correct": " white"}, ValueError, r"record 1 has no 'wrong' column"),
        ({**GOOD, "correct": 5}, TypeError, r"record 1, column 'correct': expected a string, got int"),
        ({**GOOD, "prompt": None}, TypeError, r"record 1, column 'prompt': expected a string, got NoneType"),
        ({**GOOD, "prompt": "  "}, ValueError, r"record 1, column 'prompt': the prompt prompt is empty"),
        ({**GOOD, "corrupted": ""}, ValueError, r"record 1, column 'corrupted': the corrupted prompt is empty"),
        ({**GOOD, "wrong": ""}, ValueError, r"record 1, column 'wrong': the answer '' tokenises to nothing"),
        ({**GOOD, "positions": {"x": "Rain"}}, ValueError, r"record 1, column 'positions': 'x' -> 'Rain' is not found"),
        ({**GOOD, "positions": {"x": [3, 40]}}, ValueError, r"record 1, column 'positions': span 'x' -> \[3, 40\]"),
        ({**GOOD, "positions": {"x": 3}}, TypeError, r"record 1, column 'positions': 'x' -> 3"),
        ({**GOOD, "positions": ["Snow"]}, TypeError, r"record 1, column 'positions': expected a dict"),
        ({**GOOD, "positions": {"end": "Snow"}}, ValueError, r"record 1, column 'positions': name 'end'"),
        ({**GOOD, "positions": "{not json"}, ValueError, r"record 1, column 'positions': not valid JSON"),
        ("Snow is", TypeError, r"record 1 is a str"),
    ],
)
def test_bad_records_name_the_record_and_column(tiny_gpt2, bad, error, match):
    with pytest.raises(error, match=match):
        from_records(tiny_gpt2, [GOOD, bad], name="mine")


def test_bad_record_containers(tiny_gpt2, tmp_path):
    with pytest.raises(TypeError, match="records must be a list of dicts"):
        from_records(tiny_gpt2, 42)
    with pytest.raises(ValueError, match="suffix '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        from_records(tiny_gpt2, tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_records(tiny_gpt2, tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"line 2 \(record 1\) is not valid JSON"):
        from_records(tiny_gpt2, tmp_path / "bad.jsonl")
    frame = pd.DataFrame([GOOD, {**GOOD, "correct": float("nan")}])
    with pytest.raises(TypeError, match=r"record 1, column 'correct': expected a string, got float"):
        from_records(tiny_gpt2, frame)
    with pytest.raises(TypeError, match="strict"):
        from_records(tiny_gpt2, [GOOD], strict="yes")


@pytest.mark.integration
def test_smollm2_keeps_nearly_all_builtin_items(smollm2):
    c = ccc(smollm2, n=None, template=0, same_length=False)
    assert len(c) >= 190 and c.is_padded and c.multi_token  # of 198 candidates (issue 11)
    assert set(c.dropped) <= {"corrupted_length_differs"}
    i = ioi(smollm2, n=None, same_length=False)
    assert len(i) == 1000 and not i.dropped
    for d, names in ((c, ("country", "context", "query")), (i, ("IO", "S1", "S2"))):
        assert all(set(p) == set(names) for p in d.positions)
