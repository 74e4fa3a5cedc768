"""``python -m scaling.core.runner CONFIG [-o key.path=value ...] [--dry-run]``: see ``command_line``."""

from __future__ import annotations

from scaling.core.runner.command_line import main

__all__: list[str] = []

raise SystemExit(main())
