"""Dataset readers into the grounding manifest, validation, and the synthetic dataset."""
