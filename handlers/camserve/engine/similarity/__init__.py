"""Similarity explanation for embedding models: the embedding wrapper, FAM and galleries."""
