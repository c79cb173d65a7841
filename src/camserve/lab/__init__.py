"""The lab: evaluation and benchmarks over the engine's public API (camserve evaluate, evaluate-faithfulness, evaluate-embedding, bench)."""
