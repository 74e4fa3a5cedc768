"""Helpers for testing distributed code on CPU: spawn a local gloo world and compare against references."""

from scaling.core.testing.distributed import DistributedTestFailure, DistributedTimeout, run_distributed

__all__ = ["DistributedTestFailure", "DistributedTimeout", "run_distributed"]
