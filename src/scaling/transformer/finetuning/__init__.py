"""Parameter-efficient finetuning: LoRA, BitFit, bottleneck adapters."""
