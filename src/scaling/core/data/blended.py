"""A dataset drawn from several datasets in fixed proportions, with its sample index cached on disk.

Sample i of the blend is sample ``k`` of dataset ``j``, where ``j`` is the dataset furthest behind its
target share after i samples (deterministic, so every rank and every resumption sees the same order),
and ``k`` counts that dataset's samples so far (wrapping around when it is exhausted).

Weights are given, or derived from dataset sizes: ``temperature`` sampling (weight ∝ size^alpha; alpha=1
proportional, alpha -> 0 uniform) or examples-proportional mixing with a cap (weight ∝ min(size, cap)).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scaling.core.data.dataset import Dataset

__all__ = ["BlendedDataset", "blend_index", "weights_by_size"]


def weights_by_size(sizes: Sequence[int], *, alpha: float | None = None, cap: int | None = None) -> list[float]:
    """Normalised weights from dataset sizes: ``size ** alpha`` or ``min(size, cap)``."""
    if (alpha is None) == (cap is None):
        raise ValueError("give exactly one of alpha (temperature sampling) or cap (examples-proportional)")
    raw = [float(min(s, cap)) for s in sizes] if cap is not None else [float(s) ** (alpha or 0.0) for s in sizes]
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"all datasets are empty: sizes {list(sizes)}")
    return [r / total for r in raw]


def blend_index(weights: Sequence[float], length: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(dataset id, sample number within that dataset) for each of ``length`` blended samples."""
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"blend weights must be non-negative and not all zero, got {list(weights)}")
    w = w / w.sum()
    dataset_ids = np.empty(length, dtype=np.int32)
    sample_ids = np.empty(length, dtype=np.int64)
    counts = np.zeros(len(w), dtype=np.int64)
    for i in range(length):
        j = int(np.argmax(w * (i + 1) - counts))
        dataset_ids[i] = j
        sample_ids[i] = counts[j]
        counts[j] += 1
    return dataset_ids, sample_ids


class BlendedDataset:
    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float],
        length: int,
        cache_dir: str | Path | None = None,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = list(weights)
        self.length = length
        self.cache_path: Path | None = None
        if cache_dir is not None:
            key = json.dumps({"sizes": [len(d) for d in datasets], "weights": self.weights, "length": length})
            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            self.cache_path = Path(cache_dir) / f"blend_{digest}.npz"
        self.dataset_ids, self.sample_ids = self._index()

    def _index(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        if self.cache_path is not None and self.cache_path.is_file():
            with np.load(self.cache_path) as cached:
                return cached["dataset_ids"], cached["sample_ids"]
        dataset_ids, sample_ids = blend_index(self.weights, self.length)
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_name(f"{self.cache_path.stem}.tmp{os.getpid()}.npz")
            np.savez(tmp, dataset_ids=dataset_ids, sample_ids=sample_ids)
            os.replace(tmp, self.cache_path)
        return dataset_ids, sample_ids

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        dataset = self.datasets[int(self.dataset_ids[index])]
        return dataset[int(self.sample_ids[index]) % len(dataset)]

    def collate(self, items: Sequence[Any]) -> Any:
        return self.datasets[0].collate(items)
