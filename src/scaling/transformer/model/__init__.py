"""The transformer model: architecture config, RoPE, attention, decoder layers, LM head and loss."""
