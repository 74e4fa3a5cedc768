"""Inference: load a checkpoint from any layout, generate with a KV cache, score and embed."""

from scaling.transformer.inference.decoder import InferenceModel, KVCache
from scaling.transformer.inference.generation import Completion, GenerationConfig, generate
from scaling.transformer.inference.loading import LoadedModel, inference_topology, load_model
from scaling.transformer.inference.scoring import ScoredCompletion, embed, score

__all__ = [
    "Completion",
    "GenerationConfig",
    "InferenceModel",
    "KVCache",
    "LoadedModel",
    "ScoredCompletion",
    "embed",
    "generate",
    "inference_topology",
    "load_model",
    "score",
]
