"""Data: dataset protocol, memory-mapped tokens, blended datasets, the distributed resumable loader."""

from scaling.core.data.blended import BlendedDataset, blend_index, weights_by_size
from scaling.core.data.dataset import Dataset
from scaling.core.data.loader import DistributedDataLoader, broadcast_pytree
from scaling.core.data.memory_map import (
    DataFileError,
    MemoryMapDataset,
    MemoryMapWriter,
    TokenWindowDataset,
    token_dtype_for,
)

__all__ = [
    "BlendedDataset",
    "DataFileError",
    "Dataset",
    "DistributedDataLoader",
    "MemoryMapDataset",
    "MemoryMapWriter",
    "TokenWindowDataset",
    "blend_index",
    "broadcast_pytree",
    "token_dtype_for",
    "weights_by_size",
]
