"""The ``scaling`` command."""

__all__: list[str] = []
