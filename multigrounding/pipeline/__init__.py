"""Frozen backbones and text encoders (registries by name) and the dask extraction graph."""
