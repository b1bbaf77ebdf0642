"""The Gradio studio of MosaicDiff: builders that take a `StudioEngine` (ui.engine) and return Blocks.

Depends on mosaic_core; mosaic_core never imports this package.
"""
