"""The README stays inside the repository and its commands stay true."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_points_nowhere_outside_the_repository() -> None:
    assert not re.findall(r"https?://|www\.", README)
    assert "../" not in README  # no paths above the repository root
    for target in re.findall(r"\]\(([^)]+)\)", README):  # markdown links lead to files of this repository
        assert (REPO / target.split("#")[0]).exists(), target


def test_readme_commands_match_the_cli() -> None:
    # `scaling config template` with no --class prints a `scaling train` config (see tests/cli/test_config_template.py)
    assert "scaling config template > run.yml" in README and "scaling train run.yml" in README
    assert "runner.log_dir" not in README and "logger.log_dir" in README
    assert "python -m examples.transformer_example.run\nexamples/transformer_example/config.yml" in README


def test_readme_plain_transformer_example_trains_a_step() -> None:
    """The README's plain-module example runs as printed (one process, no process group)."""
    import torch

    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    (example,) = [b for b in blocks if "Transformer(" in b and "optimizer.step()" in b]
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)


def test_readme_plain_loop_example_runs_as_printed() -> None:
    """The plain-loop block trains as printed, in this process (a world of one)."""
    import torch

    from scaling.transformer import plain_world

    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    (example,) = [b for b in blocks if "from scaling.llama import" in b and "LlamaLoader(" in b]
    plain_world.reset_plain_world()
    namespace: dict[str, object] = {}
    try:
        exec(compile(example, "README.md", "exec"), namespace)
    finally:
        plain_world.reset_plain_world()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
