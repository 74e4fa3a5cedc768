"""The generated workflows of a project whose runs go through Slurm: they submit with ``scaling queue``."""

from __future__ import annotations

from pathlib import Path

import yaml

from scaling.experiment.loading import load
from scaling.experiment.workflows import render_workflows


def _steps(files: dict[str, str], name: str) -> list[dict]:
    workflow = yaml.safe_load(files[name])
    return next(iter(workflow["jobs"].values()))["steps"]


def test_queued_project_workflows_submit_and_cancel_through_the_queue(project: Path) -> None:
    loaded = load(project)
    queued = loaded.config.model_copy(update={"scheduler": "slurm", "hosts": ["node1", "node2"]})
    files = render_workflows(queued, loaded.experiments, loaded.root)
    steps = _steps(files, "run_mark.yml")
    scripts = [step.get("run", "") for step in steps]
    submit = next(script for script in scripts if "scaling queue submit" in script)
    assert 'scaling queue submit "$EXPERIMENT" --run-name "$RUN_NAME"' in submit
    assert '--param "seconds=$PARAM_SECONDS"' in submit and "${{" not in submit
    assert not any("scaling run " in script for script in scripts)
    assert any(script.startswith('scaling queue status "$RUN_NAME"') for script in scripts)
    assert not any("ssh" in str(step).lower() for step in steps)  # Slurm reaches the nodes, not the runner
    assert not any("ssh" in str(step).lower() for step in _steps(files, "cancel.yml"))

    plain = render_workflows(loaded.config, loaded.experiments, loaded.root)
    assert any('scaling run "$EXPERIMENT"' in step.get("run", "") for step in _steps(plain, "run_mark.yml"))
    remote = render_workflows(
        loaded.config.model_copy(update={"hosts": ["node1", "node2"]}), loaded.experiments, project
    )
    assert any("ssh" in str(step).lower() for step in _steps(remote, "run_mark.yml"))  # what the queue leaves out
