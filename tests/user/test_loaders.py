"""``scaling.loaders``: the plain loop's finetuning batches, and the byte-level tokenizer they default to.

All in one process: data-parallel ranks are simulated with the ``data_parallel_rank=``/``data_parallel_size=``
overrides, which is exactly what the plain world would report on each rank. Where to look on a failure:
order and resumption -> ``LlamaLoader._order``/``state_dict``; masks, padding and packing -> ``_collate``;
what is learned -> ``scaling.transformer.data.records`` (shared with ``FinetuningDataset``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.loaders import LlamaLoader, format_alpaca
from scaling.transformer import plain_world
from scaling.transformer.data.datasets import FinetuningDataset
from scaling.transformer.data.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
RECORDS = [{"prompt": f"Q{i}: " + "x" * (i % 9), "completion": f" answer {i}" + "!" * (i % 4)} for i in range(40)]
ONE_RANK: dict[str, Any] = {"data_parallel_rank": 0, "data_parallel_size": 1}


def _loader(records: list[dict[str, Any]] = RECORDS, length: int = 32, batch: int = 4, **kwargs: Any) -> LlamaLoader:
    kwargs = {**ONE_RANK, **kwargs}
    return LlamaLoader(records, length, batch, **kwargs)


def _epoch(loader: LlamaLoader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def _rows(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    """Each row's learned targets: which sample it is, independent of padding."""
    return [tuple(b["targets"][r][b["loss_mask"][r] > 0].tolist()) for b in batches for r in range(len(b["tokens"]))]


def test_same_seed_gives_the_same_batches_and_each_epoch_a_new_order() -> None:
    first, again = _loader(seed=3), _loader(seed=3)
    epoch0, epoch1 = _epoch(first), _epoch(first)
    assert len(epoch0) == len(first) == 10 and first.epoch == 2
    assert _same(epoch0, _epoch(again)) and _same(epoch1, _epoch(again))  # deterministic per (seed, epoch)
    assert sorted(_rows(epoch0)) == sorted(_rows(epoch1))  # every sample once per epoch...
    assert _rows(epoch0) != _rows(epoch1)  # ...in another order
    assert _rows(_epoch(_loader(seed=4))) != _rows(epoch0)
    in_order = _epoch(_loader(shuffle=False))
    assert _rows(in_order) == _rows(_epoch(_loader(shuffle=False)))
    assert _rows(in_order)[0] == (*Tokenizer.byte_level().encode(RECORDS[0]["completion"]), 256)


def test_data_parallel_ranks_get_disjoint_shares_whose_union_is_the_global_batch() -> None:
    whole = _epoch(_loader(batch=8, seed=1))
    shares = [_epoch(_loader(batch=8, seed=1, data_parallel_rank=r, data_parallel_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole) == 5
    for step, batch in enumerate(whole):
        parts = [share[step] for share in shares]
        assert all(len(part["tokens"]) == 4 for part in parts)
        assert set(_rows([parts[0]])).isdisjoint(_rows([parts[1]]))
        for key in batch:  # padded to the global batch's longest row: the shares concatenate to it exactly
            assert torch.equal(torch.cat([part[key] for part in parts]), batch[key]), key


def test_a_batch_that_does_not_split_over_the_ranks_names_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"batch_size \(6\) is not divisible by the data-parallel size \(4\)"):
        _loader(batch=6, data_parallel_rank=0, data_parallel_size=4)


def test_without_overrides_the_ranks_come_from_the_launched_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plain_world, "_current", None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = LlamaLoader(RECORDS, 32, 8, seed=1)
    expected = _loader(batch=8, seed=1, data_parallel_rank=1, data_parallel_size=2)
    assert _same(_epoch(loader), _epoch(expected))


@pytest.mark.parametrize("packing", [False, True])
def test_resuming_mid_epoch_continues_exactly_as_the_uninterrupted_run(packing: bool) -> None:
    straight = _loader(packing=packing, batch=2)
    expected = _epoch(straight) + _epoch(straight)
    run = _loader(packing=packing, batch=2)
    taken = []
    for batch in run:
        taken.append(batch)
        if len(taken) == 3:
            state = json.loads(json.dumps(run.state_dict()))  # plain data: fits any checkpoint
            break
    assert state["epoch"] == 0 and state["batches_consumed"] == 3
    resumed = _loader(packing=packing, batch=2)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    assert _same(taken + rest, expected[: len(straight)])
    assert _same(_epoch(resumed), expected[len(straight) :])  # the next `for` is the next epoch
    # The loop that broke off carries on where it stopped, too.
    assert _same(_epoch(run), rest)


def test_a_state_taken_after_the_last_batch_resumes_at_the_next_epoch() -> None:
    run = _loader()
    for _ in run:
        state = run.state_dict()  # inside the loop, after the epoch's last batch
    assert state["epoch"] == 1 and state["batches_consumed"] == 0
    resumed = _loader()
    resumed.load_state_dict(state)
    assert _same(_epoch(resumed), _epoch(run))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"records": RECORDS[:-1]}, "dataset_length"),
        ({"records": [*RECORDS[:-1], {"prompt": "other", "completion": "data"}]}, "fingerprint"),
        ({"length": 16}, "fingerprint"),  # the same records cut elsewhere are other data
        ({"seed": 1}, "seed"),
        ({"batch": 8}, "batch_size"),
        ({"packing": True}, "packing"),
    ],
)
def test_a_state_made_for_other_data_or_settings_is_refused(change: dict[str, Any], field: str) -> None:
    run = _loader()
    next(iter(run))
    state = run.state_dict()
    other = _loader(**change)
    with pytest.raises(ValueError, match=rf"loader state: {field} is .+ in the state but .+ in this loader"):
        other.load_state_dict(state)
    assert other.epoch == 0 and _same(_epoch(other)[:1], _epoch(_loader(**change))[:1])  # nothing changed


def test_a_state_with_a_field_missing_or_out_of_range_is_refused() -> None:
    run = _loader()
    state = run.state_dict()
    with pytest.raises(ValueError, match=r"loader state: no field 'seed'"):
        run.load_state_dict({k: v for k, v in state.items() if k != "seed"})
    with pytest.raises(ValueError, match=r"batches_consumed must be in 0\.\.10, got 11"):
        run.load_state_dict({**state, "batches_consumed": 11})


def test_the_loss_covers_only_completions_and_the_end_of_text() -> None:
    tokenizer = Tokenizer.byte_level()
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    records: list[dict[str, Any]] = [*RECORDS[:3], chat]
    batch = next(iter(_loader(records, length=64, batch=4, shuffle=False)))
    for row, record in enumerate(records[:3]):
        prompt = len(tokenizer.encode(record["prompt"]))
        completion = tokenizer.encode(record["completion"])
        mask = batch["loss_mask"][row].tolist()
        assert mask[: prompt - 1] == [0.0] * (prompt - 1)  # positions predicting prompt tokens
        assert mask[prompt - 1 : prompt + len(completion)] == [1.0] * (len(completion) + 1)  # completion + EOS
        assert sum(mask) == len(completion) + 1  # nothing on the padding
        assert batch["targets"][row, prompt + len(completion) - 1] == tokenizer.eos_id
        n = prompt + len(completion)  # input tokens: the ids without the EOS
        assert batch["tokens"][row, 1:n].tolist() == batch["targets"][row, : n - 1].tolist()  # next-token targets
    learned = batch["targets"][3][batch["loss_mask"][3] > 0].tolist()
    assert tokenizer.decode(learned[:-1]) == "hello\n" and learned[-1] == tokenizer.eos_id  # assistant turn only


def test_samples_with_the_completion_cut_away_are_skipped_counted_and_never_batched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    long_prompt = [{"prompt": "p" * (20 + i), "completion": "c"} for i in range(5)]
    records = [*long_prompt, *RECORDS[:8], {"prompt": "q", "completion": ""}]
    with caplog.at_level(logging.WARNING, logger="scaling.loaders"):
        loader = _loader(records, length=16, batch=2)
    assert loader.skipped == 5  # an empty completion still learns its EOS: kept
    warnings = [r for r in caplog.records if r.name == "scaling.loaders"]
    assert len(warnings) == 1 and "skipped 5 of 14" in warnings[0].getMessage()
    assert len(loader) == 4
    for _ in range(2):
        assert all(batch["loss_mask"].sum(dim=1).min() > 0 for batch in loader)  # no row, so no batch, without loss
    with pytest.raises(ValueError, match=r"none of the 5 samples has a completion token within max_sequence_length=16"):
        _loader(long_prompt, length=16, batch=1)


def test_each_batch_is_padded_to_its_longest_row_rounded_up_and_capped() -> None:
    records = [{"prompt": "ab", "completion": "c"}, {"prompt": "abcdefghij", "completion": "k"}]
    short = next(iter(_loader(records[:1] * 2, length=32, batch=2)))
    assert short["tokens"].shape == (2, 8)  # 3 tokens, rounded up to 8
    mixed = next(iter(_loader(records, length=32, batch=2, pad_multiple=4)))
    assert mixed["tokens"].shape == (2, 12)  # the longest row (11 tokens) rounded up to 4
    assert mixed["tokens"][0, 3:].eq(257).all() and mixed["loss_mask"][0, 3:].sum() == 0
    assert mixed["positions"][0].tolist() == list(range(12))
    capped = next(iter(_loader(records, length=10, batch=2, pad_multiple=8)))
    assert capped["tokens"].shape == (2, 10)  # never wider than max_sequence_length


def test_the_loader_batches_are_those_of_the_finetuning_dataset(tmp_path: Path) -> None:
    """One definition of what is learned: the same records through ``scaling train``'s dataset collate alike."""
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "ok"}]}
    records: list[dict[str, Any]] = [*RECORDS[:5], chat]
    path = tmp_path / "ft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = FinetuningDataset(path, Tokenizer.byte_level(), 40)
    expected = dataset.collate([dataset[i] for i in range(len(records))])
    batch = next(iter(_loader(records, length=40, batch=len(records), shuffle=False)))
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[k], expected[k]) for k in batch)


def test_packing_fills_rows_with_whole_samples_and_restarts_positions() -> None:
    tokenizer = Tokenizer.byte_level()
    samples = [tokenizer.encode(r["prompt"]) + tokenizer.encode(r["completion"]) + [256] for r in RECORDS]
    loader = _loader(length=64, batch=2, packing=True, shuffle=False)
    batches = _epoch(loader)
    assert len(batches) == len(loader)
    packed = []
    for batch in batches:
        assert batch["tokens"].shape == batch["document_ids"].shape == (2, 64)
        for row in range(2):
            ids, positions = batch["document_ids"][row], batch["positions"][row]
            starts = [0, *[i for i in range(1, 64) if ids[i] != ids[i - 1]]]
            assert ids[starts].tolist() == list(range(len(starts)))  # one distinct id per sample (and padding)
            assert positions.tolist() == [i - max(s for s in starts if s <= i) for i in range(64)]  # restart at 0
            for begin, end in zip(starts, [*starts[1:], 64], strict=True):
                tokens, targets = batch["tokens"][row, begin:end].tolist(), batch["targets"][row, begin:end].tolist()
                if batch["loss_mask"][row, begin:end].sum() == 0:  # the padding after the last sample
                    assert end == 64 and set(tokens) == {tokenizer.pad_id}
                else:
                    packed.append((tokens, targets))
    assert len(packed) >= 2 * 2 * len(batches)  # at least two samples a row on average
    # Next fit in dataset order: the rows hold samples 0, 1, 2... whole, none predicting across a boundary.
    assert packed == [(ids[:-1], ids[1:]) for ids in samples[: len(packed)]]


def test_max_words_is_another_name_for_max_sequence_length() -> None:
    by_alias = LlamaLoader(RECORDS, max_words=16, batch_size=4, **ONE_RANK)
    assert by_alias.max_sequence_length == 16
    assert _same(_epoch(by_alias), _epoch(_loader(length=16)))
    with pytest.raises(TypeError, match=r"max_sequence_length \(16\) or its other name max_words \(16\), not both"):
        LlamaLoader(RECORDS, 16, 4, max_words=16, **ONE_RANK)
    with pytest.raises(TypeError, match=r"needs max_sequence_length= \(or max_words=\)"):
        LlamaLoader(RECORDS, batch_size=4, **ONE_RANK)


def test_bad_records_and_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"dataset\[1\]: no field 'completion'"):
        _loader([RECORDS[0], {"prompt": "only"}])
    with pytest.raises(ValueError, match=r"dataset\[0\]: an Alpaca record .*map format_alpaca"):
        _loader([{"instruction": "x", "input": "", "output": "y"}])
    with pytest.raises(ValueError, match=r"batch_size \(64\) is larger than the 40 usable samples"):
        _loader(batch=64)
    with pytest.raises(TypeError, match=r"tokenizer: expected .* got int"):
        _loader(tokenizer=3)


def test_drop_last_false_fills_the_last_batch_from_the_start_of_the_order() -> None:
    loader = _loader(RECORDS[:10], batch=4, drop_last=False)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 3 and all(len(b["tokens"]) == 4 for b in batches)
    rows = _rows(batches)
    assert set(rows) == set(_rows(_epoch(_loader(RECORDS[:10], batch=10)))) and rows[10:] == rows[:2]


def test_a_tokenizer_json_path_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    Tokenizer.byte_level().tokenizer.save(str(path))
    assert _same(_epoch(_loader(tokenizer=path)), _epoch(_loader()))


def test_format_alpaca_uses_the_with_input_template_only_for_a_non_empty_input() -> None:
    with_input = format_alpaca({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    assert with_input["completion"] == "5"
    assert with_input["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    without = format_alpaca({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert without == {
        "prompt": "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n",
        "completion": "hi",
    }
    assert format_alpaca({"instruction": "Say hi.", "output": "hi"}) == without  # no input field at all
    assert format_alpaca({"instruction": "Say hi.", "input": "  ", "output": "hi"}) == without
    with pytest.raises(ValueError, match=r"format_alpaca: the record has no field 'output' \(fields here: instr"):
        format_alpaca({"instruction": "x"})


def test_the_byte_level_tokenizer_round_trips_any_text_with_byte_ids() -> None:
    tokenizer = Tokenizer.byte_level()
    text = "Grüße, 世界! 🙂\n\ttabs  and\x00nul"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (256, 257, 258)
    assert tokenizer.fingerprint == Tokenizer.byte_level().fingerprint  # built the same way every time
    assert tokenizer.decode([104, 105, 256], skip_special_tokens=True) == "hi"


def test_importing_and_building_a_loader_touches_no_network() -> None:
    """With sockets and name resolution refusing, import and construction still work, and no hub client loads."""
    script = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access")
class NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access")
socket.socket = NoSocket
socket.create_connection = socket.getaddrinfo = refuse
import scaling.loaders
loader = scaling.loaders.LlamaLoader(
    [{"prompt": "a", "completion": "b"}] * 4, 8, 2, data_parallel_rank=0, data_parallel_size=1
)
next(iter(loader))
loaded = [m for m in ("huggingface_hub", "requests", "urllib3", "transformers") if m in sys.modules]
assert not loaded, loaded
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_bundled_alpaca_data_is_what_make_data_writes(tmp_path: Path) -> None:
    bundled = REPO / "examples" / "alpaca_example" / "data" / "instructions.json"
    fresh = tmp_path / "instructions.json"
    script = REPO / "examples" / "alpaca_example" / "make_data.py"
    subprocess.run([sys.executable, str(script), "--output", str(fresh)], check=True, capture_output=True, timeout=60)
    assert fresh.read_bytes() == bundled.read_bytes()
    records = json.loads(bundled.read_text())
    assert 300 <= len(records) <= 500 and all(r.keys() == {"instruction", "input", "output"} for r in records)
    assert 0.25 < sum(1 for r in records if r["input"]) / len(records) < 0.45
    assert max(len(r["output"].split()) for r in records) <= 4
    loader = _loader([format_alpaca(r) for r in records], length=288, batch=8)  # byte-level: up to 268 tokens
    assert loader.skipped == 0 and len(loader) == len(records) // 8
