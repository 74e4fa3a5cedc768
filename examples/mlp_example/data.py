"""scikit-learn's bundled digits (1797 8x8 images, no download), split 80/20 into train and test."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Digits:
    """Samples {"x": [64] float in [0, 1], "y": label}; satisfies scaling's dataset protocol."""

    def __init__(self, split: str, seed: int = 0) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("the MLP example needs scikit-learn: pip install 'scaling[examples]'") from None
        digits = load_digits()
        order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(order))
        chosen = order[:cut] if split == "train" else order[cut:]
        self.x = torch.tensor(digits.data, dtype=torch.float32)[chosen] / 16.0
        self.y = torch.tensor(digits.target, dtype=torch.int64)[chosen]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index]}

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([i["x"] for i in items]), "y": torch.stack([i["y"] for i in items])}
