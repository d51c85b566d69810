import json
from importlib import resources
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mechsteer.tasks.fv import (
    FV_TASKS,
    FVTask,
    Instruction,
    corrupt,
    filter_correct,
    fv_prompts,
    load_task,
    select_tasks,
    split,
    task_accuracy,
)

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def frame_words(prompts, k, tokenizer):
    """The text of each run of consecutive frame positions of prompt k, and the frames in text order."""
    runs = []
    for i in prompts.frames[k]:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    got = [tokenizer.decode(prompts.tokens[k][r]).strip() for r in runs]
    ins = load_task(prompts.task).instructions[prompts.instructions[k]]
    return got, sorted(ins.frame, key=ins.text.find)


def test_every_task_file_is_complete():
    assert len(FV_TASKS) >= 12
    for name in FV_TASKS:
        raw = json.loads((resources.files("mechsteer.tasks") / "fv_data" / f"{name}.json").read_text("utf-8"))
        assert {"task", "source", "description", "pairs", "instructions"} <= set(raw) and raw["task"] == name
        t = load_task(name)
        assert len(t.pairs) >= 50, name
        assert len({x for x, _ in t.pairs}) == len(t.pairs), f"{name}: repeated inputs"
        assert all(x and y for x, y in t.pairs)
        assert len(t.instructions) >= 5 and len({i.text for i in t.instructions}) == len(t.instructions)
        assert all(f in i.text for i in t.instructions for f in i.frame)
        assert 0 < t.chance_level < 0.5


def test_frames_tokens_and_answers(tiny):
    tok = tiny.tokenizer
    for name in FV_TASKS:
        p = fv_prompts(tiny, name, n=2)
        assert len(p) == 2 * len(load_task(name).instructions)
        for k in range(len(p)):
            assert torch.equal(p.tokens[k], tiny.to_tokens(p.texts[k])[0].cpu())
            assert p.frames[k] and set(p.frames[k]) <= set(p.instruction_positions[k])
            got, want = frame_words(p, k, tok)
            assert got == want, (name, p.texts[k])
            assert p.answers[k].item() == tok(" " + p.outputs[k], add_special_tokens=False)["input_ids"][0]
            ins = load_task(name).instructions[p.instructions[k]].text
            assert p.texts[k] == f"{ins}\nQ: {p.inputs[k]}\nA:"


def test_zero_shot_and_icl_prompts(tiny_llama):
    z = fv_prompts(tiny_llama, "country-capital", style="zero_shot", n=3)
    assert z.texts[0] == f"\nQ: {z.inputs[0]}\nA:" and z.frames == [[], [], []] and z.instructions == [-1] * 3
    icl = fv_prompts(tiny_llama, "antonym", style="icl", n=4, n_shots=3)
    pairs = dict(load_task("antonym").pairs)
    for k in range(len(icl)):
        assert torch.equal(icl.tokens[k], tiny_llama.to_tokens(icl.texts[k])[0].cpu())
        blocks = icl.texts[k].split("\n\n")
        assert len(blocks) == 4 and blocks[-1] == f"Q: {icl.inputs[k]}\nA:"
        for b, pos in zip(blocks[:-1], icl.demo_positions[k]):
            x, y = b[3:].split("\nA: ")
            assert pairs[x] == y and x != icl.inputs[k]
            assert tiny_llama.tokenizer.decode(icl.tokens[k][pos]) == " " + y
    assert fv_prompts(tiny_llama, "antonym", style="icl", n=4, n_shots=3).texts == icl.texts  # seeded
    assert fv_prompts(tiny_llama, "antonym", style="icl", n=4, n_shots=3, seed=1).texts != icl.texts


def test_chat_prompts_use_the_template(tiny_gpt2, monkeypatch):
    with pytest.raises(ValueError, match="no chat template"):
        fv_prompts(tiny_gpt2, "antonym", style="chat", n=1)
    monkeypatch.setattr(tiny_gpt2.tokenizer, "chat_template", SMOL_TEMPLATE)
    p = fv_prompts(tiny_gpt2, "synonym", style="chat", n=2, instructions=[0, 5])
    for k in range(len(p)):
        ins = load_task("synonym").instructions[p.instructions[k]].text
        msg = [{"role": "user", "content": f"{ins}\nQ: {p.inputs[k]}"}]
        want = tiny_gpt2.tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) + "A:"
        assert p.texts[k] == want
        assert torch.equal(p.tokens[k], tiny_gpt2.to_tokens(p.texts[k])[0].cpu())
        got, want_words = frame_words(p, k, tiny_gpt2.tokenizer)
        assert got == want_words
    c = corrupt(tiny_gpt2, p, seed=1)
    assert all(t.endswith(f"\nQ: {x}<|im_end|>\n<|im_start|>assistant\nA:") for t, x in zip(c.texts, c.inputs))


def test_corrupt_replaces_only_the_instruction(tiny):
    p = fv_prompts(tiny, "antonym", n=6)
    c = corrupt(tiny, p, seed=3)
    assert c.style == "instruction/corrupted" and len(c) == len(p)
    assert torch.equal(c.lengths, p.lengths) and torch.equal(c.answers, p.answers)
    changed = 0
    for k in range(len(p)):
        diff = set((c.tokens[k] != p.tokens[k]).nonzero().flatten().tolist())
        assert diff <= set(p.instruction_positions[k])
        changed += len(diff)
        assert c.texts[k].endswith(f"\nQ: {p.inputs[k]}\nA:")
    assert changed > 0.8 * sum(len(x) for x in p.instruction_positions)
    assert torch.equal(corrupt(tiny, p, seed=3).tokens[0], c.tokens[0])
    assert not torch.equal(corrupt(tiny, p, seed=4).tokens[0], c.tokens[0])


def test_icl_corruption_shuffles_labels(tiny_gpt2):
    p = fv_prompts(tiny_gpt2, "country-capital", style="icl", n=5, n_shots=4)
    c = corrupt(tiny_gpt2, p)
    assert c.style == "icl/corrupted" and torch.equal(c.lengths, p.lengths) and torch.equal(c.answers, p.answers)
    capital = dict(load_task("country-capital").pairs)
    for k in range(len(p)):
        def labels(q, k=k):
            return [q.tokens[k][pos].tolist() for pos in q.demo_positions[k]]

        assert sorted(labels(c)) == sorted(labels(p)) and labels(c) != labels(p)
        q = p.demo_positions[k][-1][-1] + 1  # the query and what follows the last label are untouched
        assert torch.equal(c.tokens[k][q:], p.tokens[k][q:])
        demos = [b[3:].split("\nA: ") for b in c.texts[k].split("\n\n")[:-1]]
        assert sum(capital[x] != y for x, y in demos) >= 2


def test_errors():
    with pytest.raises(ValueError, match="Did you mean.*antonym"):
        load_task("antonyms")
    with pytest.raises(ValueError, match=r"'t'.*instruction 1.*'Give the opposite'.*frame 'antonym'"):
        FVTask("t", [("a", "b")], [Instruction("Find the antonym", ("antonym",)),
                                   Instruction("Give the opposite", ("antonym",))])
    from mechsteer.tiny import tiny_model

    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="style"):
        fv_prompts(model, "antonym", style="few_shot")
    with pytest.raises(ValueError, match="instructions 0..8"):
        fv_prompts(model, "antonym", instructions=[9])
    with pytest.raises(ValueError, match="no instruction"):
        fv_prompts(model, "antonym", style="zero_shot", instructions=[0])
    with pytest.raises(ValueError, match="Cannot corrupt"):
        corrupt(model, fv_prompts(model, "antonym", style="zero_shot", n=2))


class FixedStub:
    """A 'model' whose top-1 next token is always ``token``."""

    def __init__(self, token, vocab):
        self.cfg = SimpleNamespace(device="cpu")
        self.token, self.vocab = token, vocab

    def __call__(self, tokens, **kwargs):
        logits = torch.zeros(tokens.shape[0], 1, self.vocab)
        logits[:, :, self.token] = 1.0
        return logits


def test_filter_keeps_exactly_the_correct_items(tiny_gpt2):
    p = fv_prompts(tiny_gpt2, "capitalize_first_letter", n=40, instructions=[0, 3])
    target = int(p.answers[0])
    want = [k for k in range(len(p)) if int(p.answers[k]) == target]
    assert 2 <= len(want) < len(p)
    kept, info = filter_correct(FixedStub(target, len(tiny_gpt2.tokenizer)), p, batch_size=7, progress=False)
    assert kept.texts == [p.texts[k] for k in want] and torch.equal(kept.answers, p.answers[want])
    assert info["n"] == len(p) and info["kept"] == len(want) and info["accuracy"] == len(want) / len(p)
    assert info["kept_per_instruction"] == {0: sum(k < 40 for k in want), 3: sum(k >= 40 for k in want)}


def test_split_holds_out_whole_inputs(tiny_gpt2):
    p = fv_prompts(tiny_gpt2, "antonym", n=20, instructions=[0, 1, 2])
    train, test = split(p, 0.25, seed=1)
    assert len(train) + len(test) == len(p) and len(test) == 15
    assert not set(train.inputs) & set(test.inputs)
    assert split(p, 0.25, seed=1)[1].texts == test.texts
    with pytest.raises(ValueError, match="fraction"):
        split(p, 1.0)


def test_task_filter_and_selection():
    table = pd.DataFrame({
        "task": ["antonym"] * 3 + ["choose_first_of_3"] * 3 + ["color_v_animal_3"] * 3,
        "instruction": [0, 1, 2] * 3,
        "text": [""] * 9,
        "n": [50] * 6 + [100] * 3,
        "correct": [30, 20, 25, 20, 24, 23, 30, 22, 5],
    })
    table["accuracy"], table["top3"] = table["correct"] / table["n"], 0.9
    s = task_accuracy(None, table=table, min_correct=21, n_instructions=2).set_index("task")
    assert s.loc["antonym", "chance"] == pytest.approx(1 / 93) and s.loc["antonym", "above_chance"]
    assert s.loc["antonym", "instructions_ok"] == 2 and s.loc["antonym", "usable"]
    assert s.loc["antonym", "selected_accuracy"] == pytest.approx(55 / 100)
    assert s.loc["choose_first_of_3", "chance"] == pytest.approx(1 / 3)
    assert s.loc["choose_first_of_3", "above_chance"]  # 47/100 > 1/3 + 2 * 0.047
    assert not s.loc["color_v_animal_3", "above_chance"]  # 52/200 < 1/3, though two instructions have >= 21
    assert not s.loc["color_v_animal_3", "usable"]
    assert select_tasks(table, min_correct=21, n_instructions=2) == {"antonym": [0, 2], "choose_first_of_3": [1, 2]}
    assert select_tasks(table, min_correct=21, n_instructions=3) == {}


@pytest.mark.integration
def test_smollm2_frames_tokens_corruption_and_filter(smollm2):
    tok = smollm2.tokenizer
    for name in FV_TASKS:
        for style in ("instruction", "chat"):
            p = fv_prompts(smollm2, name, style=style, n=1)
            for k in range(len(p)):
                assert torch.equal(p.tokens[k], smollm2.to_tokens(p.texts[k])[0].cpu())
                got, want = frame_words(p, k, tok)
                assert got == want, (name, style, p.texts[k])
        icl = fv_prompts(smollm2, name, style="icl", n=1)
        assert torch.equal(icl.tokens[0], smollm2.to_tokens(icl.texts[0])[0].cpu())
    p = fv_prompts(smollm2, "country-capital", style="chat", n=8, instructions=[0])
    c = corrupt(smollm2, p)
    assert torch.equal(c.lengths, p.lengths) and all(t.startswith("<|im_start|>system") for t in c.texts)
    kept, info = filter_correct(smollm2, p, progress=False)
    assert info["kept"] >= 3  # measured: 4 of these 8 (62 of all 89 capitals with this instruction)
    top1 = [smollm2(t[None], logits_to_keep=1)[0, -1].argmax().item() for t in kept.tokens]
    assert top1 == kept.answers.tolist()


def test_items_and_demo_items_fix_queries_and_demonstrations(tiny_gpt2):
    train, held = [3, 5, 7, 9, 11, 13], [20, 21]
    p = fv_prompts(tiny_gpt2, "antonym", style="icl", n_shots=3, items=held, demo_items=train)
    assert p.pairs == held and all(len(d) == 3 and set(d) <= set(train) for d in p.demo_pairs)
    pairs = load_task("antonym").pairs
    assert p.inputs == [pairs[j][0] for j in held]
    assert p.subset([1]).pairs == [21] and p.subset([1]).demo_pairs == [p.demo_pairs[1]]
    with pytest.raises(ValueError, match="too few"):
        fv_prompts(tiny_gpt2, "antonym", style="icl", n_shots=3, items=held, demo_items=[3, 5])
    with pytest.raises(ValueError, match="items must be pair indices"):
        fv_prompts(tiny_gpt2, "antonym", style="icl", items=[10**6])


def test_zero_shot_prompts_match_their_extraction_format(tiny_gpt2, monkeypatch):
    """ZERO_SHOT_OF: ICL minus its demonstrations, instruction / chat minus the instruction."""
    from mechsteer.tasks.fv import ZERO_SHOT_OF

    icl = fv_prompts(tiny_gpt2, "antonym", style="icl", n=3, n_shots=2)
    style, shots = ZERO_SHOT_OF["icl"]
    zero = fv_prompts(tiny_gpt2, "antonym", style=style, n_shots=shots, n=3)
    assert [t.split("\n\n")[-1] for t in icl.texts] == zero.texts == [f"Q: {x}\nA:" for x in zero.inputs]
    ins = fv_prompts(tiny_gpt2, "antonym", n=3, instructions=[0])
    zs = fv_prompts(tiny_gpt2, "antonym", style=ZERO_SHOT_OF["instruction"][0], n=3)
    instruction = load_task("antonym").instructions[0].text
    assert [t[len(instruction):] for t in ins.texts] == zs.texts
    monkeypatch.setattr(tiny_gpt2.tokenizer, "chat_template", SMOL_TEMPLATE, raising=False)
    chat = fv_prompts(tiny_gpt2, "antonym", style="chat", n=3, instructions=[0])
    zc = fv_prompts(tiny_gpt2, "antonym", style=ZERO_SHOT_OF["chat"][0], n=3)
    assert [t.replace(instruction + "\n", "") for t in chat.texts] == zc.texts
