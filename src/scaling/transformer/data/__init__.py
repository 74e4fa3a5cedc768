"""Tokenizer and data preparation for the transformer suite."""
