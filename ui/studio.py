"""The studio's `gr.Blocks`: a header, the Divide section, then one block per later section.

`build_studio(engine, sections)` composes sections. Each later section is a function
`build(engine, divide) -> None` that lays out its own components inside the current Blocks
and reads what it needs from `divide` (a `DivideSection`: `divide.plan_state` holds
`Plan.to_dict()`, `divide.controls` are the model/sampler/M/λ/sparsity inputs). The default
is `build_prune_and_compare`: Compare reads the Prune section's calibration controls (they
say which pruned model to compare), so the two are built together.
"""

from __future__ import annotations

from typing import Callable, Sequence

import gradio as gr
from gradio.components.api_component import Api
from gradio.utils import get_function_params

from ui import settings
from ui.compare_tab import COMPARE_CSS, build_compare_section
from ui.divide_tab import DivideSection, build_divide_section
from ui.engine import StudioEngine
from ui.frontend import STUDIO_CSS, STUDIO_JS
from ui.prune_tab import PRUNE_CSS, build_prune_section

SectionBuilder = Callable[[StudioEngine, DivideSection], None]

HEADER = f"""
# {settings.TITLE}
Training-free structural pruning of diffusion transformers that follows their pretraining dynamics
(MosaicDiff, ICCV 2025): **divide** the sampling trajectory into early / middle / late stages,
**prune** one sub-network per stage, **conquer** by switching networks at the stage boundaries.
"""


def build_prune_and_compare(engine: StudioEngine, divide: DivideSection) -> None:
    """Sections 4 and 5: Prune (background job per stage network) and Compare (dense vs staged)."""
    prune = build_prune_section(engine, divide)
    build_compare_section(engine, divide, prune)


DEFAULT_SECTIONS: tuple[SectionBuilder, ...] = (build_prune_and_compare,)


class StudioBlocks(gr.Blocks):
    """`gr.Blocks` whose `gr.api` endpoints accept a call that leaves out trailing parameters with defaults.

    gradio_client fills an omitted parameter's default on the client side, but a plain HTTP
    caller of `/gradio_api/call/<name>` sends a bare list, and gradio refuses one shorter than
    the function's parameters. Endpoints are extended by appending optional parameters
    (`compare_start`'s `prompts`, `negative_prompt`), so a list of the old length is completed
    with those defaults here: old callers keep working, whatever client they use.
    """

    def validate_inputs(self, block_fn, inputs: list) -> None:
        """Complete `inputs` in place with the defaults of missing trailing `gr.api` parameters, then check it."""
        missing = len(block_fn.inputs) - len(inputs)
        if missing > 0 and block_fn.fn is not None and all(isinstance(block, Api) for block in block_fn.inputs):
            params = get_function_params(block_fn.fn)  # how gr.api built its inputs (gr.Request left out)
            tail = params[len(inputs):]
            if len(params) == len(block_fn.inputs) and all(has_default for _, has_default, _, _ in tail):
                inputs.extend(default for _, _, default, _ in tail)
        super().validate_inputs(block_fn, inputs)


def build_studio(engine: StudioEngine, sections: Sequence[SectionBuilder] = DEFAULT_SECTIONS) -> gr.Blocks:
    """The whole studio: header, Divide section, then `sections` in order."""
    with StudioBlocks(title=settings.TITLE) as demo:
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
    return dict(theme=studio_theme(), css=STUDIO_CSS + PRUNE_CSS + COMPARE_CSS, js=STUDIO_JS, ssr_mode=False, footer_links=["api"])
