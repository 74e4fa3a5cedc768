"""Package exports that import their home module on first use (PEP 562 ``__getattr__``).

A package ``__init__`` that imported its whole public API eagerly would make ``import scaling.core.config``
load torch.distributed, the pipeline and the trainer, and would create import cycles between sibling
submodules. With these hooks, ``from scaling.core import Trainer`` imports ``scaling.core.trainer`` then.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, namespace: dict[str, Any], home_of: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``; ``home_of``: public name -> defining module."""

    def get(name: str) -> Any:
        home = home_of.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value  # later look-ups do not come here again
        return value

    def listing() -> list[str]:
        return sorted({*namespace, *home_of})

    return get, listing
