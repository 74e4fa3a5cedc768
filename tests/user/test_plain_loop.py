"""The plain PyTorch loop of issue 12, as a user writes it, against the engine path ``scaling train`` runs.

The loop: a preset model, ``torch.optim.AdamW(model.parameters())``, ``LlamaLoader``, ``loss = model(batch);
loss.backward(); optimizer.step()``. On 1 and 2 processes, at ZeRO stages 0 and 3 and tensor parallel 1 and
2, its weights after a few steps equal those of the engine (``ParallelModule.train_step`` and the engine's
optimizer, what the trainer drives) fed the same batches from the same seed, within fp32 tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.testing import run_distributed

STEPS = 3
LR = 3e-3


def _records(n: int = 48) -> list[dict[str, str]]:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    return [
        {
            "prompt": f"Reverse: {words[i % 8]} {words[(3 * i) % 8]}\n",
            "completion": f"{words[(3 * i) % 8]} {words[i % 8]}",
        }
        for i in range(n)
    ]


def _fresh_world() -> None:
    from scaling.transformer import plain_world

    torch.set_num_threads(1)
    plain_world.reset_plain_world()


def _gathered_weights(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    from scaling.core.zero.tensors import gathered

    return {name: gathered(p.detach()).float().clone() for name, p in sorted(named.items())}


def _full_over_tp(weights: dict[str, torch.Tensor], table: Any, tp_group: Any, tp: int) -> dict[str, torch.Tensor]:
    """Tensor-parallel slices joined, so layouts with different tp compare name by name."""
    import torch.distributed as dist

    out = {}
    for name, value in weights.items():
        split = table[name].tp_split_dim
        if split is None or tp == 1:
            out[name] = value
            continue
        parts = [torch.empty_like(value) for _ in range(tp)]
        dist.all_gather(parts, value.contiguous(), group=tp_group)
        out[name] = torch.cat(parts, dim=split)
    return out


def _plain_loop(zero_stage: int, tp: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The loop exactly as the issue writes it, with the tiny preset."""
    _fresh_world()
    from scaling.llama import LlamaTiny
    from scaling.loaders import LlamaLoader

    model = LlamaTiny(zero_stage=zero_stage, precision="fp32", tp=tp, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    train_loader = LlamaLoader(_records(), max_sequence_length=32, batch_size=8, shuffle=True, seed=1)
    losses = []
    for step, batch in enumerate(train_loader):
        if step == STEPS:
            break
        optimizer.zero_grad()
        loss = model(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weights = _gathered_weights(model.named_parameters_by_name())
    return losses, _full_over_tp(weights, model.engine.param_table, model.topology.tp_group, tp)


def _engine_path(zero_stage: int, tp: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """What `scaling train` runs: the engine's module and optimizer, on the loader's batches."""
    _fresh_world()
    import torch.distributed as dist

    from scaling.core.optimizer.config import OptimizerConfig, TrainingGroupConfig
    from scaling.core.optimizer.lr_schedule import LearningRateScheduleConfig
    from scaling.core.optimizer.optimizer import Optimizer
    from scaling.core.pipeline.module import ParallelModule
    from scaling.core.topology import Topology, TopologyConfig
    from scaling.loaders import LlamaLoader
    from scaling.transformer.model.layers import LanguageModelLoss, loss_tokens, transformer_layer_specs
    from scaling.transformer.presets import llama_architecture

    world = dist.get_world_size()
    topology = Topology(TopologyConfig(model_parallel_size=tp, data_parallel_size=world // tp))
    config = OptimizerConfig(  # torch.optim.AdamW's defaults, which the loop as written uses
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        gradient_clipping=0.0,
        zero_stage=zero_stage,
        training_groups=[
            TrainingGroupConfig(
                weight_decay=0.0,
                learning_rate_schedule=LearningRateScheduleConfig(
                    learning_rate=LR, learning_rate_decay_style="constant"
                ),
            )
        ],
    )
    arch = llama_architecture("tiny")
    module = ParallelModule(
        transformer_layer_specs(arch, topology, seed=5),
        topology,
        LanguageModelLoss(topology),
        seed=5,
        weight_fn=loss_tokens,
        sharding=config.sharding,
    )
    optimizer = Optimizer.for_module(module, config)
    loader = LlamaLoader(
        _records(), max_sequence_length=32, batch_size=8, shuffle=True, seed=1,
        data_parallel_rank=topology.dp_rank, data_parallel_size=topology.dp_size,
    )  # fmt: skip
    losses = []
    for step, batch in enumerate(loader):
        if step == STEPS:
            break
        result = module.train_step([batch], step=step)
        optimizer.step(step)
        losses.append(float(result.loss))
    weights = _gathered_weights(module.named_parameters_by_name())
    return losses, _full_over_tp(weights, module.param_table, topology.tp_group, tp)


def _plain_loop_then_engine_path(zero_stage: int, tp: int) -> tuple[Any, Any]:
    """Both in one world (one start-up instead of two)."""
    return _plain_loop(zero_stage, tp), _engine_path(zero_stage, tp)


@pytest.fixture(scope="module")
def one_process() -> tuple[list[float], dict[str, torch.Tensor]]:
    return run_distributed(_plain_loop, 1, 0, 1, timeout_s=120)[0]


@pytest.mark.parametrize(("zero_stage", "tp"), [(0, 1), (3, 1), (3, 2), (0, 2)], ids=lambda v: str(v))
def test_the_loop_as_written_equals_the_engine_path_and_one_process(zero_stage: int, tp: int, one_process: Any) -> None:
    both = run_distributed(_plain_loop_then_engine_path, 2, zero_stage, tp, timeout_s=180)
    plain, engine = [b[0] for b in both], [b[1] for b in both]
    ref_losses, ref_weights = one_process
    # Against one process, tensor parallelism sums attention and MLP partial products in another order. Adam
    # divides each update by the root of its second moment, so where a gradient element is nearly zero that
    # rounding noise becomes an update difference of a fraction of the learning rate: a handful of elements
    # in 8192 differ by up to ~1e-5 after 3 steps at lr 3e-3. The same layout (plain loop vs engine) stays tight.
    one_process_atol = 2e-6 if tp == 1 else 2e-5
    for rank in range(2):
        losses, weights = plain[rank]
        assert losses == pytest.approx(ref_losses, rel=1e-5), f"rank {rank}: losses differ from one process"
        assert losses == pytest.approx(engine[rank][0], rel=1e-5), f"rank {rank}: losses differ from the engine"
        assert set(weights) == set(ref_weights) == set(engine[rank][1])
        for name, value in weights.items():
            torch.testing.assert_close(value, engine[rank][1][name], rtol=1e-5, atol=2e-6, msg=f"{name} vs engine")
            torch.testing.assert_close(
                value, ref_weights[name], rtol=1e-5, atol=one_process_atol, msg=f"{name} vs 1 process"
            )
    first = next(iter(ref_weights))
    initial = run_distributed(_initial_weight, 1, first, timeout_s=60)[0]
    assert not torch.equal(initial, ref_weights[first]), "training changed nothing: the comparison would be vacuous"


def _initial_weight(name: str) -> torch.Tensor:
    _fresh_world()
    from scaling.llama import LlamaTiny

    model = LlamaTiny(zero_stage=0, precision="fp32", seed=5)
    return _gathered_weights(model.named_parameters_by_name())[name]


# Accumulation ----------------------------------------------------------------------------------------------
def _accumulate(zero_stage: int, use_no_sync: bool) -> dict[str, torch.Tensor]:
    _fresh_world()
    import torch.distributed as dist

    from scaling.llama import LlamaTiny
    from scaling.loaders import LlamaLoader

    model = LlamaTiny(zero_stage=zero_stage, precision="fp32", seed=5)
    loader = LlamaLoader(_records(), max_sequence_length=32, batch_size=8, shuffle=False)
    batches = [b for _, b in zip(range(2), loader, strict=False)]
    world = dist.get_world_size()
    k = len(batches)
    for index, batch in enumerate(batches):
        last = index == k - 1
        context = model.no_sync() if use_no_sync and not last and world > 1 else torch.enable_grad()
        with context:
            (model(batch) / k).backward()
    return {name: torch.as_tensor(_full_grad(p)) for name, p in sorted(model.named_parameters_by_name().items())}


def _accumulate_both_ways(zero_stage: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return _accumulate(zero_stage, False), _accumulate(zero_stage, True)


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    from scaling.core.zero.tensors import gathered

    assert p.grad is not None
    return gathered(p.grad).clone()


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_accumulation_inside_no_sync_equals_reducing_every_micro_batch_and_one_process(zero_stage: int) -> None:
    reference = run_distributed(_accumulate, 1, 0, False, timeout_s=120)[0]
    every, deferred = run_distributed(_accumulate_both_ways, 2, zero_stage, timeout_s=120)[0]
    for name, value in reference.items():
        torch.testing.assert_close(every[name], value, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(deferred[name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert any(v.abs().sum() > 0 for v in reference.values())


# Saving, resuming, exporting ------------------------------------------------------------------------------
PROBE = torch.tensor([[1, 5, 9, 33, 70, 2, 8, 200]])


def _train_and_save(out: str, stop_at: int, resume_from: str | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    _fresh_world()
    from scaling.llama import LlamaTiny
    from scaling.loaders import LlamaLoader

    model = LlamaTiny(zero_stage=3, precision="fp32", seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader = LlamaLoader(_records(), max_sequence_length=32, batch_size=8, seed=2)
    step = 0
    if resume_from is not None:
        step = model.load(resume_from, optimizer=optimizer, loader=loader).step
    for batch in loader:
        if step == stop_at:
            break
        optimizer.zero_grad()
        model(batch).backward()
        optimizer.step()
        step += 1
        if step == 2 and resume_from is None:
            model.save(out, optimizer=optimizer, loader=loader)
    if resume_from is None:
        model.save_huggingface_model(Path(out) / "hf")
    with torch.no_grad():
        logits = model({"input_ids": PROBE}).float()
    return _gathered_weights(model.named_parameters_by_name()), logits


def test_save_with_optimizer_and_loader_resumes_exactly_and_exports_to_transformers(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    straight, logits = run_distributed(_train_and_save, 2, out, 4, None, timeout_s=180)[0]
    saved = json.loads((tmp_path / "run" / "global_step2" / "manifest.json").read_text())
    assert saved["step"] == 2 and saved["run_state"]["loader"], "the loader position is in the manifest"
    assert not any(p.name.startswith(".") for p in (tmp_path / "run").iterdir()), "the export's staging is gone"
    resumed, _ = run_distributed(_train_and_save, 2, out, 4, out, timeout_s=180)[0]
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)

    import transformers  # in the test extra: the export must load where users load it

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", dtype=torch.float32)
    with torch.no_grad():
        expected = hf(input_ids=PROBE).logits
    torch.testing.assert_close(logits[..., : expected.shape[-1]], expected, rtol=1e-4, atol=1e-4)
    at_step_2 = run_distributed(_logits_after_load, 1, str(tmp_path / "run"), PROBE, timeout_s=120)[0]
    assert not torch.allclose(at_step_2, logits, atol=1e-3), "the step-2 checkpoint loaded: other weights than step 4"


def _logits_after_load(checkpoint: str, tokens: torch.Tensor) -> torch.Tensor:
    _fresh_world()
    from scaling.llama import LlamaTiny

    model = LlamaTiny(zero_stage=0, precision="fp32", seed=99)  # other initial weights: the load must replace them
    model.load(checkpoint)
    with torch.no_grad():
        return model({"input_ids": tokens}).float()


def test_a_saved_model_generates_with_scaling_generate(tmp_path: Path) -> None:
    run_distributed(_save_once, 2, str(tmp_path / "ckpt"), timeout_s=120)
    done = subprocess.run(
        [sys.executable, "-m", "scaling.cli.main", "generate", str(tmp_path / "ckpt"), "--prompt", "Reverse: alpha",
         "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Reverse: alpha" in done.stdout


def _save_once(out: str) -> None:
    _fresh_world()
    from scaling.llama import LlamaTiny

    LlamaTiny(zero_stage=3, precision="fp32").save(out)


# What a plain loop refuses, before any process group or memory ---------------------------------------------
def test_pipeline_parallelism_points_to_scaling_train() -> None:
    from scaling.llama import LlamaTiny

    with pytest.raises(ValueError, match="scaling train"):
        LlamaTiny(pp=2)


def test_unknown_precision_and_stage_name_what_is_allowed() -> None:
    from scaling.llama import LlamaTiny

    with pytest.raises(ValueError, match="zero_stage=4"):
        LlamaTiny(zero_stage=4)
    with pytest.raises(ValueError, match="bf16"):
        LlamaTiny(precision="int8", device="meta")


def test_fast_attn_without_flash_attn_says_what_to_install() -> None:
    import importlib.util

    from scaling.llama import LlamaTiny

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here: the message is for machines without it")
    with pytest.raises(ImportError, match="flash-attn"):
        LlamaTiny(fast_attn=True, device="meta")


def test_llama70b_on_the_meta_device_has_the_real_parameter_count_and_no_memory() -> None:
    from scaling.llama import Llama70b
    from scaling.transformer.presets import parameter_count

    model = Llama70b(zero_stage=3, precision="bf16", device="meta")
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 68_976_648_192 == parameter_count(model.architecture)
    assert all(p.is_meta for p in params)


def _push(staging: str) -> tuple[str, dict[str, Any]]:
    _fresh_world()
    import scaling.transformer.convert.hub as hub
    from scaling.llama import LlamaTiny

    seen: dict[str, Any] = {}

    def fake_push(folder: Any, repo_id: str, *, token: Any = None, private: bool = True) -> str:
        seen.update(repo_id=repo_id, private=private, files=sorted(p.name for p in Path(folder).iterdir()))
        return f"https://hub.invalid/{repo_id}/commit/1"

    hub.push_to_hub = fake_push  # type: ignore[assignment]  # the upload itself needs the network
    url = LlamaTiny(zero_stage=3, precision="fp32").push_to_hub("me/alpaca-tiny", staging_dir=staging)
    return url, seen


def test_push_to_hub_uploads_an_exported_folder_and_cleans_up(tmp_path: Path) -> None:
    url, seen = run_distributed(_push, 2, str(tmp_path), timeout_s=120)[0]
    assert url.endswith("me/alpaca-tiny/commit/1")
    assert seen["repo_id"] == "me/alpaca-tiny" and seen["private"] is True
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(seen["files"])
    assert list(tmp_path.iterdir()) == [], "the staged export and its checkpoint are removed"
