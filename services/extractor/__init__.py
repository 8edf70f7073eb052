"""Extractor: hidden states of every layer at every checkpoint, on a fixed probe set."""
