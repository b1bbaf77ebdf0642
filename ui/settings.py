"""Every limit and default of the studio in one place (the engine's own checks stay in mosaic_core).

The slider ranges are the UI's choice; the engine accepts wider ones (M in (0, 1), any
finite λ, 1..T steps), and the `plan` API endpoint passes values straight to the engine so
that its error messages are what an API caller sees.
"""

from __future__ import annotations

import os

from mosaic_core.allocation import MAX_SPARSITY
from mosaic_core.plan import DEFAULT_LAM, DEFAULT_M, DEFAULT_STEPS
from mosaic_core.registry import DEFAULT_MODEL
from mosaic_core.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

# Server (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are gradio's own variables too).
SERVER_NAME = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
SERVER_PORT = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
TITLE = "MosaicDiff Studio"

# Model and sampler.
MODEL_DEFAULT = DEFAULT_MODEL
SAMPLERS = tuple(SCHEDULERS)
SAMPLER_DEFAULT = DEFAULT_SCHEDULER
STEPS_RANGE = (1, 250)
STEPS_DEFAULT = DEFAULT_STEPS

# Divide.
M_RANGE = (0.05, 0.95)
M_STEP = 0.005
M_DEFAULT = DEFAULT_M
LAM_RANGE = (0.0, 0.05)
LAM_STEP = 0.001
LAM_DEFAULT = DEFAULT_LAM
CX_DEFAULT = 1.0  # METHOD §1 fallback; the model's measured c_x is offered beside it

# Sparsity.
SPARSITY_RANGE = (0.0, MAX_SPARSITY)
SPARSITY_STEP = 0.01
SPARSITY_DEFAULT = 0.3

# Teaching panel: the model's own trajectory (a few images, dense sampling run).
TRAJECTORY_IMAGES = 4
TRAJECTORY_SEED = 0
TRAJECTORY_CACHE_SIZE = 16

# Charts.
SCHEDULE_HEIGHT = 430
SMALL_CHART_HEIGHT = 270
STAGE_COLORS = {"early": "#4C78A8", "middle": "#E45756", "late": "#54A24B"}
TERM_COLORS = {"grad": "#9C755F", "snr": "#B279A2", "score": "#222222"}
THRESHOLD_COLOR = "#F58518"
