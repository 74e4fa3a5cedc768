"""`scaling config template` with no --class prints a config `scaling train` accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaling.cli.main import main
from scaling.transformer.config import TransformerConfig


def test_default_template_is_a_transformer_config_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "template"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# TransformerConfig: every field with its default.")
    # The required data section carries a placeholder to edit; no override is needed for the file to load.
    assert "prefixes: [data/my_corpus]  # EDIT" in text
    path = tmp_path / "run.yml"
    path.write_text(text)
    config = TransformerConfig.from_yaml(path)
    assert config.data.prefixes == [Path("data/my_corpus")]
    # Everything else is the default: the template is the reference of every field.
    assert config.model_dump(exclude={"data"}) == TransformerConfig(data={"prefixes": ["x"]}).model_dump(
        exclude={"data"}
    )
    # Editing data.prefixes (here by an override) is the path to a real run.
    edited = TransformerConfig.from_yaml(path, [f"data.prefixes=[{tmp_path / 'corpus'}]"])
    assert edited.data.prefixes == [tmp_path / "corpus"]
