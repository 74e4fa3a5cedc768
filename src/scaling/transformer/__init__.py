"""The LLM suite built on scaling.core (arrives with later issues)."""

__all__: list[str] = []
