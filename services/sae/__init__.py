"""Sparse autoencoders on hidden states: training per layer (`train`), later detection."""
