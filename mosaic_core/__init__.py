"""mosaic_core: the MosaicDiff engine (Divide, Prune, Conquer) for diffusers DiT models.

Training-free structural pruning of diffusion transformers that follows their pretraining
dynamics (Guo et al., ICCV 2025, arXiv 2510.11962). This package never imports gradio;
nothing heavy happens at import time.
"""

__version__ = "0.1.0"
