"""Similarity explanations for embedding models: FAM and its Grad-CAM baseline, and galleries of references."""
