"""Hugging Face Llama <-> scaling conversion: bit-identical round trips, equal logits, any training layout,
LoRA merged on export, the converted checkpoint trains, every refusal names what is wrong, CLI and Hub upload.

Every model is a tiny random one built here (no downloads). A logits mismatch with equal round-trip tensors
points at a layout rule (kv interleaving, RoPE pairing, vocab padding), not at the file handling.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from scaling.cli.main import main
from scaling.core.checkpoint import load_checkpoint, save_checkpoint
from scaling.core.checkpoint.files import file_digest
from scaling.core.optimizer.config import OptimizerConfig
from scaling.core.optimizer.optimizer import Optimizer
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig, init_distributed
from scaling.transformer.config import TransformerConfig
from scaling.transformer.convert import ConversionError, from_huggingface, push_to_hub, save_huggingface
from scaling.transformer.convert.hf_config import architecture_from_hf, hf_config_from_architecture
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

transformers = pytest.importorskip("transformers")

VOCAB = 100  # padded to 128 inside scaling: every test also checks the padding is trimmed again
BASE = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
}  # fmt: skip
LLAMA3 = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # fmt: skip
CONFIGS: dict[str, dict[str, Any]] = {
    "mha": {"num_key_value_heads": 4},
    "gqa": {"num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True},
    "tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "llama3": {"num_key_value_heads": 1, "rope_theta": 500000.0, "rope_scaling": LLAMA3},
}
LORA = {"lora": {"rank": 4, "alpha": 8.0, "targets": ["query", "key_value", "dense", "gate", "up", "down"]}}


# Helpers -------------------------------------------------------------------------------------------
def _tokenizer(path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def _hf_model(folder: Path, name: str = "gqa", model_type: str = "llama", **overrides: Any) -> Path:
    """A random tiny Llama (or Mistral) with every weight random, norms included, plus a tokenizer.json."""
    kwargs = copy.deepcopy({**BASE, **CONFIGS[name], **overrides})  # transformers edits rope dicts in place
    if model_type == "mistral":
        config: Any = transformers.MistralConfig(**kwargs, sliding_window=None)
        model: Any = transformers.MistralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if "norm" in param_name else noise * (3 if "embed" in param_name else 1))
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer(folder / "tokenizer.json")
    return folder


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not model.training  # from_pretrained returns eval mode: no dropout
    with torch.no_grad():
        logits: torch.Tensor = model(ids).logits
    return logits


def _manifest_config(checkpoint: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((checkpoint / "manifest.json").read_text())["config"]
    return config


def _module(
    topo: Topology, arch: TransformerArchitectureConfig, finetuning: dict[str, Any] | None = None
) -> ParallelModule:
    adapt = finetuning_adapter(FinetuningConfig.from_dict(finetuning), topo) if finetuning is not None else None
    return ParallelModule(transformer_layer_specs(arch, topo, seed=1), topo, LanguageModelLoss(topo), adapt=adapt)


def _scaling_logits(module: ParallelModule, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Runs the layers in order (one process holds them all); eval mode, so no dropout."""
    module.eval()
    assert not any(m.training for m in module.modules())
    x: Any = {"tokens": ids}
    with torch.no_grad():
        for layer in module.layers.values():
            x = layer(x)
    assert x.shape[-1] == 128  # the padded vocabulary
    return x[..., :vocab]  # type: ignore[no-any-return]


def _load(topo: Topology, checkpoint: Path, finetuning: dict[str, Any] | None = None) -> ParallelModule:
    arch = TransformerArchitectureConfig.from_dict(_manifest_config(checkpoint)["architecture"])
    module = _module(topo, arch, finetuning)
    load_checkpoint(checkpoint, module, missing="keep_initialised" if finetuning else "error")
    return module


@pytest.fixture
def topology() -> Iterator[Topology]:
    """A world of one in this process (conversion then reuses it instead of making its own)."""
    created = not dist.is_initialized()
    topo = init_distributed(TopologyConfig(device="cpu"))
    yield topo
    if created:
        dist.destroy_process_group()


# Round trips and logits ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_identical(tmp_path: Path, name: str) -> None:
    hf = _hf_model(tmp_path / "hf", name)
    checkpoint = from_huggingface(hf, tmp_path / "scaling")
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "generation_config.json").is_file()
    out = save_huggingface(tmp_path / "scaling", tmp_path / "out")
    original, exported = _hf_tensors(hf), _hf_tensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    before, after = json.loads((hf / "config.json").read_text()), json.loads((out / "config.json").read_text())
    fields = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
    ]  # fmt: skip
    assert {f: after[f] for f in fields} == {f: before[f] for f in fields}
    assert after["architectures"] == ["LlamaForCausalLM"]
    rope_before = transformers.LlamaConfig.from_pretrained(hf).rope_parameters
    rope_after = transformers.LlamaConfig.from_pretrained(out).rope_parameters
    assert rope_after == rope_before
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["mha", "gqa", "tied", "llama3", "mistral"])
def test_converted_checkpoint_gives_the_hugging_face_logits(tmp_path: Path, topology: Topology, name: str) -> None:
    model_type = "mistral" if name == "mistral" else "llama"
    hf = _hf_model(tmp_path / "hf", "gqa" if name == "mistral" else name, model_type=model_type)
    checkpoint = from_huggingface(hf, tmp_path / "scaling")
    ids = _ids()
    expected = _hf_logits(hf, ids)
    actual = _scaling_logits(_load(topology, checkpoint), ids, VOCAB)
    assert expected.std() > 0.3  # logits far from zero: the comparison means something
    assert (actual - expected).abs().max() <= 1e-4


def test_rope_fields_of_transformers_4_and_5_map_the_same() -> None:
    common = {**BASE, "model_type": "llama", "num_key_value_heads": 2}
    scaling = {key: value for key, value in LLAMA3.items() if key != "rope_type"}
    old = architecture_from_hf({**common, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    new = architecture_from_hf({**common, "rope_parameters": {"rope_theta": 5e5, **LLAMA3}})
    assert old == new and new.rope_base == 5e5 and new.rope_scaling is not None
    assert new.rope_scaling.original_max_position_embeddings == 16
    plain = architecture_from_hf({**common, "rope_scaling": None})
    assert plain.rope_base == 10000.0 and plain.rope_scaling is None
    with pytest.raises(ConversionError, match=r"rope_scaling\.rope_type 'dynamic'"):
        architecture_from_hf({**common, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert hf_config_from_architecture(new, torch.bfloat16)["rope_scaling"] == LLAMA3


@pytest.mark.timeout(120)
def test_sharded_folders_convert_both_ways(tmp_path: Path) -> None:
    hf = _hf_model(tmp_path / "hf", "tied")
    from_huggingface(hf, tmp_path / "a")
    sharded = save_huggingface(tmp_path / "a", tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (sharded / "model.safetensors").exists()
    from_huggingface(sharded, tmp_path / "b", dtype="bfloat16")  # reads the index; casts on the way
    single = save_huggingface(tmp_path / "b", tmp_path / "single", dtype="float32")
    assert json.loads((single / "config.json").read_text())["dtype"] == "float32"
    original, exported = _hf_tensors(hf), _hf_tensors(single)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor.to(torch.bfloat16).float()), key
    ids = _ids()
    torch.testing.assert_close(_hf_logits(sharded, ids), _hf_logits(hf, ids), rtol=0, atol=0)


# Any layout, LoRA --------------------------------------------------------------------------------
ARCH = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 64, "sequence_length": 16, "attention_bias": True,
}  # fmt: skip


def _save_tensor_parallel(save_dir: str, tokenizer: str) -> None:
    topo = Topology(TopologyConfig(model_parallel_size=2))
    arch = TransformerArchitectureConfig.from_dict(ARCH)
    module = _module(topo, arch)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(8)  # same factor on every slice: logits of order one
    config = {"architecture": arch.to_dict()}
    save_checkpoint(save_dir, 3, module, config=config, files={"tokenizer.json": tokenizer})  # as training does


@pytest.mark.timeout(180)
def test_checkpoint_of_two_tensor_parallel_ranks_exports_with_the_one_process_logits(
    tmp_path: Path, topology: Topology
) -> None:
    _tokenizer(tmp_path / "tokenizer.json")
    run_distributed(_save_tensor_parallel, 2, str(tmp_path / "tp2"), str(tmp_path / "tokenizer.json"), timeout_s=150)
    out = save_huggingface(tmp_path / "tp2", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # found by name in the tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # from a minimal tokenizer_config.json
    assert tokenizer.eos_token == "</s>" and tokenizer("w9")["input_ids"] == [9]
    ids = _ids()
    expected = _scaling_logits(_load(topology, tmp_path / "tp2" / "global_step3"), ids, VOCAB)
    actual = _hf_logits(out, ids)
    assert expected.std() > 0.3
    assert (actual - expected).abs().max() <= 1e-4


@pytest.mark.timeout(120)
def test_lora_adapters_are_merged_on_export(tmp_path: Path, topology: Topology) -> None:
    hf = _hf_model(tmp_path / "hf", "gqa")
    base = from_huggingface(hf, tmp_path / "base")
    tuned = _load(topology, base, LORA)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in tuned.named_parameters_canonical():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # B starts at zero: make the update real
    ids = _ids()
    expected = _scaling_logits(tuned, ids, VOCAB)
    config = {**_manifest_config(base), "finetuning": FinetuningConfig.from_dict(LORA).to_dict()}
    save_checkpoint(tmp_path / "adapters", 7, tuned, config=config, weights="trainable")
    save_checkpoint(tmp_path / "whole", 7, tuned, config=config)  # LoRA factors stored beside the base
    merged = save_huggingface(base, tmp_path / "merged", adapters=tmp_path / "adapters")
    assert (_hf_logits(merged, ids) - expected).abs().max() <= 1e-4
    assert (_hf_logits(hf, ids) - expected).abs().max() > 1e-2  # the adapters changed the model
    whole = save_huggingface(tmp_path / "whole", tmp_path / "merged_whole")
    assert (_hf_logits(whole, ids) - expected).abs().max() <= 1e-4
    with pytest.raises(ConversionError, match="only trainable weights"):
        save_huggingface(tmp_path / "adapters", tmp_path / "refused")


@pytest.mark.timeout(120)
def test_converted_checkpoint_trains_and_its_finetune_config_loads(tmp_path: Path, topology: Topology) -> None:
    hf = _hf_model(tmp_path / "hf", "tied")
    checkpoint = from_huggingface(hf, tmp_path / "scaling")
    config = TransformerConfig.from_yaml(tmp_path / "scaling" / "finetune.yml")
    assert config.trainer.load_dir == (tmp_path / "scaling").resolve()
    assert config.architecture.model_copy(update={"sequence_length": 64}) == TransformerArchitectureConfig.from_dict(
        _manifest_config(checkpoint)["architecture"]
    )
    module = _load(topology, checkpoint)
    module.train()
    optimizer = Optimizer.for_module(module, OptimizerConfig())
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in module.named_parameters_canonical()}
    result = module.train_step([{"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}], step=0)
    optimizer.step(0)
    assert torch.isfinite(result.loss)
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters_canonical())


# Refusals ----------------------------------------------------------------------------------------
def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'linear'"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding-window attention is not supported"),
    ],
)
def test_unsupported_hugging_face_configs_are_refused(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    hf = _hf_model(tmp_path / "hf", "mha")
    _edit_config(hf, **changes)
    with pytest.raises(ConversionError, match=message):
        from_huggingface(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(120)
def test_missing_unexpected_and_mis_shaped_tensors_are_named(tmp_path: Path) -> None:
    hf = _hf_model(tmp_path / "hf", "gqa")
    tensors = _hf_tensors(hf)
    broken = dict(tensors)
    del broken["model.layers.1.self_attn.v_proj.weight"]
    save_file(broken, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"'model\.layers\.1\.self_attn\.v_proj\.weight'.*model\.safetensors"):
        from_huggingface(hf, tmp_path / "out")
    broken = {**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(63, 32)}
    save_file(broken, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight'.*\[63, 32\]"):
        from_huggingface(hf, tmp_path / "out")
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, str(hf / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"unexpected tensor 'model\.extra\.weight'"):
        from_huggingface(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = from_huggingface(hf, tmp_path / "scaling")
    layer = checkpoint / "model" / "layer_00001.safetensors"
    stored = load_file(str(layer))
    del stored["mlp.gate.weight"]
    save_file(stored, str(layer))
    with pytest.raises(ConversionError, match=r"layer_00001\.safetensors does not match the checksum"):
        save_huggingface(checkpoint, tmp_path / "hf_out")
    manifest = checkpoint / "manifest.json"  # as if written so: the checksum matches, the tensor is missing
    recorded = json.loads(manifest.read_text())
    recorded["checksums"]["model/layer_00001.safetensors"] = file_digest(layer)
    manifest.write_text(json.dumps(recorded))
    with pytest.raises(ConversionError, match=r"'mlp\.gate\.weight'.*layer_00001\.safetensors"):
        save_huggingface(checkpoint, tmp_path / "hf_out")
    assert not (tmp_path / "hf_out").exists()


@pytest.mark.timeout(120)
def test_non_empty_output_directories_are_refused_and_left_untouched(tmp_path: Path) -> None:
    hf = _hf_model(tmp_path / "hf", "mha")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="not empty"):
        from_huggingface(hf, occupied)
    from_huggingface(hf, tmp_path / "scaling")
    with pytest.raises(ConversionError, match="not empty"):
        save_huggingface(tmp_path / "scaling", occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"] and (occupied / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "occupied", "scaling"]  # no staging left behind
    (tmp_path / "empty").mkdir()
    save_huggingface(tmp_path / "scaling", tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").is_file()


def _save_scaling(save_dir: Path, topo: Topology, arch: dict[str, Any], finetuning: dict[str, Any] | None) -> None:
    config = TransformerArchitectureConfig.from_dict(arch)
    module = _module(topo, config, finetuning)
    save_checkpoint(save_dir, 1, module, config={"architecture": config.to_dict(), "finetuning": finetuning})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("arch", "finetuning", "message"),
    [
        ({"norm_type": "layer"}, None, "norm_type 'layer'"),
        ({"mlp_type": "gelu"}, None, "mlp_type 'gelu'"),
        ({"rotary_fraction": 0.5}, None, "rotary_fraction 0.5"),
        ({}, {"adapters": {"bottleneck": 4}}, "finetuning.adapters"),
        ({}, {"soft_prompt": {"tokens": 2}}, "finetuning.soft_prompt"),
    ],
)
def test_checkpoints_without_a_llama_equivalent_are_refused(
    tmp_path: Path, topology: Topology, arch: dict[str, Any], finetuning: dict[str, Any] | None, message: str
) -> None:
    _save_scaling(tmp_path / "ckpt", topology, {**ARCH, **arch}, finetuning)
    with pytest.raises(ConversionError, match=message):
        save_huggingface(tmp_path / "ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# CLI and Hub -------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cli_converts_both_ways_and_transformers_loads_the_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf = _hf_model(tmp_path / "hf", "gqa")
    assert main(["convert", "from-hf", str(hf), str(tmp_path / "scaling")]) == 0
    assert main(["convert", "to-hf", str(tmp_path / "scaling"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("w5 w7")["input_ids"] == [5, 7] and tokenizer.eos_token == "</s>"


def test_cli_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "from-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scaling convert from-hf: ") and "config.json is missing" in err
    assert "Traceback" not in err
    assert main(["convert", "to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("scaling convert to-hf: ")
    for command in (["convert"], ["convert", "from-hf"], ["convert", "to-hf"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        assert f"usage: scaling {' '.join(command)}" in capsys.readouterr().out


class _FakeHfApi:
    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: Any) -> str:
        self.calls.append(("upload_folder", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"


@pytest.mark.timeout(120)
def test_push_to_hub_creates_a_private_repo_and_uploads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _FakeHfApi.calls = []
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="no Hugging Face token"):
        push_to_hub(folder, "me/tiny")
    assert _FakeHfApi.calls == []  # nothing sent without a token
    url = push_to_hub(folder, "me/tiny", token="secret")
    assert url == "https://huggingface.co/me/tiny/commit/abc"
    assert [c[0] for c in _FakeHfApi.calls] == ["init", "create_repo", "upload_folder"]
    assert _FakeHfApi.calls[0][1]["token"] == "secret"
    assert _FakeHfApi.calls[1][1] == {"repo_id": "me/tiny", "private": True, "exist_ok": True, "repo_type": "model"}
    assert _FakeHfApi.calls[2][1]["folder_path"] == str(folder)

    _FakeHfApi.calls = []
    monkeypatch.setenv("HF_TOKEN", "from-env")
    hf = _hf_model(tmp_path / "hf", "mha")
    from_huggingface(hf, tmp_path / "scaling")
    args = ["convert", "to-hf", str(tmp_path / "scaling"), str(tmp_path / "out"), "--push-to-hub", "me/other"]
    assert main(args) == 0
    assert "uploaded: https://huggingface.co/me/other/commit/abc" in capsys.readouterr().out
    assert _FakeHfApi.calls[0][1]["token"] == "from-env"
    assert _FakeHfApi.calls[2][1]["folder_path"] == str(tmp_path / "out")
