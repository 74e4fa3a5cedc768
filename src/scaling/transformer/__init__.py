"""The LLM suite on scaling.core: the Llama-class model, its data, training, inference and conversion.

``from scaling.transformer import TransformerConfig, load_model, generate`` works; names resolve on first
use (PEP 562), so importing one submodule does not import the whole suite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaling._lazy import lazy_exports

if TYPE_CHECKING:
    from scaling.transformer.config import DataConfig, TransformerConfig
    from scaling.transformer.convert import ConversionError, from_huggingface, push_to_hub, save_huggingface
    from scaling.transformer.data.tokenizer import Tokenizer, TokenizerError
    from scaling.transformer.finetuning.config import FinetuningConfig, LoRAConfig
    from scaling.transformer.inference import (
        GenerationConfig,
        InferenceModel,
        embed,
        generate,
        load_model,
        score,
    )
    from scaling.transformer.model.config import TransformerArchitectureConfig
    from scaling.transformer.model.transformer import Transformer, TransformerOutput
    from scaling.transformer.train import train

# public name -> the module that defines it
_HOME = {
    "TransformerConfig": "scaling.transformer.config",
    "DataConfig": "scaling.transformer.config",
    "TransformerArchitectureConfig": "scaling.transformer.model.config",
    "Transformer": "scaling.transformer.model.transformer",
    "TransformerOutput": "scaling.transformer.model.transformer",
    "FinetuningConfig": "scaling.transformer.finetuning.config",
    "LoRAConfig": "scaling.transformer.finetuning.config",
    "Tokenizer": "scaling.transformer.data.tokenizer",
    "TokenizerError": "scaling.transformer.data.tokenizer",
    "train": "scaling.transformer.train",
    "GenerationConfig": "scaling.transformer.inference",
    "InferenceModel": "scaling.transformer.inference",
    "embed": "scaling.transformer.inference",
    "generate": "scaling.transformer.inference",
    "load_model": "scaling.transformer.inference",
    "score": "scaling.transformer.inference",
    "ConversionError": "scaling.transformer.convert",
    "from_huggingface": "scaling.transformer.convert",
    "push_to_hub": "scaling.transformer.convert",
    "save_huggingface": "scaling.transformer.convert",
}

__all__ = [
    "ConversionError",
    "DataConfig",
    "FinetuningConfig",
    "GenerationConfig",
    "InferenceModel",
    "LoRAConfig",
    "Tokenizer",
    "TokenizerError",
    "Transformer",
    "TransformerArchitectureConfig",
    "TransformerConfig",
    "TransformerOutput",
    "embed",
    "from_huggingface",
    "generate",
    "load_model",
    "push_to_hub",
    "save_huggingface",
    "score",
    "train",
]
assert sorted(_HOME) == __all__  # one entry per public name

__getattr__, __dir__ = lazy_exports("scaling.transformer", globals(), _HOME)
