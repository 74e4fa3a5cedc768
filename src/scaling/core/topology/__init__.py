"""The data x pipeline x tensor parallel layout: pure rank math, process groups, device, RNG streams."""

from scaling.core.topology.config import ActivationCheckpointingType, PipePartitionMethod, TopologyConfig
from scaling.core.topology.device import DeviceChoice, choose_device
from scaling.core.topology.rank_math import Coord, ParallelSizes, coord_of, rank_of
from scaling.core.topology.rng import RngTracker, seed_for
from scaling.core.topology.topology import Topology, init_distributed, shutdown_distributed

__all__ = [
    "ActivationCheckpointingType",
    "Coord",
    "DeviceChoice",
    "ParallelSizes",
    "PipePartitionMethod",
    "RngTracker",
    "Topology",
    "TopologyConfig",
    "choose_device",
    "coord_of",
    "init_distributed",
    "rank_of",
    "seed_for",
    "shutdown_distributed",
]
