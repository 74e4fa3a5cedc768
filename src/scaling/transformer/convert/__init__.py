"""Hugging Face (Llama family) <-> scaling checkpoints.

``from_huggingface`` turns a Llama or Mistral folder into a checkpoint that trains and resumes on any
layout; ``save_huggingface`` writes any checkpoint (LoRA merged) as a ``LlamaForCausalLM`` folder, and
``push_to_hub`` uploads it. The mapping lives in ``hf_config`` (config fields) and ``hf_weights``
(tensor names and layouts), both pure.
"""

from scaling.transformer.convert.errors import ConversionError
from scaling.transformer.convert.from_hf import from_huggingface
from scaling.transformer.convert.hub import push_to_hub
from scaling.transformer.convert.to_hf import save_huggingface

__all__ = ["ConversionError", "from_huggingface", "push_to_hub", "save_huggingface"]
