"""Rank-aware logging and per-step metrics sinks (JSONL always; TensorBoard, W&B optional)."""

from scaling.core.logging.config import LoggerConfig
from scaling.core.logging.logger import configure_logging, get_logger
from scaling.core.logging.metrics import MetricsLogger, MissingExtraError

__all__ = ["LoggerConfig", "MetricsLogger", "MissingExtraError", "configure_logging", "get_logger"]
