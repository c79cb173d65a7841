"""Faithfulness metrics: deletion/insertion curves, class sensitivity, sanity checks."""
