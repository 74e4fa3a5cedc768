"""Inference: checkpoints from any layout, KV-cache generation equal to full recomputation, left padding,
sampling controls, stop conditions, streaming, scoring, embeddings, adapters, tensor-parallel ranks, CLI.

A failure in the cache tests points at the model's cache path (``model/transformer.py``, ``Attention`` with
``CacheSlots``; ``test_inference_equals_model.py`` narrows it down) or the driver (``inference/decoder.py``);
in the layout tests at loading (``inference/loading.py``) or at the checkpoint format itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from scaling.core.checkpoint import save_checkpoint
from scaling.core.pipeline.module import ParallelModule
from scaling.core.testing import run_distributed
from scaling.core.topology import Topology, TopologyConfig
from scaling.transformer.finetuning.apply import finetuning_adapter
from scaling.transformer.finetuning.config import FinetuningConfig
from scaling.transformer.inference import (
    GenerationConfig,
    InferenceModel,
    embed,
    generate,
    inference_topology,
    load_model,
    score,
)
from scaling.transformer.inference.sampling import apply_repetition_penalty, next_tokens
from scaling.transformer.model.config import TransformerArchitectureConfig
from scaling.transformer.model.layers import LanguageModelLoss, transformer_layer_specs

REPO = Path(__file__).resolve().parents[2]
VOCAB = 60
ARCH = {
    "vocab_size": VOCAB, "vocab_multiple": 16, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
    "num_kv_heads": 2, "intermediate_size": 64, "weight_tying": False, "sequence_length": 128,
}  # fmt: skip
PROMPTS = [[3, 14, 15, 9, 26, 5], [35, 8], [9, 7, 9, 3]]
NEW = 32


def _module(topo: Topology, arch: dict[str, Any], finetuning: dict[str, Any] | None = None) -> ParallelModule:
    config = TransformerArchitectureConfig.from_dict(arch)
    adapt = finetuning_adapter(FinetuningConfig.from_dict(finetuning), topo) if finetuning else None
    module = ParallelModule(transformer_layer_specs(config, topo, seed=5), topo, LanguageModelLoss(topo), adapt=adapt)
    with torch.no_grad():  # weights with more spread than the init, so greedy decoding does not just echo
        for p in module.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return module


def _run_config(arch: dict[str, Any], finetuning: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"architecture": arch, "finetuning": finetuning}


def _training_logits(module: ParallelModule, tokens: torch.Tensor) -> torch.Tensor:
    """What the training layers compute for ``tokens`` (one stage holds them all)."""
    module.eval()
    x: Any = {"tokens": tokens}
    with torch.no_grad():
        for key in sorted(module.layers.keys(), key=int):
            x = module.layers[key](x)
    return x[..., :VOCAB]


# One process: everything that needs no other rank, checked inside one spawned world ----------------------
def _single_process(directory: str) -> dict[str, Any]:
    topo = inference_topology()
    module = _module(topo, ARCH)
    save_checkpoint(directory, 3, module, config=_run_config(ARCH))
    model = InferenceModel(load_model(directory, topology=topo))
    out: dict[str, Any] = {}
    tokens = torch.tensor([PROMPTS[0] * 4])
    out["full_logits"] = model.forward(tokens)
    out["training_logits"] = _training_logits(module, tokens)

    # Incremental decoding through the cache: one prefill of 5 tokens, then token by token.
    cache = model.new_cache(1, tokens.shape[1])
    valid = torch.ones(1, tokens.shape[1], dtype=torch.bool)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    steps = [model.forward(tokens[:, :5], positions[:, :5], valid[:, :5], cache, 0)]
    for t in range(5, tokens.shape[1]):
        steps.append(model.forward(tokens[:, t : t + 1], positions[:, t : t + 1], valid[:, : t + 1], cache, t))
    out["cached_logits"] = torch.cat(steps, dim=1)

    greedy = GenerationConfig(max_new_tokens=NEW)
    out["cached"] = [c.tokens for c in generate(model, PROMPTS, greedy)]
    out["uncached"] = [c.tokens for c in generate(model, PROMPTS, greedy.model_copy(update={"use_cache": False}))]
    out["alone"] = [generate(model, [p], greedy)[0].tokens for p in PROMPTS]

    sampled = greedy.model_copy(update={"temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 7})
    out["sampled"] = [c.tokens for c in generate(model, PROMPTS, sampled)]
    out["sampled_again"] = [c.tokens for c in generate(model, PROMPTS, sampled)]
    out["sampled_other_seed"] = [c.tokens for c in generate(model, PROMPTS, sampled.model_copy(update={"seed": 8}))]
    top1 = greedy.model_copy(update={"temperature": 1.5, "top_k": 1, "seed": 3})
    out["top_k_1"] = [c.tokens for c in generate(model, PROMPTS, top1)]
    repeat = greedy.model_copy(update={"repetition_penalty": 100.0})
    out["penalised"] = [c.tokens for c in generate(model, PROMPTS[:1], repeat)]

    stop = out["cached"][0][4]
    first_stop = out["cached"][0].index(stop)
    stopped = generate(model, PROMPTS[:1], greedy.model_copy(update={"stop_tokens": [stop]}))[0]
    out["stopped"] = (stopped.tokens, stopped.finish_reason, first_stop)
    streamed: list[tuple[int, int]] = []
    generate(model, PROMPTS, greedy, on_token=lambda row, token: streamed.append((row, token)))
    out["streamed"] = streamed

    completions = [c[:5] for c in out["cached"]]
    out["scores"] = [(s.token_logprobs, s.greedy, s.logprob) for s in score(model, PROMPTS, completions)]
    full = model.forward(torch.tensor([PROMPTS[0] + completions[0]])).log_softmax(-1)[0]
    n = len(PROMPTS[0])
    out["manual_score"] = sum(float(full[n - 1 + i, t]) for i, t in enumerate(completions[0]))
    out["embeddings"] = embed(model, PROMPTS)
    alone = model.hidden_states(torch.tensor([PROMPTS[1]]), torch.arange(2).unsqueeze(0), torch.ones(1, 2).bool())
    out["embedding_alone"] = alone.mean(dim=1)[0]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("single") / "checkpoints"
    return run_distributed(_single_process, 1, str(directory), timeout_s=120)[0]  # type: ignore[no-any-return]


@pytest.mark.timeout(180)
def test_loaded_checkpoint_computes_the_training_logits(single: dict[str, Any]) -> None:
    torch.testing.assert_close(single["full_logits"], single["training_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(180)
def test_kv_cache_decoding_equals_full_recomputation(single: dict[str, Any]) -> None:
    torch.testing.assert_close(single["cached_logits"], single["full_logits"], rtol=1e-5, atol=1e-5)
    assert single["cached"] == single["uncached"]
    assert all(len(tokens) == NEW for tokens in single["cached"])
    assert len({tuple(t) for t in single["cached"]}) == len(PROMPTS)  # not a degenerate echo


@pytest.mark.timeout(180)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(single: dict[str, Any]) -> None:
    assert single["cached"] == single["alone"]


@pytest.mark.timeout(180)
def test_sampling_is_seeded_and_controlled(single: dict[str, Any]) -> None:
    assert single["sampled"] == single["sampled_again"]
    assert single["sampled"] != single["sampled_other_seed"]
    assert single["sampled"] != single["cached"]
    assert single["top_k_1"] == single["cached"]  # top-k 1 leaves only the argmax, whatever the temperature
    assert len(set(single["penalised"][0])) > len(set(single["cached"][0]))


@pytest.mark.timeout(180)
def test_stop_tokens_and_streaming(single: dict[str, Any]) -> None:
    tokens, reason, first = single["stopped"]
    assert reason == "stop_token" and tokens == single["cached"][0][: first + 1]
    for row, expected in enumerate(single["cached"]):
        assert [t for r, t in single["streamed"] if r == row] == expected


@pytest.mark.timeout(180)
def test_scores_and_embeddings(single: dict[str, Any]) -> None:
    scores = single["scores"]
    assert all(greedy for _, greedy, _ in scores)  # the completions were generated greedily
    assert scores[0][2] == pytest.approx(single["manual_score"], rel=1e-5)
    assert all(lp < 0 for logprobs, _, _ in scores for lp in logprobs)
    torch.testing.assert_close(single["embeddings"][1], single["embedding_alone"], rtol=1e-5, atol=1e-5)


def test_sampling_functions_against_closed_form() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 2.0), expected)
    assert next_tokens(logits).item() == 3
    g = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 3}  # only the two largest survive top-k 2
    g = torch.Generator().manual_seed(0)
    draws = {int(next_tokens(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert draws == {3}  # p(3) = 0.64 already holds the mass 0.5


# Layouts: a checkpoint written on (tp=2, pp=2) generates the one-process tokens, in one process and on tp=2 --
def _save_on_layout(directory: str, layout: dict[str, int]) -> None:
    topo = Topology(TopologyConfig(**layout))
    save_checkpoint(directory, 1, _module(topo, ARCH), config=_run_config(ARCH))


def _reference_tokens(directory: str) -> list[list[int]]:
    topo = inference_topology()
    save_checkpoint(directory, 1, _module(topo, ARCH), config=_run_config(ARCH))
    model = InferenceModel(load_model(directory, topology=topo))
    return [c.tokens for c in generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW))]


def _tokens_from(directory: str) -> list[list[int]]:
    model = InferenceModel(load_model(directory, topology=inference_topology()))
    return [c.tokens for c in generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW))]


@pytest.mark.timeout(240)
def test_checkpoint_from_tp2_pp2_generates_the_single_process_tokens(tmp_path: Path) -> None:
    saved = str(tmp_path / "tp2pp2")
    run_distributed(_save_on_layout, 4, saved, {"model_parallel_size": 2, "pipe_parallel_size": 2}, timeout_s=120)
    reference = run_distributed(_reference_tokens, 1, str(tmp_path / "one"), timeout_s=120)[0]
    assert run_distributed(_tokens_from, 1, saved, timeout_s=120)[0] == reference
    on_two_ranks = run_distributed(_tokens_from, 2, saved, timeout_s=120)  # tensor-parallel inference ranks
    assert on_two_ranks[0] == reference and on_two_ranks[1] == reference


# Adapters: an adapter checkpoint on top of its base gives the finetuned model's logits ------------------
FINETUNING = {"lora": {"rank": 4, "alpha": 8.0, "targets": ["query", "dense", "up"]},
              "adapters": {"bottleneck": 4}, "soft_prompt": {"tokens": 3}}  # fmt: skip


def _adapters(base_dir: str, adapter_dir: str) -> dict[str, Any]:
    topo = inference_topology()
    base = _module(topo, ARCH)
    save_checkpoint(base_dir, 1, base, config=_run_config(ARCH))
    tuned = _module(topo, ARCH, FINETUNING)
    with torch.no_grad():  # as if trained: LoRA B and adapter "up" start at zero
        for name, p in tuned.named_parameters_canonical():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    save_checkpoint(adapter_dir, 2, tuned, config=_run_config(ARCH, FINETUNING), weights="trainable")
    tokens = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    expected = _training_logits(tuned, tokens)
    model = InferenceModel(load_model(base_dir, adapters=adapter_dir, topology=topo))
    greedy = GenerationConfig(max_new_tokens=12)
    return {
        "expected": expected,
        "loaded": model.forward(tokens),
        "base": _training_logits(base, tokens),
        "cached": [c.tokens for c in generate(model, PROMPTS, greedy)],
        "uncached": [c.tokens for c in generate(model, PROMPTS, greedy.model_copy(update={"use_cache": False}))],
        "alone": [generate(model, [p], greedy)[0].tokens for p in PROMPTS],
    }


@pytest.mark.timeout(180)
def test_adapter_checkpoint_loads_on_top_of_its_base(tmp_path: Path) -> None:
    result = run_distributed(_adapters, 1, str(tmp_path / "base"), str(tmp_path / "adapter"), timeout_s=120)[0]
    torch.testing.assert_close(result["loaded"], result["expected"], rtol=1e-5, atol=1e-5)  # LoRA merged
    assert not torch.allclose(result["loaded"], result["base"], atol=1e-3)  # the adapters do change the model
    assert result["cached"] == result["uncached"] == result["alone"]  # soft prompt and padding with the cache


# Command line -------------------------------------------------------------------------------------------
def _tokenizer_file(path: Path) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<|endoftext|>": VOCAB - 2, "<pad>": VOCAB - 1}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def _save_with_tokenizer(directory: str, tokenizer: str) -> None:
    topo = inference_topology()
    save_checkpoint(directory, 4, _module(topo, ARCH), config=_run_config(ARCH), files={"tokenizer.json": tokenizer})


def _stop_strings(directory: str) -> dict[str, Any]:
    model = InferenceModel(load_model(directory, topology=inference_topology()))
    assert model.tokenizer is not None  # carried inside the checkpoint
    greedy = GenerationConfig(max_new_tokens=NEW)
    free = generate(model, PROMPTS[:1], greedy)[0]
    stop = f"w{free.tokens[3]}" if free.tokens[3] < VOCAB - 2 else "w"
    stopped = generate(model, PROMPTS[:1], greedy.model_copy(update={"stop_strings": [stop]}))[0]
    return {"free": (free.tokens, free.text), "stopped": (stopped.tokens, stopped.text, stopped.finish_reason),
            "stop": stop}  # fmt: skip


@pytest.mark.timeout(240)
def test_stop_strings_end_generation_and_are_cut_from_the_text(tmp_path: Path) -> None:
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    run_distributed(_save_with_tokenizer, 1, str(tmp_path / "ckpt"), str(tokenizer), timeout_s=120)
    result = run_distributed(_stop_strings, 1, str(tmp_path / "ckpt"), timeout_s=120)[0]
    free_tokens, free_text = result["free"]
    tokens, text, reason = result["stopped"]
    assert reason == "stop_string"
    assert tokens == free_tokens[: len(tokens)] and len(tokens) <= 4  # stopped at the token that completed it
    assert result["stop"] not in text and free_text.startswith(text)


@pytest.mark.timeout(240)
def test_scaling_generate_prints_the_completion(tmp_path: Path) -> None:
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    run_distributed(_save_with_tokenizer, 1, str(tmp_path / "ckpt"), str(tokenizer), timeout_s=120)
    reference = run_distributed(_tokens_from, 1, str(tmp_path / "ckpt"), timeout_s=120)[0]
    prompt = " ".join(f"w{t}" for t in PROMPTS[0])
    command = [sys.executable, "-m", "scaling.cli.main", "generate", str(tmp_path / "ckpt"), "--prompt", prompt,
               "--max-new-tokens", str(NEW), "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr
    expected = " ".join(f"w{t}" for t in reference[0] if t < VOCAB - 2)
    stop = reference[0].index(VOCAB - 2) if VOCAB - 2 in reference[0] else None
    if stop is not None:  # the tokenizer's end-of-text stops generation
        expected = " ".join(f"w{t}" for t in reference[0][:stop])
    assert expected in result.stdout and result.stdout.startswith(prompt)
    on_two_ranks = subprocess.run([*command, "--tensor-parallel", "2"], cwd=REPO, capture_output=True, text=True,
                                  timeout=200)  # fmt: skip
    assert on_two_ranks.returncode == 0, on_two_ranks.stderr[-3000:]
    assert on_two_ranks.stdout == result.stdout  # launched tensor-parallel ranks; the first one prints

    missing = subprocess.run(
        [sys.executable, "-m", "scaling.cli.main", "generate", str(tmp_path / "nothing"), "--prompt", "w1"],
        cwd=REPO, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr and "Traceback" not in missing.stderr


# Hugging Face: the converted model generates what transformers' own greedy generate does -----------------
def _hf_generation(hf_dir: str, out_dir: str) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from scaling.transformer.convert import from_huggingface

    from_huggingface(hf_dir, out_dir)
    model = InferenceModel(load_model(out_dir, topology=inference_topology()))
    reference = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    ours, theirs = [], []
    for prompt in PROMPTS:
        ours.append(generate(model, [prompt], GenerationConfig(max_new_tokens=NEW))[0].tokens)
        with torch.inference_mode():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        theirs.append(out[0, len(prompt) :].tolist())
    batched = [c.tokens for c in generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW))]
    return {"ours": ours, "theirs": theirs, "batched": batched}


@pytest.mark.timeout(240)
def test_greedy_generation_equals_transformers_generate(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.2, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    result = run_distributed(_hf_generation, 1, str(tmp_path / "hf"), str(tmp_path / "converted"), timeout_s=180)[0]
    assert result["ours"] == result["theirs"]
    assert result["batched"] == result["ours"]  # left padding in a batch changes nothing
    assert all(len(set(tokens)) > 3 for tokens in result["ours"])  # a real continuation, not one repeated token


def test_scaling_generate_names_a_bad_option(capsys: pytest.CaptureFixture[str]) -> None:
    from scaling.transformer.inference.cli import main

    assert main(["unused", "--prompt", "w1", "--top-p", "0", "--max-new-tokens", "0"]) == 2  # before any loading
    err = capsys.readouterr().err
    assert "--top-p: Input should be greater than 0" in err and "--max-new-tokens:" in err
