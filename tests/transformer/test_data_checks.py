"""Bad data through `scaling train`: one line naming the file, exit code 2, checked before any rank starts.

Also: token ids beyond the model's vocabulary and a tokenizer that differs from the one the data (or the
checkpoint being resumed) was made with are config errors naming both sides.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaling.core.config import ConfigError
from scaling.core.data import MemoryMapWriter
from scaling.transformer.config import TransformerConfig
from scaling.transformer.data.prepare import prepare_data
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.data.train_tokenizer import train_bpe_tokenizer
from scaling.transformer.train import _datasets

REPO = Path(__file__).resolve().parents[2]
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n" * 40


def _tokenizer(directory: Path, name: str = "tokenizer.json", text: str = TEXT) -> Path:
    corpus = directory / f"{name}.txt"
    corpus.write_text(text, encoding="utf-8")
    train_bpe_tokenizer([corpus], 300, directory / name)
    return directory / name


def _counting_data(prefix: Path, vocab: int = 64, top: int = 64, record_vocab: bool = True) -> Path:
    with MemoryMapWriter(prefix, vocab_size=vocab) as writer:
        for start in range(40):
            writer.add([(start + i) % top for i in range(40)])
    if not record_vocab:  # a file from before the vocabulary was recorded
        meta_path = Path(f"{prefix}.json")
        meta = json.loads(meta_path.read_text())
        del meta["vocab_size"]
        meta_path.write_text(json.dumps(meta))
    return prefix


def _config(tmp_path: Path, data: dict[str, Any], **topology: Any) -> dict[str, Any]:
    return {
        "topology": {"micro_batch_size": 2, "gradient_accumulation_steps": 1, **topology},
        "architecture": {"vocab_size": 64, "vocab_multiple": 64, "hidden_size": 16, "num_layers": 2,
                         "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": 16},
        "trainer": {"train_iterations": 2, "log_interval": 1, "save_dir": str(tmp_path / "ckpt")},
        "optimizer": {"training_groups": [{"learning_rate_schedule": {"learning_rate": 0.01,
                                                                       "learning_rate_decay_style": "constant"}}]},
        "data": {"validation_fraction": 0.1, **data},
        "logger": {"log_dir": str(tmp_path / "logs")},
    }  # fmt: skip


def _scaling_train(tmp_path: Path, config: dict[str, Any], *overrides: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    scaling = Path(sys.executable).with_name("scaling")
    argv = [str(scaling), "train", str(path), *[a for o in overrides for a in ("-o", o)]]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _missing_prefix(tmp: Path) -> tuple[dict[str, Any], str]:
    return {"prefixes": [str(tmp / "nowhere")]}, f"{tmp / 'nowhere'}.json does not exist"


def _truncated_bin(tmp: Path) -> tuple[dict[str, Any], str]:
    prefix = _counting_data(tmp / "c")
    binary = Path(f"{prefix}.bin")
    binary.write_bytes(binary.read_bytes()[:-10])
    return {"prefixes": [str(prefix)]}, f"{binary} holds"


def _corrupted_idx(tmp: Path) -> tuple[dict[str, Any], str]:
    prefix = _counting_data(tmp / "c")
    index = Path(f"{prefix}.idx")
    index.write_bytes(bytes(reversed(index.read_bytes())))  # same size, garbage offsets
    return {"prefixes": [str(prefix)]}, f"{index}: document offsets are not a valid index"


def _batch_larger_than_data(tmp: Path) -> tuple[dict[str, Any], str]:
    return {"prefixes": [str(_counting_data(tmp / "c"))]}, f"data: {tmp / 'c'} gives 99 samples"


def _jsonl(tmp: Path, lines: list[str]) -> dict[str, Any]:
    path = tmp / "ft.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines))
    return {"finetuning_jsonl": str(path), "tokenizer": str(_tokenizer(tmp))}


def _empty_jsonl(tmp: Path) -> tuple[dict[str, Any], str]:
    return _jsonl(tmp, ["", "  "]), f"finetuning data {tmp / 'ft.jsonl'} holds no samples"


def _jsonl_not_json(tmp: Path) -> tuple[dict[str, Any], str]:
    good = json.dumps({"prompt": "a", "completion": "b"})
    return _jsonl(tmp, [good, "{'prompt': 'single quotes'}"]), f"{tmp / 'ft.jsonl'}:2: not valid JSON"


def _jsonl_missing_completion(tmp: Path) -> tuple[dict[str, Any], str]:
    good = json.dumps({"prompt": "a", "completion": "b"})
    lines = [good, good, json.dumps({"prompt": "only a prompt"})]
    return _jsonl(tmp, lines), f"{tmp / 'ft.jsonl'}:3: no field 'completion'"


def _jsonl_message_without_content(tmp: Path) -> tuple[dict[str, Any], str]:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    return _jsonl(tmp, [json.dumps(chat)]), f"{tmp / 'ft.jsonl'}:1: message 1 has no field 'content'"


def _missing_tokenizer(tmp: Path) -> tuple[dict[str, Any], str]:
    data = _jsonl(tmp, [json.dumps({"prompt": "a", "completion": "b"})])
    return {**data, "tokenizer": str(tmp / "none.json")}, f"tokenizer file {tmp / 'none.json'} does not exist"


CASES: dict[str, Callable[[Path], tuple[dict[str, Any], str]]] = {
    "missing_data_file": _missing_prefix,
    "truncated_bin": _truncated_bin,
    "corrupted_idx": _corrupted_idx,
    "batch_larger_than_data": _batch_larger_than_data,
    "empty_jsonl": _empty_jsonl,
    "jsonl_line_not_json": _jsonl_not_json,
    "jsonl_record_missing_field": _jsonl_missing_completion,
    "jsonl_message_missing_field": _jsonl_message_without_content,
    "missing_tokenizer": _missing_tokenizer,
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_gives_one_line_naming_the_file_and_exit_code_2(tmp_path: Path, case: str) -> None:
    data, expected = CASES[case](tmp_path)
    config = _config(tmp_path, data)
    if case == "batch_larger_than_data":
        config["topology"]["micro_batch_size"] = 64
    config["architecture"]["vocab_size"] = 320 if "finetuning_jsonl" in data else 64
    line = _one_line(_scaling_train(tmp_path, config))
    assert expected in line, line
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())  # nothing trained


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_data_ids_beyond_the_model_vocabulary_are_a_config_error(tmp_path: Path, tensor_parallel: int) -> None:
    # tp=1 used to crash with a bare IndexError, tp=2 to train silently on a wrong loss.
    prefix = _counting_data(tmp_path / "c", vocab=100, top=100)
    config = _config(tmp_path, {"prefixes": [str(prefix)]}, model_parallel_size=tensor_parallel)
    line = _one_line(_scaling_train(tmp_path, config))
    assert "architecture.vocab_size (64) is smaller than the vocabulary of the data (100" in line, line
    assert f"{prefix}.json" in line


def _opened(tmp_path: Path, data: dict[str, Any], **architecture: Any) -> None:
    config = _config(tmp_path, data)
    config["architecture"].update(architecture)
    _datasets(TransformerConfig.from_dict(config))


def test_data_without_a_recorded_vocabulary_is_checked_by_its_largest_token(tmp_path: Path) -> None:
    prefix = _counting_data(tmp_path / "c", vocab=100, top=100, record_vocab=False)
    expected = rf"vocab_size \(64\) is too small for the data: {prefix}\.bin holds token id 78"
    with pytest.raises(ConfigError, match=expected):
        _opened(tmp_path, {"prefixes": [str(prefix)]})
    _opened(tmp_path, {"prefixes": [str(prefix)]}, vocab_size=100)  # fits


def test_finetuning_tokenizer_larger_than_the_model_vocabulary_is_a_config_error(tmp_path: Path) -> None:
    data = _jsonl(tmp_path, [json.dumps({"prompt": "a", "completion": "b"})] * 40)
    size = Tokenizer.from_file(data["tokenizer"]).vocab_size
    expected = rf"vocab_size \(64\) is smaller than the vocabulary of data.tokenizer .*\({size}\)"
    with pytest.raises(ConfigError, match=expected):
        _opened(tmp_path, data)
    _opened(tmp_path, data, vocab_size=size)


def test_data_prepared_with_another_tokenizer_is_a_config_error_naming_both(tmp_path: Path) -> None:
    x = _tokenizer(tmp_path, "x.json")
    y = _tokenizer(tmp_path, "y.json", text="completely different words, other merges entirely " * 60)
    corpus = tmp_path / "doc.txt"
    corpus.write_text(TEXT * 3)
    prepare_data([corpus], Tokenizer.from_file(x), tmp_path / "data")
    arch = {"vocab_size": 300, "sequence_length": 8}
    _opened(tmp_path, {"prefixes": [str(tmp_path / "data")], "tokenizer": str(x)}, **arch)  # the same: fine
    with pytest.raises(ConfigError) as error:
        _opened(tmp_path, {"prefixes": [str(tmp_path / "data")], "tokenizer": str(y)}, **arch)
    message = str(error.value)
    assert f"{tmp_path / 'data'}.json was prepared with the tokenizer {x}" in message and str(y) in message
    copy = tmp_path / "copy.json"  # the same tokenizer in another file (and formatting) is the same tokenizer
    copy.write_text(json.dumps(json.loads(x.read_text())))
    _opened(tmp_path, {"prefixes": [str(tmp_path / "data")], "tokenizer": str(copy)}, **arch)


@pytest.mark.timeout(150)
def test_resuming_with_another_tokenizer_than_the_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    x = _tokenizer(tmp_path, "x.json")
    y = _tokenizer(tmp_path, "y.json", text="completely different words, other merges entirely " * 60)
    prefix = _counting_data(tmp_path / "c")
    config = _config(tmp_path, {"prefixes": [str(prefix)], "tokenizer": str(x)})
    config["architecture"]["vocab_size"] = 320
    first = _scaling_train(tmp_path, config)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint_tokenizer = tmp_path / "ckpt" / "global_step2" / "tokenizer.json"
    assert checkpoint_tokenizer.is_file()
    line = _one_line(
        _scaling_train(
            tmp_path, config, f"data.tokenizer={y}", f"trainer.load_dir={tmp_path / 'ckpt'}",
            "trainer.train_iterations=4",
        )
    )  # fmt: skip
    assert f"data.tokenizer {y} differs from the tokenizer {checkpoint_tokenizer}" in line, line
    assert not (tmp_path / "ckpt" / "global_step4").exists()
