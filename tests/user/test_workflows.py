"""``scaling build-experiments``: the generated GitHub workflows are valid, mirror the ``@param``\\ s, pass form
inputs to ``scaling run`` as data, and re-running changes nothing and removes only generated files.

Where a failure points (all in ``scaling/experiment/workflows.py``):

* ``test_workflows_pass_actionlint``: the workflow structure (``_workflow``, ``_run_workflow``...) or a
  ``run:`` script that shellcheck flags (an unquoted variable is the usual one);
* ``test_inputs_round_trip``: ``_input`` / ``_text`` (the kind, default or options of an input), or the YAML
  quoting in ``_represent_str`` (an option such as ``1e-05`` read back as a number);
* the ``test_run_steps_*`` tests execute the ``run:`` scripts with bash as a runner would, with a fake
  ``scaling`` first on PATH that records its argv: a difference means an input was substituted into a
  script, or expanded unquoted, instead of arriving through ``env:``;
* ``test_rebuild_*``: ``sync_workflows`` (the marker, the comparison, the deletion of stale files only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaling.cli.main import main as scaling_main
from scaling.experiment.params import parse_value
from scaling.experiment.registry import load_project
from scaling.experiment.workflows import MARKER, WorkflowError, build_workflows

EXPERIMENTS = """\
from scaling.experiment import experiment, param

@experiment("alpaca", seed=7)
@param("size", options=["70b", "13b", "7b"], default="7b", description="model size")
@param("lr", default=1e-5, description="peak learning rate")
@param("use_lora", default=False)
@param("steps", default=0)
@param("note", default="")
@param("shift", default=-1.5)
@param("micro", options=[1, 2, 4], default=2)
@param("decay", options=[1e-5, 0.1], default=1e-5)
@param("flag", default=True, description='a "quoted" text: with # and colons')
def train(params):
    return dict(params)

@experiment("probe")
@param("depth", default=3)
def probe(params):
    return params.depth
"""

# A form input set full of shell syntax: each value must reach `scaling run` exactly as typed.
HOSTILE_NOTE = 'it\'s "quoted"; $HOME `whoami` $(id) \\ back\\slash  two  spaces * ?; exit 7 \n next line'
FAKE_INPUTS = {
    "run_name": "my-run.1",
    "size": "13b",
    "lr": "1e-4",
    "use_lora": "true",
    "steps": "3",
    "note": HOSTILE_NOTE,
    "shift": "-2",
    "micro": "4",
    "decay": "0.1",
    "flag": "false",
}
SECRETS = {"HF_TOKEN": "hf-secret", "WANDB_API_KEY": "", "MY_TOKEN": "tok'en$HOME"}


def _write_project(root: Path, experiments: str = EXPERIMENTS, extra_yml: str = "") -> Path:
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "scaling.yml").write_text(f"name: demo\nenv: [MY_TOKEN]\n{extra_yml}", encoding="utf-8")
    (root / "src" / "experiments.py").write_text(experiments, encoding="utf-8")
    return root


def _workflows(root: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted((root / ".github" / "workflows").iterdir())}


def _load(text: str) -> dict[Any, Any]:
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    if True in document:  # PyYAML reads the key `on` as YAML 1.1's boolean
        document["on"] = document.pop(True)
    return document


def _tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    path = str(found) if found.is_file() else shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: `pip install -e .[test]` installs it")
    return path


def _actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    command = [_tool("actionlint"), "-no-color", "-shellcheck", _tool("shellcheck"), *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_workflows_pass_actionlint(tmp_path: Path) -> None:
    local = _write_project(tmp_path / "local")
    remote = _write_project(tmp_path / "remote", extra_yml="hosts: [node1, node2]\nuser: ml\nruntime: docker\n")
    build_workflows(local)
    build_workflows(remote)
    files = sorted((local / ".github" / "workflows").glob("*.yml")) + sorted(
        (remote / ".github" / "workflows").glob("*.yml")
    )
    assert [f.name for f in files] == ["cancel.yml", "deploy.yml", "run_alpaca.yml", "run_probe.yml"] * 2
    result = _actionlint(*files)
    assert result.returncode == 0, result.stdout + result.stderr

    # The check is live: the same workflow with one unquoted input variable is refused.
    run_alpaca = (local / ".github" / "workflows" / "run_alpaca.yml").read_text(encoding="utf-8")
    broken = tmp_path / "broken.yml"
    broken.write_text(run_alpaca.replace('"note=$PARAM_NOTE"', "note=$PARAM_NOTE"), encoding="utf-8")
    assert broken.read_text(encoding="utf-8") != run_alpaca
    assert _actionlint(broken).returncode != 0


def test_workflow_safety_rules(tmp_path: Path) -> None:
    root = _write_project(tmp_path, extra_yml="hosts: [localhost, node1]\n")
    build_workflows(root)
    for name, text in _workflows(root).items():
        assert text.startswith(MARKER + "\n"), name
        document = _load(text)
        for job in document["jobs"].values():
            assert job["runs-on"] == "self-hosted"
            for step in job["steps"]:
                if "uses" in step:  # pinned to a full version tag, not a branch or a major version
                    assert re.fullmatch(r"[\w-]+/[\w-]+@v\d+\.\d+\.\d+", step["uses"]), step["uses"]
                    continue
                script = step["run"]
                assert "${{" not in script, f"{name}: an expression inside a run: script\n{script}"
                for line in script.splitlines():  # secrets are tested for emptiness or piped, never printed
                    for secret in (*SECRETS, "SSH_PRIVATE_KEY"):
                        if f"${secret}" in line:
                            assert re.fullmatch(rf'\s*if \[ -z "\${secret}" \]; then( unset {secret}; fi)?', line) or (
                                line == f"printf '%s\\n' \"${secret}\" | ssh-add - > /dev/null"
                            ), f"{name}: {line}"
    run = _load(_workflows(root)["run_alpaca.yml"])
    assert run["concurrency"] == {
        "group": "run-alpaca-${{ inputs.run_name || github.run_id }}",
        "cancel-in-progress": False,
    }
    steps = {step.get("id"): step for step in run["jobs"]["run"]["steps"]}
    assert steps["run"]["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert steps["run"]["env"]["MY_TOKEN"] == "${{ secrets.MY_TOKEN }}"
    assert steps["log_tail"]["if"] == "always()"
    deploy = _load(_workflows(root)["deploy.yml"])
    assert "scaling nodes setup\n" in [step.get("run") for step in deploy["jobs"]["deploy"]["steps"]]
    cancel = _load(_workflows(root)["cancel.yml"])
    assert 'scaling queue cancel "$RUN_NAME"\n' in [step.get("run") for step in cancel["jobs"]["cancel"]["steps"]]


def test_inputs_round_trip(tmp_path: Path) -> None:
    root = _write_project(tmp_path)
    build_workflows(root)
    experiments = load_project(root)
    files = _workflows(root)
    assert set(files) == {"deploy.yml", "cancel.yml", *(f"run_{name}.yml" for name in experiments)}
    for name, experiment in experiments.items():
        inputs = _load(files[f"run_{name}.yml"])["on"]["workflow_dispatch"]["inputs"]
        assert list(inputs) == ["run_name", *(p.name for p in experiment.params)]
        assert inputs["run_name"]["type"] == "string" and inputs["run_name"]["default"] == ""
        for param in experiment.params:
            spec = inputs[param.name]
            assert spec["type"] == param.kind, param.name
            assert spec["description"] == (param.description or param.expected), param.name
            if param.kind == "choice":  # choice inputs are text: they must parse back to the same values
                assert param.options is not None
                assert all(isinstance(o, str) for o in [*spec["options"], spec["default"]]), spec
                assert tuple(parse_value(param, o) for o in spec["options"]) == param.options
                assert spec["default"] in spec["options"]
                assert parse_value(param, spec["default"]) == param.default
            else:
                assert type(spec["default"]) is param.type, param.name  # false, 0 and "" stay typed
                assert spec["default"] == param.default, param.name
    alpaca = _load(files["run_alpaca.yml"])["on"]["workflow_dispatch"]["inputs"]
    # The falsy and negative defaults are present, not dropped.
    assert (alpaca["use_lora"]["default"], alpaca["steps"]["default"], alpaca["note"]["default"]) == (False, 0, "")
    assert alpaca["shift"]["default"] == -1.5
    assert alpaca["decay"]["options"] == ["1e-05", "0.1"] and alpaca["micro"]["default"] == "2"


# --- executing the run: scripts as a runner would ---


def _expand(value: str, context: Mapping[str, Mapping[str, str]]) -> str:
    """A workflow env value with its ``${{ ... }}`` expressions resolved (only the forms the workflows use)."""

    def resolve(match: re.Match[str]) -> str:
        expression = match.group(1)
        for prefix, table in context.items():
            if expression.startswith(prefix):
                return table.get(expression[len(prefix) :], "")
        raise AssertionError(f"unexpected expression {match.group(0)!r} in an env value")

    return re.sub(r"\$\{\{ (\S+) \}\}", resolve, value)


class _Runner:
    """Runs the ``run:`` steps of one job in order, like a GitHub runner: env, GITHUB_OUTPUT, bash -eo pipefail."""

    def __init__(self, root: Path, workflow: str, inputs: Mapping[str, str], secrets: Mapping[str, str]) -> None:
        self.root = root
        self.job = _load(workflow)["jobs"]["run"]
        self.context: dict[str, dict[str, str]] = {"inputs.": dict(inputs), "secrets.": dict(secrets)}
        self.bin = root / "fake-bin"
        self.bin.mkdir()
        self.calls = root / "scaling-calls.jsonl"
        fake = self.bin / "scaling"
        fake.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            "names = ['HF_TOKEN', 'WANDB_API_KEY', 'MY_TOKEN']\n"
            "call = {'argv': sys.argv[1:], 'env': {n: os.environ.get(n) for n in names}}\n"
            "with open(os.environ['FAKE_SCALING_CALLS'], 'a') as f:\n"
            "    f.write(json.dumps(call) + '\\n')\n"
            "sys.exit(int(os.environ.get('FAKE_SCALING_EXIT', '0')))\n",
            encoding="utf-8",
        )
        fake.chmod(0o755)

    def step(self, step_id: str, exit_code: int = 0) -> subprocess.CompletedProcess[str]:
        step = next(s for s in self.job["steps"] if s.get("id") == step_id)
        output = self.root / f"output-{step_id}"
        output.write_text("", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in SECRETS}
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env['PATH']}",
            GITHUB_OUTPUT=str(output),
            GITHUB_RUN_ID="4242",
            GITHUB_WORKSPACE=str(self.root),
            FAKE_SCALING_CALLS=str(self.calls),
            FAKE_SCALING_EXIT=str(exit_code),
        )
        for key, value in {**self.job.get("env", {}), **step.get("env", {})}.items():
            env[key] = _expand(str(value), self.context)
        script = self.root / f"step-{step_id}.sh"
        script.write_text(step["run"], encoding="utf-8")
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        outputs = dict(line.split("=", 1) for line in output.read_text(encoding="utf-8").splitlines())
        self.context[f"steps.{step_id}.outputs."] = outputs
        return result

    def recorded(self) -> list[dict[str, Any]]:
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text(encoding="utf-8").splitlines()]


def _runner(tmp_path: Path, inputs: Mapping[str, str]) -> _Runner:
    root = _write_project(tmp_path)
    build_workflows(root)
    return _Runner(root, _workflows(root)["run_alpaca.yml"], inputs, SECRETS)


def test_run_steps_pass_inputs_unchanged(tmp_path: Path) -> None:
    runner = _runner(tmp_path, FAKE_INPUTS)
    assert runner.step("run_name").returncode == 0
    result = runner.step("run")
    assert result.returncode == 0, result.stderr
    [call] = runner.recorded()
    params = [p for p in FAKE_INPUTS if p != "run_name"]
    expected = ["run", "alpaca", "--run-name", "my-run.1"]
    for name in params:
        expected += ["--param", f"{name}={FAKE_INPUTS[name]}"]
    assert call["argv"] == expected
    # `scaling run` parses them back to what was typed in the form.
    experiment = load_project(runner.root)["alpaca"]
    values = dict(arg.split("=", 1) for arg in call["argv"][5::2])
    assert experiment.parse(values)["note"] == HOSTILE_NOTE
    assert dict(experiment.parse(values))["lr"] == 1e-4
    # Secrets arrive from the environment; one that is not set is unset, not "".
    assert call["env"] == {"HF_TOKEN": "hf-secret", "WANDB_API_KEY": None, "MY_TOKEN": "tok'en$HOME"}
    assert "hf-secret" not in result.stdout + result.stderr


def test_run_steps_default_name_and_refused_name(tmp_path: Path) -> None:
    runner = _runner(tmp_path / "default", {**FAKE_INPUTS, "run_name": ""})
    assert runner.step("run_name").returncode == 0
    assert runner.step("run").returncode == 0
    assert runner.recorded()[0]["argv"][2:4] == ["--run-name", "alpaca-gh4242"]

    bad = _runner(tmp_path / "bad", {**FAKE_INPUTS, "run_name": "x; touch pwned"})
    result = bad.step("run_name")
    assert result.returncode != 0 and "x; touch" not in result.stdout  # refused without echoing the value
    assert bad.context["steps.run_name.outputs."] == {}
    assert not (bad.root / "pwned").exists()


def test_run_steps_fail_with_the_run_and_show_its_log(tmp_path: Path) -> None:
    runner = _runner(tmp_path, FAKE_INPUTS)
    runner.step("run_name")
    assert runner.step("run", exit_code=3).returncode == 3  # the job fails when the training fails
    log = runner.root / "runs" / "alpaca" / "my-run.1" / "logs" / "rank_0.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {i}\n" for i in range(150)), encoding="utf-8")
    tail = runner.step("log_tail")
    assert tail.returncode == 0
    assert tail.stdout == "".join(f"line {i}\n" for i in range(50, 150))


# --- re-running ---


def test_rebuild_is_idempotent_and_removes_only_generated_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_project(tmp_path)
    workflows = root / ".github" / "workflows"
    workflows.mkdir(parents=True)
    hand_written = {"ci.yml": "name: ci\n", "notes.yaml": "# my notes\n", "README.md": MARKER + "\n"}
    for name, text in hand_written.items():
        (workflows / name).write_text(text, encoding="utf-8")

    assert scaling_main(["build-experiments", "--project", str(root / "src")]) == 0
    first = {p.name: p.read_bytes() for p in workflows.iterdir()}
    assert "wrote .github/workflows/run_probe.yml" in capsys.readouterr().out

    assert scaling_main(["build-experiments", "--project", str(root)]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in workflows.iterdir()} == first

    # The experiment `probe` is deleted: its workflow goes, the user's files stay as they were.
    (root / "src" / "experiments.py").write_text(EXPERIMENTS[: EXPERIMENTS.index('@experiment("probe")')])
    assert scaling_main(["build-experiments", "--project", str(root)]) == 0
    assert "removed .github/workflows/run_probe.yml" in capsys.readouterr().out
    after = {p.name: p.read_bytes() for p in workflows.iterdir()}
    assert set(after) == set(first) - {"run_probe.yml"}
    assert all(after[name] == text.encode() for name, text in hand_written.items())


def test_rebuild_refuses_to_overwrite_a_hand_written_workflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _write_project(tmp_path)
    workflows = root / ".github" / "workflows"
    workflows.mkdir(parents=True)
    (workflows / "deploy.yml").write_text("name: my deploy\n", encoding="utf-8")
    with pytest.raises(WorkflowError, match=r"deploy\.yml was not generated by scaling build-experiments"):
        build_workflows(root)
    assert sorted(p.name for p in workflows.iterdir()) == ["deploy.yml"]  # nothing written
    assert (workflows / "deploy.yml").read_text(encoding="utf-8") == "name: my deploy\n"
    assert scaling_main(["build-experiments", "--project", str(root)]) == 2
    assert "deploy.yml was not generated" in capsys.readouterr().err


def test_build_reports_a_bad_project_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write_project(tmp_path, experiments=textwrap.dedent(EXPERIMENTS).replace('default="7b"', 'default="1b"'))
    assert scaling_main(["build-experiments", "--project", str(root)]) == 2
    err = capsys.readouterr().err
    assert "experiments.py:4" in err and "'1b'" in err and len(err.strip().splitlines()) == 1
    assert not (root / ".github").exists()


@pytest.mark.parametrize("name", ["GITHUB_TOKEN", "RUN_NAME", "PARAM_LR", "PATH"])
def test_env_names_that_cannot_be_secrets_are_refused(tmp_path: Path, name: str) -> None:
    root = _write_project(tmp_path)
    (root / "scaling.yml").write_text(f"name: demo\nenv: [{name}]\n", encoding="utf-8")
    with pytest.raises(WorkflowError, match=rf"scaling\.yml: env '{name}'"):
        build_workflows(root)
    assert not (root / ".github").exists()
