"""Tokenizer wrapper and `scaling prepare-data`: text -> tokens -> text, JSONL fields, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from scaling.cli.main import main as scaling_main
from scaling.core.data import MemoryMapDataset
from scaling.transformer.data.tokenizer import Tokenizer, TokenizerError

TEXTS = ["def add(a, b):\n    return a + b\n", "Ünïcode and spaces   kept.\n", "x = [1, 2, 3]  # a list\n"]


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_prepare_data_round_trip_text_and_jsonl(
    tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text_files = []
    for i, text in enumerate(TEXTS[:2]):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        text_files.append(path)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"body": TEXTS[2]}) + "\n\n", encoding="utf-8")
    output = tmp_path / "corpus"
    argv = [
        "prepare-data",
        *map(str, text_files),
        str(jsonl),
        "--tokenizer",
        str(tokenizer_file),
        "--output",
        str(output),
        "--field",
        "body",
    ]
    assert scaling_main(argv) == 0
    assert "3 documents" in capsys.readouterr().out
    tokenizer = Tokenizer.from_file(tokenizer_file)
    data = MemoryMapDataset(output)
    assert len(data) == 3
    for index, text in enumerate(TEXTS):
        ids = data[index].tolist()
        assert ids[-1] == tokenizer.eos_id  # one EOS per document
        assert tokenizer.decode(ids[:-1]) == text


def test_prepare_data_errors_name_file_and_line(
    tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "no text"}) + "\n", encoding="utf-8")
    code = scaling_main(
        ["prepare-data", str(jsonl), "--tokenizer", str(tokenizer_file), "--output", str(tmp_path / "o")]
    )
    assert code == 2
    assert f"{jsonl}:2: no field 'text' in this line" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()  # nothing half-written under the final names
    code = scaling_main(
        ["prepare-data", str(jsonl), "--tokenizer", str(tmp_path / "none.json"), "--output", str(tmp_path / "o")]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match=r"not a valid tokenizer\.json"):
        (tmp_path / "broken.json").write_text("{}")
        Tokenizer.from_file(tmp_path / "broken.json")
