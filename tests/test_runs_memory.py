"""The run layer's memory budgets: ``max_memory=`` strings, defaults from free memory, rows per chunk."""

from __future__ import annotations

import pytest
import torch

from mechsteer import runs


@pytest.mark.parametrize("text, expected", [
    ("2GB", 2 * 10**9), ("2 GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5G", int(1.5 * 2**30)),
    ("64kb", 64_000), ("4096", 4096), (4096, 4096), (1e9, 10**9), ("1TiB", 2**40), ("3B", 3),
])
def test_parse_bytes(text, expected):
    assert runs.parse_bytes(text) == expected


@pytest.mark.parametrize("bad, error", [
    ("2 gigs", ValueError), ("", ValueError), ("-1GB", ValueError), (0, ValueError), ("nanGB", ValueError),
    ("infGB", ValueError), (True, TypeError), ([1], TypeError),
])
def test_bad_budget_names_the_argument(bad, error):
    with pytest.raises(error, match="max_memory"):  # (under the test type-checker, a list fails its annotation first)
        runs.parse_bytes(bad)


def test_default_budget_is_a_share_of_free_memory(monkeypatch):
    monkeypatch.setattr(runs, "free_memory", lambda device: 400 * 2**20)
    assert runs.memory_budget("cpu") == 100 * 2**20  # a quarter, below the CPU cap
    monkeypatch.setattr(runs, "free_memory", lambda device: 64 * 2**30)
    assert runs.memory_budget("cpu") == runs.CPU_BUDGET_BYTES  # capped on CPU
    assert runs.memory_budget("cuda") == 16 * 2**30  # a quarter of the free GPU memory, not capped
    assert runs.memory_budget("cuda", "1GB") == 10**9


def test_cuda_free_memory_comes_from_mem_get_info(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    assert runs.free_memory("cuda:0") == 8 * 2**30
    assert runs.free_memory("cpu") > 0


def test_batch_rows_follow_the_budget(tiny_gpt2):
    per_row = runs.row_bytes(tiny_gpt2, 12, 1)
    assert per_row > 0
    assert runs.batch_rows(tiny_gpt2, 12, 4, 1, None, max_memory=per_row * 10) == 8  # 10 rows fit: 2 x 4 prompts
    assert runs.batch_rows(tiny_gpt2, 12, 4, 1, None, max_memory=1) == 4  # never below one set of prompts
    assert runs.batch_rows(tiny_gpt2, 12, 4, 1, 9, max_memory="1B") == 8  # batch_size wins
    big = runs.batch_rows(tiny_gpt2, 12, 4, 1, None, max_memory="1GiB")
    assert big % 4 == 0 and big > runs.batch_rows(tiny_gpt2, 12, 4, 1, None, max_memory="1MiB")
    with pytest.raises(ValueError, match="max_memory must be"):
        runs.batch_rows(tiny_gpt2, 12, 4, 1, None, max_memory="lots")


def test_rows_cost_half_in_bfloat16(tiny_gpt2):
    from mechsteer.tiny import tiny_model

    half = tiny_model("gpt2").to(torch.bfloat16)
    logits = 4 * tiny_gpt2.cfg.d_vocab
    assert runs.row_bytes(half, 12, 1) - logits == (runs.row_bytes(tiny_gpt2, 12, 1) - logits) // 2
