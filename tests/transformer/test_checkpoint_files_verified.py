"""A tokenizer copied into a checkpoint is checked against the manifest's checksum wherever it is used.

Generation and Hugging Face export read ``tokenizer.json`` from the checkpoint; one edited or damaged
after the save would silently change what the model's ids mean. A failure here names the use that
skipped the check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scaling.core.checkpoint import CheckpointError
from scaling.core.testing import run_distributed
from scaling.transformer.convert import save_huggingface
from scaling.transformer.convert.errors import ConversionError
from scaling.transformer.inference import inference_topology, load_model

from .test_inference import _save_with_tokenizer, _tokenizer_file


def _load_error(directory: str) -> str:
    try:
        load_model(directory, topology=inference_topology())
    except CheckpointError as exc:
        return str(exc)
    return "loaded"


@pytest.mark.timeout(120)
def test_edited_tokenizer_in_a_checkpoint_is_refused_by_generation_and_export(tmp_path: Path) -> None:
    save_dir = tmp_path / "ckpt"
    run_distributed(_save_with_tokenizer, 1, str(save_dir), str(_tokenizer_file(tmp_path / "tok.json")))
    assert run_distributed(_load_error, 1, str(save_dir), timeout_s=60)[0] == "loaded"
    copied = save_dir / "global_step4" / "tokenizer.json"
    copied.write_text(copied.read_text().replace('"w1"', '"w1x"'))  # still a valid tokenizer, other ids
    error = run_distributed(_load_error, 1, str(save_dir), timeout_s=60)[0]
    assert error == (
        f"checkpoint file {copied} does not match the checksum recorded when it was saved: "
        "it was modified or damaged afterwards"
    )
    with pytest.raises((CheckpointError, ConversionError), match=r"tokenizer\.json does not match the checksum"):
        save_huggingface(save_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
