"""The studio's `gr.Blocks`: a header, the Divide section, then one block per later section.

`build_studio(engine, sections)` composes sections. Each later section is a function
`build(engine, divide) -> None` that lays out its own components inside the current Blocks
and reads what it needs from `divide` (a `DivideSection`: `divide.plan_state` holds
`Plan.to_dict()`, `divide.controls` are the model/sampler/M/λ/sparsity inputs). Prune and
Compare are placeholders for now; pass real builders to replace them:

    build_studio(engine, sections=(build_prune_section, build_compare_section))
"""

from __future__ import annotations

from typing import Callable, Sequence

import gradio as gr

from ui import settings
from ui.divide_tab import DivideSection, build_divide_section
from ui.engine import StudioEngine
from ui.frontend import STUDIO_CSS, STUDIO_JS

SectionBuilder = Callable[[StudioEngine, DivideSection], None]

HEADER = f"""
# {settings.TITLE}
Training-free structural pruning of diffusion transformers that follows their pretraining dynamics
(MosaicDiff, ICCV 2025): **divide** the sampling trajectory into early / middle / late stages,
**prune** one sub-network per stage, **conquer** by switching networks at the stage boundaries.
"""


def placeholder_section(title: str, text: str) -> SectionBuilder:
    """A section that only says what will come there."""

    def build(engine: StudioEngine, divide: DivideSection) -> None:
        gr.Markdown(f"## {title}\n*Coming next:* {text}", elem_classes="mosaic-placeholder")

    return build


build_prune_placeholder = placeholder_section(
    "4 · Prune", "a background pruning job per stage (calibration + structured OBS), with progress and cancel."
)
build_compare_placeholder = placeholder_section(
    "5 · Compare", "dense vs staged samples side by side, with measured speed and quality."
)
DEFAULT_SECTIONS: tuple[SectionBuilder, ...] = (build_prune_placeholder, build_compare_placeholder)


def build_studio(engine: StudioEngine, sections: Sequence[SectionBuilder] = DEFAULT_SECTIONS) -> gr.Blocks:
    """The whole studio: header, Divide section, then `sections` in order."""
    with gr.Blocks(title=settings.TITLE) as demo:
        gr.Markdown(HEADER)
        divide = build_divide_section(demo, engine)
        for build in sections:
            build(engine, divide)
    return demo


def studio_theme() -> gr.themes.Base:
    """The default theme with system fonts only (no font download: the studio runs offline)."""
    system = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Default(primary_hue="orange", font=system, font_mono=mono)


def launch_kwargs() -> dict:
    """What `demo.launch` needs besides the address (Gradio 6: theme/css/js go to launch)."""
    return dict(theme=studio_theme(), css=STUDIO_CSS, js=STUDIO_JS, ssr_mode=False, footer_links=["api"])
