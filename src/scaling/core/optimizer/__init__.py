"""Optimizer: AdamW with ZeRO-1 sharding, fp32 master weights, loss scaling, clipping, LR schedules."""
