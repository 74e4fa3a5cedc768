"""Generation speed: scaling with and without its KV cache, against Hugging Face ``generate``, same weights.

Run: ``python benchmarks/generate.py`` (CPU; ``--device cuda`` on a GPU machine).

A random Llama-style model (GQA, SwiGLU, RoPE, RMSNorm, untied head) is created as a
``transformers.LlamaForCausalLM``, converted with ``scaling convert from-hf``'s function, and loaded by
``scaling.transformer.inference``. For batch 1 and 8, each side greedily generates ``--new-tokens``
tokens (256 by default) after a 32-token prompt; the table gives new tokens per second (all rows), the
speed-up of the cache over full recomputation (target >= 5x at 256 tokens) and scaling over Hugging Face
(target >= 1.0). Greedy tokens of the two libraries are compared too: the same weights must produce the
same text.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scaling.transformer.convert import from_huggingface
from scaling.transformer.inference import GenerationConfig, InferenceModel, generate, inference_topology, load_model

SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
         "intermediate_size": 688, "vocab_size": 4096}  # fmt: skip
PROMPT = 32


def _fastest(fn: Callable[[], list[list[int]]], repeats: int) -> tuple[float, list[list[int]]]:
    """The fastest of ``repeats`` timed calls after a warm-up, and what the call returned."""
    result = fn()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def _scaling(model: InferenceModel, prompts: torch.Tensor, config: GenerationConfig) -> list[list[int]]:
    return [c.tokens for c in generate(model, prompts.tolist(), config)]


def _hugging_face(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    return list(out[:, prompts.shape[1] :].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(**SHAPE, max_position_embeddings=1024, tie_word_embeddings=False)
    hf_model = LlamaForCausalLM(hf_config).eval().to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(Path(tmp) / "hf")
        from_huggingface(Path(tmp) / "hf", Path(tmp) / "scaling")
        loaded = load_model(Path(tmp) / "scaling", topology=inference_topology(device=args.device))
    model = InferenceModel(loaded)
    params = sum(p.numel() for p in hf_model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {args.device}, {torch.get_num_threads()} threads; "
          f"prompt {PROMPT} tokens, {args.new_tokens} new tokens, greedy")  # fmt: skip

    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, SHAPE["vocab_size"], (batch, PROMPT), generator=g)
        config = GenerationConfig(max_new_tokens=args.new_tokens)
        prompts = prompts.to(args.device)
        no_cache = config.model_copy(update={"use_cache": False})
        t_cache, ours = _fastest(lambda p=prompts, c=config: _scaling(model, p, c), args.repeats)
        t_hf, theirs = _fastest(lambda p=prompts: _hugging_face(hf_model, p, args.new_tokens), args.repeats)
        t_none, _ = _fastest(lambda p=prompts, c=no_cache: _scaling(model, p, c), 1)
        new_tokens = batch * args.new_tokens
        same = ours == theirs
        rows.append((batch, new_tokens / t_cache, new_tokens / t_none, new_tokens / t_hf, same))

    print()
    print(f"{'batch':>5} | {'scaling cache':>13} | {'no cache':>9} | {'HF generate':>11} | "
          f"{'cache/no cache':>14} | {'scaling/HF':>10} | same tokens")  # fmt: skip
    print("-" * 96)
    for batch, cache, none, hf, same in rows:
        print(f"{batch:>5} | {cache:>9.1f} t/s | {none:>5.1f} t/s | {hf:>7.1f} t/s | "
              f"{cache / none:>13.1f}x | {cache / hf:>9.2f}x | {'yes' if same else 'NO'}")  # fmt: skip


if __name__ == "__main__":
    main()
