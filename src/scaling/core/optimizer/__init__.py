"""Optimizer: AdamW as a torch.optim.Optimizer over named parameters at any ZeRO stage, with fp32 masters,
loss scaling, clipping and learning-rate schedules."""
