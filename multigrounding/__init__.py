"""multigrounding: weakly supervised phrase grounding from image-caption pairs.

Akbari et al., CVPR 2019: frozen backbones, a feature cache, and lightweight mapping heads.
"""
__version__ = "0.1.0"
