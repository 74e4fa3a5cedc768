"""The one error of the converters: the input cannot become the requested output; the message says where."""

from __future__ import annotations

__all__ = ["ConversionError"]


class ConversionError(ValueError):
    """A model folder or checkpoint cannot be converted: unsupported option, missing, unexpected or mis-shaped
    tensor, or an output directory that already holds something. The message names the field, tensor or file."""
