"""The user-facing edges: the example's positional config, config checks at load time, LoRA targets that
name nothing, `convert to-hf --adapters` on a non-adapter checkpoint, and conversion keeping the context
length and RoPE scaling of the original model. Each fails with one message naming the field or file."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaling.cli.main import main as scaling_main
from scaling.core.config import ConfigError
from scaling.core.topology import Topology
from scaling.transformer.config import TransformerConfig
from scaling.transformer.convert import from_huggingface, save_huggingface
from scaling.transformer.train import main as train_main

from .test_convert import _hf_model, topology  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")  # installed with the test extras (as in test_convert.py)
TINY_ARCH = {
    "vocab_size": 64, "vocab_multiple": 64, "hidden_size": 16, "num_layers": 2, "num_attention_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 32, "sequence_length": 16,
}  # fmt: skip


def _run_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architecture": dict(TINY_ARCH),
        "trainer": {"train_iterations": 2, "save_dir": str(tmp_path / "ckpt")},
        "data": {"prefixes": [str(tmp_path / "corpus")]},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def _write(tmp_path: Path, document: dict[str, Any], name: str = "run.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document))
    return path


def _one_message(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


# Config checks at load time ------------------------------------------------------------------------
def test_more_pipeline_stages_than_layers_is_a_config_error_naming_both_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, _run_config(tmp_path, topology={"pipe_parallel_size": 3}))
    with pytest.raises(ConfigError) as caught:
        TransformerConfig.from_yaml(path)
    assert caught.value.problems == [
        "topology.pipe_parallel_size, architecture.num_layers: pipe_parallel_size (3) is larger than num_layers (2): "
        "every pipeline stage needs at least one layer; lower pipe_parallel_size or add layers"
    ]
    assert train_main([str(path)]) == 2  # before any process is launched
    _one_message(capsys.readouterr().err, str(path), "topology.pipe_parallel_size", "architecture.num_layers", "(3)")


def test_more_virtual_stages_than_model_pieces_is_a_config_error(tmp_path: Path) -> None:
    layout = {"pipe_parallel_size": 2, "virtual_pipe_stages": 3, "pipe_schedule": "interleaved_1f1b",
              "gradient_accumulation_steps": 2}  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        TransformerConfig.from_dict(_run_config(tmp_path, topology=layout))
    (problem,) = caught.value.problems
    assert problem.startswith("topology.virtual_pipe_stages, architecture.num_layers: pipe_parallel_size (2) x ")
    assert "= 6 stages, but the model has only 4 pieces" in problem


@pytest.mark.parametrize("option", ["wandb", "tensorboard"])
def test_logging_sink_without_its_package_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    monkeypatch.setitem(sys.modules, option, None)  # makes the package look not installed
    document = _run_config(tmp_path, logger={option: True, "log_dir": str(tmp_path / "logs")})
    with pytest.raises(ConfigError) as caught:
        TransformerConfig.from_dict(document)
    assert caught.value.problems == [
        f"logger.{option}: {option} is true but the '{option}' package is not installed; install it with: "
        f"pip install 'scaling[logging]' (or set {option}: false)"
    ]


def test_wandb_without_the_package_is_a_config_error_before_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this machine has
    path = _write(tmp_path, _run_config(tmp_path, topology={"data_parallel_size": 2}, logger={"wandb": True}))
    assert train_main([str(path)]) == 2  # a 2-process run: this is the launcher, nothing was started
    _one_message(capsys.readouterr().err, "logger.wandb", "pip install 'scaling[logging]'")


def test_lora_target_that_matches_no_module_names_the_nearest_modules(tmp_path: Path) -> None:
    config = _run_config(tmp_path)
    config["finetuning"] = {"lora": {"targets": ["query", "qeury_proj"]}}
    with pytest.raises(ConfigError) as caught:
        TransformerConfig.from_dict(config)
    (problem,) = caught.value.problems
    assert problem.startswith("finetuning.lora.targets: LoRA target 'qeury_proj' matches no module; nearest module")
    assert "query" in problem
    config["finetuning"] = {"lora": {"targets": ["attention.*", "mlp.up"]}}  # patterns that do match load
    assert TransformerConfig.from_dict(config).finetuning is not None


def test_lora_target_that_matches_no_module_fails_when_the_model_is_built(topology: Topology) -> None:  # noqa: F811
    from scaling.transformer.finetuning.apply import finetuning_adapter
    from scaling.transformer.finetuning.config import FinetuningConfig
    from scaling.transformer.model.config import TransformerArchitectureConfig
    from scaling.transformer.model.layers import transformer_layer_specs

    topo = topology
    arch = TransformerArchitectureConfig.from_dict({**TINY_ARCH, "mlp_type": "gelu", "intermediate_size": 32})
    adapt = finetuning_adapter(FinetuningConfig.from_dict({"lora": {"targets": ["gate"]}}), topo)
    layer = transformer_layer_specs(arch, topo)[1].build()  # a GELU MLP has no gate projection
    with pytest.raises(ConfigError, match=r"finetuning.lora.targets: LoRA target 'gate' matches no module; nearest"):
        adapt(layer, 1)
    wrapped = finetuning_adapter(FinetuningConfig.from_dict({"lora": {"targets": ["mlp.*"]}}), topo)(
        transformer_layer_specs(arch, topo)[1].build(), 1
    )
    assert sorted(n for n, p in wrapped.named_parameters() if p.requires_grad) == [
        "mlp.down.lora_a", "mlp.down.lora_b", "mlp.up.lora_a", "mlp.up.lora_b",
    ]  # fmt: skip


# Conversion ----------------------------------------------------------------------------------------
LLAMA3_LONG = {
    "num_key_value_heads": 1, "rope_theta": 500000.0, "max_position_embeddings": 64,
    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                     "original_max_position_embeddings": 32},
}  # fmt: skip


@pytest.mark.timeout(120)
def test_convert_round_trip_through_training_keeps_context_length_and_rope_scaling(tmp_path: Path) -> None:
    hf = _hf_model(tmp_path / "hf", "llama3", **copy.deepcopy(LLAMA3_LONG))
    from_huggingface(hf, tmp_path / "scaling")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{3 + i} w{4 + i}", "completion": f" w{5 + i}"}) + "\n"
                            for i in range(40)))  # fmt: skip
    # Finetune with the written finetune.yml on samples shorter than the model's context (64 -> 16).
    result = subprocess.run(
        [str(Path(sys.executable).with_name("scaling")), "train", str(tmp_path / "scaling" / "finetune.yml"),
         "-o", f"data.finetuning_jsonl={data}", "-o", "architecture.sequence_length=16",
         "-o", "trainer.train_iterations=2", "-o", "topology.gradient_accumulation_steps=1",
         "-o", f"trainer.save_dir={tmp_path / 'tuned'}"],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "tuned" / "global_step2" / "manifest.json").read_text())
    assert manifest["config"]["architecture"]["sequence_length"] == 16  # trained short
    out = save_huggingface(tmp_path / "tuned", tmp_path / "out")
    # Read both as transformers does (the installed version may write rope_parameters instead of rope_scaling).
    before, after = transformers.LlamaConfig.from_pretrained(hf), transformers.LlamaConfig.from_pretrained(out)
    assert after.max_position_embeddings == before.max_position_embeddings == 64
    rope = before.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["original_max_position_embeddings"] == 32  # the fixture is real
    for key in ("rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):  # fmt: skip
        assert after.rope_parameters[key] == rope[key], key
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64


@pytest.mark.timeout(120)
def test_to_hf_refuses_adapters_that_are_not_an_adapter_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = _hf_model(tmp_path / "hf", "gqa")
    from_huggingface(hf, tmp_path / "base")
    from_huggingface(hf, tmp_path / "other")  # a full checkpoint without finetuning: not adapters
    capsys.readouterr()  # transformers' progress bars from building the fixture
    code = scaling_main(["convert", "to-hf", str(tmp_path / "base"), str(tmp_path / "out"),
                         "--adapters", str(tmp_path / "other")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scaling convert to-hf: adapters ")
    _one_message(err, str(tmp_path / "other"), "it is not an adapter checkpoint")
    assert not (tmp_path / "out").exists()  # nothing written


# The transformer example -----------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_transformer_example_runs_the_config_given_as_positional_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples.transformer_example import run

    assert run.build_parser().parse_args([]).config == run.CONFIG  # no argument: the bundled config
    no_tokenizer = _write(tmp_path, _run_config(tmp_path), "no_tokenizer.yml")
    assert run.main([str(no_tokenizer)]) == 2  # the given config is read (and checked) before anything runs
    _one_message(capsys.readouterr().err, str(no_tokenizer), "data.tokenizer")
    monkeypatch.setattr(run, "MAX_CORPUS_BYTES", 150_000)  # a small corpus: the pipeline, not the model, is tested
    config = {
        "topology": {"micro_batch_size": 2, "gradient_accumulation_steps": 1},
        "architecture": {**TINY_ARCH, "vocab_size": 320, "sequence_length": 32},
        "trainer": {"train_iterations": 3, "log_interval": 1, "eval_interval": 100, "save_dir": str(tmp_path / "ckpt")},
        "data": {"prefixes": [str(tmp_path / "stdlib")], "tokenizer": str(tmp_path / "tokenizer.json")},
        "logger": {"log_dir": str(tmp_path / "logs")},
    }  # fmt: skip
    path = _write(tmp_path, config, "example.yml")
    assert run.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "stdlib.json").is_file()
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step3"  # this config's length and save_dir
    assert "(3 logged steps)" in out and f"generating from {tmp_path / 'ckpt'}" in out


# One log directory -------------------------------------------------------------------------------------
def test_old_runner_log_dir_is_refused_and_points_to_logger_log_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scaling.core.runner.command_line import main as launch_main

    document = _run_config(tmp_path, runner={"log_dir": str(tmp_path / "ranks")})
    with pytest.raises(ConfigError) as caught:
        TransformerConfig.from_dict(document)
    (problem,) = caught.value.problems
    assert problem.startswith("runner.log_dir: runner.log_dir is gone")
    assert "logger.log_dir; set that instead" in problem
    path = _write(tmp_path, document)
    assert launch_main([str(path), "--dry-run"]) == 2  # `scaling launch` (runner + topology sections) too
    _one_message(capsys.readouterr().err, str(path), "runner.log_dir", "logger.log_dir")


def test_per_rank_logs_go_under_logger_log_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scaling.core.runner.command_line import main as launch_main

    logs = tmp_path / "logs"
    document = {"topology": {"data_parallel_size": 2}, "runner": {"rank_logs": True}, "logger": {"log_dir": str(logs)}}
    assert launch_main([str(_write(tmp_path, document)), "--dry-run"]) == 0
    assert f"--log-dir={logs / 'ranks'} --tee=3" in capsys.readouterr().out
    slurm = {**document, "runner": {"runner_type": "slurm", "nproc_per_node": 2}}
    assert launch_main([str(_write(tmp_path, slurm)), "--dry-run"]) == 0
    assert f"sbatch {logs / 'scaling.sbatch'}" in capsys.readouterr().out  # the job script sits beside the logs
    no_dir = _run_config(tmp_path, runner={"rank_logs": True})
    with pytest.raises(ConfigError, match=r"runner\.rank_logs: rank_logs writes per-rank logs under logger\.log_dir"):
        TransformerConfig.from_dict(no_dir)
