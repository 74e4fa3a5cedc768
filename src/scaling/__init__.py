"""scaling: a training engine for large models on many accelerators."""

__version__ = "0.1.0"

__all__ = ["__version__"]
