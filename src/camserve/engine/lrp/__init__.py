"""Layer-wise relevance propagation: rules, composites (which rule where), canonizers (BN folding) and the relevance starts (seeds)."""
