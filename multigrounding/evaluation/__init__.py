"""Pointing game, attention correctness, level selection, retrieval; reports and pictures."""
