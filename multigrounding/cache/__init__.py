"""Zarr stores of cached features: layout, fingerprint, open/verify, batch readers."""
