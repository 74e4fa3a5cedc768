"""`scaling train-tokenizer` and `scaling prepare-data`: a tokenizer of one's own, and data never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaling.cli.main import main as scaling_main
from scaling.core.data import MemoryMapDataset
from scaling.transformer.data.tokenizer import Tokenizer

CORPUS = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
    "Ünïcode, tabs\tand    spaces survive a byte-level round trip.\n"
) * 30


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def test_train_tokenizer_round_trips_respects_the_vocab_size_and_feeds_prepare_data(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "tok" / "tokenizer.json"
    assert scaling_main(["train-tokenizer", str(corpus), "--vocab-size", "300", "--output", str(output)]) == 0
    assert str(output) in capsys.readouterr().out
    tokenizer = Tokenizer.from_file(output)
    assert tokenizer.vocab_size == 300
    assert tokenizer.eos_id is not None and tokenizer.pad_id is not None
    text = "def mul(a, b):\n    return a * b  # ünseen ⚙ text\n"
    ids = tokenizer.encode(text)
    assert max(ids) < 300 and tokenizer.decode(ids) == text  # byte-level: any text round-trips
    assert len(tokenizer.encode("def add(a, b):")) < len("def add(a, b):")  # merges were learned

    prefix = tmp_path / "data"
    assert scaling_main(["prepare-data", str(corpus), "--tokenizer", str(output), "--output", str(prefix)]) == 0
    data = MemoryMapDataset(prefix)
    assert data.vocab_size == 300
    assert tokenizer.decode(data[0].tolist()[:-1]) == CORPUS
    assert data.meta["tokenizer"] == {"path": str(output.resolve()), "sha256": tokenizer.fingerprint, "vocab_size": 300}


def test_train_tokenizer_refuses_to_overwrite_and_too_small_vocab(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "tokenizer.json"
    output.write_text("precious")
    argv = ["train-tokenizer", str(corpus), "--vocab-size", "300", "--output", str(output)]
    assert scaling_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{output} already exists" in err[0] and "--overwrite" in err[0]
    assert output.read_text() == "precious"
    assert scaling_main([*argv, "--overwrite"]) == 0
    assert Tokenizer.from_file(output).vocab_size == 300
    small = ["train-tokenizer", str(corpus), "--vocab-size", "100", "--output", str(tmp_path / "small.json")]
    assert scaling_main(small) == 2
    assert "--vocab-size 100 is too small" in capsys.readouterr().err
    missing = ["train-tokenizer", str(tmp_path / "none.txt"), "--vocab-size", "300", "--output", str(tmp_path / "m")]
    assert scaling_main(missing) == 2
    assert f"input {tmp_path / 'none.txt'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".bin", ".idx", ".json"])
def test_prepare_data_never_overwrites_an_existing_dataset(
    tmp_path: Path, corpus: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = tmp_path / "tokenizer.json"
    assert scaling_main(["train-tokenizer", str(corpus), "--vocab-size", "300", "--output", str(tokenizer)]) == 0
    prefix = tmp_path / "data"
    existing = Path(f"{prefix}{suffix}")
    existing.write_bytes(b"someone's dataset")
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "new"}) + "\n")
    argv = ["prepare-data", str(other), "--tokenizer", str(tokenizer), "--output", str(prefix)]
    capsys.readouterr()
    assert scaling_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{existing} already exists" in err[0] and "--overwrite" in err[0]
    assert existing.read_bytes() == b"someone's dataset"  # nothing touched
    assert sorted(p.name for p in tmp_path.glob("data*")) == [existing.name]
    assert scaling_main([*argv, "--overwrite"]) == 0
    assert len(MemoryMapDataset(prefix)) == 1


def test_readme_says_how_to_get_a_tokenizer_and_its_finetuning_examples_load(tmp_path: Path, corpus: Path) -> None:
    import re

    from scaling.transformer.data.datasets import FinetuningDataset

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "scaling train-tokenizer" in readme and "--vocab-size" in readme and "tokenizer.json" in readme
    blocks = re.findall(r"```json\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) >= 2
    tokenizer = tmp_path / "tokenizer.json"
    assert scaling_main(["train-tokenizer", str(corpus), "--vocab-size", "300", "--output", str(tokenizer)]) == 0
    for block, kind in zip(blocks[:2], ("prompt", "messages"), strict=True):
        lines = block.strip().splitlines()
        assert len(lines) == 2 and all(kind in json.loads(line) for line in lines)
        path = tmp_path / f"{kind}.jsonl"
        path.write_text(block)
        data = FinetuningDataset(path, Tokenizer.from_file(tokenizer), sequence_length=64)
        assert len(data) == 2 and all(data[i]["loss_mask"].sum() > 0 for i in range(2))
