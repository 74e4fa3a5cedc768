"""BaseConfig: round trips, overrides, the commented template, and errors that name file and field."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import pytest
import yaml
from pydantic import Field, model_validator

from scaling.core.config import BaseConfig, ConfigError, InvalidCombination, apply_overrides
from scaling.core.topology import TopologyConfig


class Precision(str, Enum):
    FP32 = "float32"
    BF16 = "bfloat16"


class OptimizerSection(BaseConfig):
    """Optimizer settings for the tests."""

    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    decay_steps: int = Field(100, ge=1, description="Steps of decay after warm-up.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> OptimizerSection:
        if self.warmup_steps > self.decay_steps:
            raise InvalidCombination(
                f"warmup_steps ({self.warmup_steps}) is longer than decay_steps ({self.decay_steps})",
                "warmup_steps",
            )
        return self


class RunSection(BaseConfig):
    """A composite config like the ones users write."""

    name: str = Field(description="Run name (required).")
    precision: Precision = Field(Precision.FP32, description="Parameter dtype.")
    save_dir: Path | None = Field(None, description="Where checkpoints go.")
    tags: list[str] = Field(default_factory=list, description="Free-form labels.")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection, description="Optimizer section.")
    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="Parallel layout.")


class Defaults(BaseConfig):
    """Every field has a default, so the template loads back as it is."""

    seed: int = Field(42, description="Base seed.")
    precision: Precision = Field(Precision.BF16, description="Parameter dtype.")
    checkpoint_dir: Path | None = Field(None, description="Where checkpoints go.")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection, description="Optimizer section.")
    topology: TopologyConfig = Field(default_factory=TopologyConfig, description="Parallel layout.")


GOOD = {
    "name": "run1",
    "precision": "bfloat16",
    "save_dir": "/tmp/ckpt",
    "tags": ["a", "b"],
    "optimizer": {"lr": 3e-4, "warmup_steps": 10, "decay_steps": 90},
    "topology": {"model_parallel_size": 2, "world_size": 4, "micro_batch_size": 2},
}


def test_dict_round_trip_is_json_safe() -> None:
    config = RunSection.from_dict(GOOD)
    data = config.to_dict()
    assert data["precision"] == "bfloat16"  # enums as values
    assert data["save_dir"] == "/tmp/ckpt"  # paths as strings
    assert data["topology"]["data_parallel_size"] == 2  # inferred sizes are written out
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert RunSection.from_dict(data) == config


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = RunSection.from_dict(GOOD)
    path = tmp_path / "run.yml"
    config.to_yaml(path)
    assert RunSection.from_yaml(path) == config


def test_configs_are_frozen_and_hashable() -> None:
    config = RunSection.from_dict(GOOD)
    with pytest.raises(Exception, match="frozen"):
        config.name = "other"  # type: ignore[misc]
    assert hash(config.topology) == hash(RunSection.from_dict(GOOD).topology)


def test_overrides_parse_yaml_scalars_and_create_sections(tmp_path: Path) -> None:
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump({"name": "x"}))
    config = RunSection.from_yaml(
        path,
        [
            "optimizer.lr=2e-4",
            "optimizer.betas=[0.8, 0.9]",
            "topology.model_parallel_size=2",
            "topology.data_parallel_size=3",
            "save_dir=null",
            "tags=[x, 'y z']",
            "name=with=equals",
        ],
    )
    assert config.optimizer.lr == 2e-4
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.topology.world_size == 6
    assert config.save_dir is None
    assert config.tags == ["x", "y z"]
    assert config.name == "with=equals"
    assert yaml.safe_load(path.read_text()) == {"name": "x"}  # the file itself is untouched


def test_override_into_lists_and_bad_overrides() -> None:
    assert apply_overrides({"a": [{"b": 1}, {"b": 2}]}, ["a.1.b=5"]) == {"a": [{"b": 1}, {"b": 5}]}
    with pytest.raises(ConfigError, match=r"expected KEY\.PATH=VALUE"):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ConfigError, match="not a valid index"):
        apply_overrides({"a": [1]}, ["a.3=2"])
    with pytest.raises(ConfigError, match="'name' is not a mapping"):
        apply_overrides({"name": "x"}, ["name.first=2"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["a=[unclosed"])


def test_template_documents_every_field_and_loads_back_to_the_defaults(tmp_path: Path) -> None:
    text = Defaults.template()
    for description in ["Base seed.", "Peak learning rate.", "Tensor-parallel size", "Samples per forward"]:
        assert description in text
    assert "seed: 42" in text
    assert "[type: 'float32' | 'bfloat16']" in text
    path = tmp_path / "template.yml"
    path.write_text(text)
    assert Defaults.from_yaml(path) == Defaults()


def test_template_marks_required_fields() -> None:
    assert "name:  # REQUIRED" in RunSection.template()


def _all_config_classes() -> list[type[BaseConfig]]:
    import scaling.core.config
    import scaling.core.topology  # noqa: F401  (registers the subclasses)

    found: list[type[BaseConfig]] = []
    stack = list(BaseConfig.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("scaling."):
            found.append(cls)
    return found


def test_every_library_config_field_is_described() -> None:
    classes = _all_config_classes()
    assert TopologyConfig in classes
    for cls in classes:
        for name, field in cls.model_fields.items():
            assert field.description and len(field.description) > 5, f"{cls.__name__}.{name} has no description"


BAD_CONFIGS = [
    # (what is wrong, document, dotted path named, fragment of the message)
    ("wrong type", {"name": "x", "optimizer": {"lr": "fast"}}, "optimizer.lr", "valid number"),
    ("unknown top-level key", {"name": "x", "optimiser": {}}, "optimiser", "did you mean 'optimizer'"),
    ("unknown nested key", {"name": "x", "optimizer": {"learning_rate": 1.0}}, "optimizer.learning_rate", "unknown"),
    ("typo in nested key", {"name": "x", "topology": {"micro_batch_sise": 2}}, "topology.micro_batch_sise",
     "did you mean 'micro_batch_size'"),
    ("missing required", {"precision": "float32"}, "name", "required field is missing"),
    ("invalid enum", {"name": "x", "precision": "fp8"}, "precision", "'float32' or 'bfloat16'"),
    ("negative lr", {"name": "x", "optimizer": {"lr": -1}}, "optimizer.lr", "greater than 0"),
    ("inconsistent combination", {"name": "x", "optimizer": {"warmup_steps": 200}}, "optimizer.warmup_steps",
     "longer than decay_steps"),
    ("world size mismatch", {"name": "x", "topology": {"world_size": 8, "data_parallel_size": 2}},
     "topology.world_size", "!="),
    ("batch trio", {"name": "x", "topology": {"global_batch_size": 8, "micro_batch_size": 3,
                                              "gradient_accumulation_steps": 1}}, "topology.global_batch_size", "!="),
    ("tuple too short", {"name": "x", "optimizer": {"betas": [0.9]}}, "optimizer.betas.1", "required field is missing"),
    ("list of wrong items", {"name": "x", "tags": ["a", {"b": 1}]}, "tags.1", "valid string"),
    ("section of wrong kind", {"name": "x", "topology": [1, 2]}, "topology", "valid dictionary"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "document", "path", "fragment"), BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_names_file_and_field(tmp_path: Path, what: str, document: dict, path: str, fragment: str) -> None:
    config_file = tmp_path / "bad.yml"
    config_file.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as info:
        RunSection.from_yaml(config_file)
    message = str(info.value)
    assert str(config_file) in message
    assert f"\n  {path}:" in message or f"\n  {path}," in message, message
    assert fragment in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one message, no deep traceback


def test_unreadable_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yml"
    with pytest.raises(ConfigError, match=f"cannot read config file {missing}"):
        RunSection.from_yaml(missing)
    broken = tmp_path / "broken.yml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=f"config file {broken} is not valid YAML"):
        RunSection.from_yaml(broken)
    scalar = tmp_path / "scalar.yml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match=f"invalid RunSection in {scalar}: expected a mapping"):
        RunSection.from_yaml(scalar)


def test_override_of_unknown_field_is_reported_like_a_file_error(tmp_path: Path) -> None:
    config_file = tmp_path / "ok.yml"
    config_file.write_text("name: x\n")
    with pytest.raises(ConfigError) as info:
        RunSection.from_yaml(config_file, ["optimizer.lrr=1"])
    assert "optimizer.lrr: unknown field (did you mean 'lr'?)" in str(info.value)
