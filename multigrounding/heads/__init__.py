"""Mapping heads, multi-level attention and scores, losses, the trainer, checkpoints."""
