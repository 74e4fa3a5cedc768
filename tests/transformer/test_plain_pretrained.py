"""``pretrained=`` for the plain-loop model: Hugging Face folders, scaling checkpoints, Hub ids.

Where to start when one fails:

* the slicing test (one process, no model) fails: a tensor-parallel slice read from the safetensors file is
  not the slice of what ``scaling_layer_from_hf`` maps (the table of copied tensors, the vocabulary padding,
  or the cut of the fused key_value), or a large tensor was read whole;
* only the logits tests fail: the slices are right but land in the wrong parameter or shard (the cuts from
  the parameter table, ``assign_full`` under ZeRO 3), or the architecture mapping of config.json is off;
* the Hub tests: what ``snapshot_download`` is asked for, or the message without huggingface_hub.

Tolerances: the same fp32 weights in both models; the logits differ only by summation order (SDPA's
kernel, the tensor-parallel all-reduce), well inside 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.testing import run_distributed
from scaling.transformer.convert.hf_files import HFWeightReader
from scaling.transformer.convert.hf_weights import scaling_layer_from_hf
from scaling.transformer.data.tokenizer import Tokenizer
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.plain.pretrained import (
    HUB_ALLOW_PATTERNS,
    _Cut,
    _hf_layer_slices,
    _SlicedReader,
    check_same_architecture,
    load_pretrained_weights,
    pretrained_architecture,
    pretrained_kind,
    resolve_pretrained,
    tokenizer_of_pretrained,
)

VOCAB = 100  # padded to 128: rank 1 of tp 2 reads rows 64..99 and zero-fills 100..127
TOKENS = torch.tensor([[1, 5, 9, 99, 42, 7, 0, 63], [64, 65, 3, 2, 98, 11, 12, 13]])


def _hf_model(folder: Path, **overrides: Any) -> torch.Tensor:
    """A random tiny GQA ``LlamaForCausalLM`` saved (safetensors) into ``folder``; returns its logits of TOKENS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    }
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():  # random norms too, so a norm loaded from the wrong tensor shows in the logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        logits: torch.Tensor = model(TOKENS).logits
    return logits


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    return folder, _hf_model(folder)


# Mapping and slicing, one process --------------------------------------------------------------------------
def test_the_architecture_of_a_gqa_folder_is_its_config(hf_folder: tuple[Path, torch.Tensor]) -> None:
    folder, _ = hf_folder
    assert pretrained_kind(folder) == "huggingface"
    arch = pretrained_architecture(folder)
    assert (arch.num_attention_heads, arch.kv_heads, arch.dims_per_head) == (4, 2, 8)  # GQA: 2 queries per kv head
    assert (arch.vocab_size, arch.padded_vocab_size, arch.mlp_size, arch.num_layers) == (VOCAB, 128, 64, 2)
    assert (arch.rope_base, arch.norm_eps, arch.weight_tying) == (500000.0, 1e-5, False)


def _tp_cuts(shapes: dict[str, tuple[int, ...]], split: dict[str, int | None], tp: int, rank: int) -> dict[str, Any]:
    cuts: dict[str, _Cut | None] = {}
    for key, shape in shapes.items():
        dim = split[key]
        cuts[key] = None if dim is None else _Cut(dim, rank * shape[dim] // tp, shape[dim] // tp)
    return cuts


def _split_dim(key: str) -> int | None:
    """How the engine splits each tensor over tp ranks (column-parallel rows, row-parallel columns)."""
    if key in ("weight", "attention.dense.weight", "mlp.down.weight"):
        return 0 if key == "weight" else 1
    if key.startswith(("attention.query", "attention.key_value", "mlp.gate", "mlp.up")):
        return 0
    return None  # norms and the biases of row-parallel projections: whole on every rank


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}],
    ids=["gqa", "biases-and-tied-embedding"],
)
def test_each_rank_reads_its_slice_and_only_key_value_whole(tmp_path: Path, overrides: dict[str, Any]) -> None:
    _hf_model(tmp_path, **overrides)
    arch = pretrained_architecture(tmp_path)
    hf = HFWeightReader(tmp_path)
    tp = 2
    for index in range(arch.num_layers + 2):
        full = scaling_layer_from_hf(arch, index, hf.read)
        if arch.weight_tying and index == arch.num_layers + 1:
            full.pop("weight", None)  # the tied head is the embedding's parameter, loaded at layer 0
        split = {key: _split_dim(key) for key in full}
        parts = []
        for rank in range(tp):
            reader = _SlicedReader(hf)
            cuts = _tp_cuts({k: tuple(v.shape) for k, v in full.items()}, split, tp, rank)
            parts.append(_hf_layer_slices(arch, index, cuts, reader))
            assert all(
                name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "norm.weight"))
                or name.endswith(("o_proj.bias", "down_proj.bias"))
                for name in reader.whole
            ), reader.whole
        for key, tensor in full.items():
            dim = split[key]
            joined = parts[0][key] if dim is None else torch.cat([p[key] for p in parts], dim=dim)
            assert torch.equal(joined, tensor), (index, key)
            if dim is None:
                assert torch.equal(parts[1][key], tensor), (index, key)


def test_a_differing_field_is_named_with_both_values(hf_folder: tuple[Path, torch.Tensor]) -> None:
    arch = pretrained_architecture(hf_folder[0])
    changed = TransformerArchitectureConfig.from_dict({**arch.to_dict(), "num_kv_heads": 4})
    with pytest.raises(
        ValueError, match=r"at src do not fit the model: num_kv_heads: 2 in the pretrained model, 4 in the model"
    ):
        check_same_architecture(arch, changed, "src")
    # What finetuning may change is not a mismatch.
    shorter = TransformerArchitectureConfig.from_dict({**arch.to_dict(), "sequence_length": 16, "mlp_dropout": 0.1})
    check_same_architecture(arch, shorter, "src")


# Loading into the sharded model ---------------------------------------------------------------------------
def _logits_after_loading(folder: str, tp: int, zero_stage: int) -> torch.Tensor:
    from scaling.transformer.plain.model import ShardedTransformer
    from scaling.transformer.plain_world import reset_plain_world

    reset_plain_world()
    model = ShardedTransformer(pretrained_architecture(folder), zero_stage=zero_stage, precision="fp32", tp=tp, seed=3)
    load_pretrained_weights(model, folder)
    with torch.no_grad():
        logits = model({"input_ids": TOKENS})
    assert torch.count_nonzero(logits[..., VOCAB:]) == 0  # the padded vocabulary rows were loaded as zeros
    return logits[..., :VOCAB]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("world", "tp", "zero_stage"), [(1, 1, 3), (2, 2, 3), (2, 1, 3)], ids=["one-process", "tp2", "dp2-zero3"]
)
def test_logits_equal_the_hugging_face_model(
    hf_folder: tuple[Path, torch.Tensor], world: int, tp: int, zero_stage: int
) -> None:
    folder, expected = hf_folder
    for logits in run_distributed(_logits_after_loading, world, str(folder), tp, zero_stage, timeout_s=150):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def _round_trip(save_dir: str) -> dict[str, Any]:
    from scaling.core.zero.tensors import assign_full, gathered
    from scaling.transformer.plain.model import ShardedTransformer
    from scaling.transformer.plain_world import reset_plain_world

    reset_plain_world()
    arch = TransformerArchitectureConfig.from_dict(
        {"vocab_size": 258, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2}
    )
    saved = ShardedTransformer(arch, zero_stage=3, precision="fp32", seed=1)
    torch.manual_seed(7)
    for p in saved.named_parameters_by_name().values():  # norms too: initialised to ones on every seed
        assign_full(p, torch.randn(p.shape))
    checkpoint = saved.save(save_dir)
    fresh = ShardedTransformer(pretrained_architecture(save_dir), zero_stage=3, precision="fp32", seed=2)
    before = {n: gathered(p.detach()).clone() for n, p in fresh.named_parameters_by_name().items()}
    load_pretrained_weights(fresh, save_dir)
    want = {n: gathered(p.detach()) for n, p in saved.named_parameters_by_name().items()}
    got = {n: gathered(p.detach()) for n, p in fresh.named_parameters_by_name().items()}
    mismatch: str | None = None
    other = ShardedTransformer(
        TransformerArchitectureConfig.from_dict({**arch.to_dict(), "num_layers": 1}), precision="fp32"
    )
    try:
        load_pretrained_weights(other, save_dir)
    except ValueError as exc:
        mismatch = str(exc)
    return {
        "kind": pretrained_kind(save_dir),
        "same_arch": pretrained_architecture(save_dir) == arch,
        "changed": sorted(n for n in want if not torch.equal(before[n], want[n])),
        "equal": sorted(n for n in want if torch.equal(got[n], want[n])),
        "names": sorted(want),
        "tokenizer": str(tokenizer_of_pretrained(save_dir)),  # results travel as plain data, not Paths
        "checkpoint": str(checkpoint),
        "mismatch": mismatch,
    }


@pytest.mark.timeout(120)
def test_a_scaling_checkpoint_written_by_save_loads_back(tmp_path: Path) -> None:
    (got,) = run_distributed(_round_trip, 1, str(tmp_path / "run"), timeout_s=100)
    assert got["kind"] == "scaling" and got["same_arch"]
    assert got["changed"] == got["names"]  # the fresh model started elsewhere (another seed)...
    assert got["equal"] == got["names"]  # ...and holds the saved weights, every one
    assert got["tokenizer"] == str(Path(got["checkpoint"]) / "tokenizer.json")
    assert got["mismatch"] is not None and "num_layers: 2 in the pretrained model, 1 in the model" in got["mismatch"]


def _mismatch_before_reading(folder: str) -> str:
    from scaling.transformer.plain.model import ShardedTransformer
    from scaling.transformer.plain_world import reset_plain_world

    reset_plain_world()
    arch = pretrained_architecture(folder)
    model = ShardedTransformer(
        TransformerArchitectureConfig.from_dict({**arch.to_dict(), "intermediate_size": 128}), precision="fp32"
    )
    with pytest.raises(ValueError) as caught:
        load_pretrained_weights(model, folder)
    return str(caught.value)


@pytest.mark.timeout(120)
def test_an_architecture_mismatch_fails_before_any_tensor_is_read(
    hf_folder: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder[0] / "config.json").read_bytes())  # and no weights at all
    (message,) = run_distributed(_mismatch_before_reading, 1, str(folder), timeout_s=100)
    assert "intermediate_size: 64 in the pretrained model, 128 in the model being built" in message
    assert str(folder / "config.json") in message


# Where the weights come from ------------------------------------------------------------------------------
def test_a_local_directory_is_used_as_it_is_and_a_missing_path_is_named(
    hf_folder: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    folder = hf_folder[0]
    assert resolve_pretrained(folder) == folder and resolve_pretrained(str(folder)) == folder
    missing = tmp_path / "nowhere" / "at" / "all"
    with pytest.raises(ValueError, match=f"pretrained='{missing}' does not exist"):
        resolve_pretrained(missing)
    with pytest.raises(ValueError, match="'not an id' does not exist"):
        resolve_pretrained("not an id")
    with pytest.raises(ValueError, match="neither a Hugging Face model folder"):
        pretrained_kind(tmp_path)


def test_the_tokenizer_of_a_folder_is_its_tokenizer_json(tmp_path: Path) -> None:
    _hf_model(tmp_path)
    assert tokenizer_of_pretrained(tmp_path) is None
    Tokenizer.byte_level().tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer_of_pretrained(tmp_path) == tmp_path / "tokenizer.json"


@pytest.mark.timeout(120)
def test_a_hub_id_is_downloaded_with_huggingface_hub_and_loads(
    hf_folder: tuple[Path, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    folder, expected = hf_folder
    calls: list[dict[str, Any]] = []

    def snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    resolved = resolve_pretrained("org/tiny")
    assert resolved == folder
    assert resolve_pretrained("org/tiny@v1.0") == folder
    patterns = list(HUB_ALLOW_PATTERNS)
    assert calls == [
        {"repo_id": "org/tiny", "revision": None, "allow_patterns": patterns},
        {"repo_id": "org/tiny", "revision": "v1.0", "allow_patterns": patterns},
    ]
    assert {"*.json", "tokenizer.model"} <= set(patterns) and any(p.endswith(".safetensors") for p in patterns)
    (logits,) = run_distributed(_logits_after_loading, 1, str(resolved), 1, 3, timeout_s=100)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_a_hub_id_without_huggingface_hub_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="needs the huggingface_hub package: pip install huggingface_hub"):
        resolve_pretrained("org/tiny")


def test_a_hub_error_names_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def snapshot_download(**kwargs: Any) -> str:
        raise OSError("404 Client Error: Repository Not Found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ValueError, match=r"downloading org/gone at revision 'main' .*Repository Not Found"):
        resolve_pretrained("org/gone@main")
