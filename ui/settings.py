"""Every limit and default of the studio in one place (the engine's own checks stay in mosaic_core).

The slider ranges are the UI's choice; the engine accepts wider ones (M in (0, 1), any
finite λ, 1..T steps), and the `plan` API endpoint passes values straight to the engine so
that its error messages are what an API caller sees.
"""

from __future__ import annotations

import os
from pathlib import Path

from mosaic_core.divide.allocation import MAX_SPARSITY
from mosaic_core.divide.plan import DEFAULT_LAM, DEFAULT_STEPS
from mosaic_core.divide.stages import DEFAULT_M, M_RANGE, M_STEP
from mosaic_core.models.registry import DEFAULT_MODEL, PROJECT_ROOT
from mosaic_core.models.samplers import DEFAULT_SCHEDULER, SCHEDULERS
from mosaic_core.requests import ONLY_STAGE_CHOICES

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
M_RANGE = M_RANGE  # the engine's studio range and step (mosaic_core.divide.stages)
M_STEP = M_STEP
M_DEFAULT = DEFAULT_M
LAM_RANGE = (0.0, 0.05)
LAM_STEP = 0.001
LAM_DEFAULT = DEFAULT_LAM
CX_DEFAULT = 1.0  # docs/method.md §1 fallback; the model's measured c_x is offered beside it

# Sparsity.
SPARSITY_RANGE = (0.0, MAX_SPARSITY)
SPARSITY_STEP = 0.01
SPARSITY_DEFAULT = 0.3

# Prune (calibration images per stage; the engine allows 1..8192, the studio keeps jobs short).
# The choice lists mirror mosaic_core.prune.calibration / .pruning (which import torch; this module
# stays light) and the engine validates them again.
CALIBRATION_MODES = ("snr", "random", "clean")  # snr is MosaicDiff; random and clean are ablations
CALIBRATION_MODE_DEFAULT = "snr"
CALIBRATION_SIZE_RANGE = (16, 1024)
CALIBRATION_SIZE_STEP = 16
CALIBRATION_SIZE_DEFAULT = 256
SCORERS = ("obs", "magnitude")
SCORER_DEFAULT = "obs"
ALLOCATIONS = ("measured", "paper", "per-block")  # prune --allocation (paper = per-stage)
ALLOCATION_DEFAULT = "measured"
TUNE_BUDGET_RANGE = (0.1, 1.0)  # fraction of the dense MACs at the plan's steps ("best at this budget")
TUNE_BUDGET_DEFAULT = 0.5
TUNE_IMAGES = 4
# what the studio's controls can run (its Compare has no block reuse; the CLI's `tune` tries cache too);
# the two drop methods only with DDIM (the Dropped steps box replays them)
TUNE_METHODS = ("dense", "paper", "measured", "drop", "measured+drop")
# A time bound on a re-tune's checking (`tune(check_seconds=...)`); None: none. 3 s keeps every re-tune
# under 3 s on the 2-core CPU but cost 1.24 dB at budget 0.7, where the second look finds the best
# point (assets/bench/retune-3s.md), so the studio checks unbounded.
TUNE_CHECK_SECONDS = None
CACHE_DIR_ENV = "MOSAIC_CACHE_DIR"  # pruned checkpoints and Hessians; default <project>/cache
PRUNED_IN_MEMORY = 4  # pruned staged models kept loaded (the rest reload from the cache)

# Background jobs: how often the progress bars poll the job runner, and its limits (ui/jobs.py).
JOB_POLL_SECONDS = 0.5
JOB_QUEUE_MAX = 32  # jobs waiting behind the running one; one more is answered "busy, try again"
JOBS_PER_SESSION = 4  # queued + running jobs of one browser tab / gradio_client session
JOB_RESULTS_PER_SESSION = 16  # finished jobs kept per session (another session cannot push them out)
JOB_SESSIONS_KEPT = 512  # sessions whose finished jobs are kept (least recently active forgotten first)
EVENT_QUEUE_MAX = 256  # gradio's own queue of events (clicks, API calls) waiting for a worker
TRAJECTORY_WAIT_SECONDS = 600  # the blocking `trajectory` endpoint waits this long for its job

# Local model folders (a path typed as the model): allowed under these roots only.
LOCAL_MODEL_ROOTS_ENV = "MOSAIC_LOCAL_MODEL_ROOTS"  # os.pathsep-separated folders; empty = none
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# Compare (count, repeats: the studio's limits; cfg: the slider's range, the engine accepts [0, 20]).
COMPARE_LABELS_DEFAULT = "0-9"
COMPARE_PROMPTS_DEFAULT = "an old lighthouse at sunrise, watercolor painting"  # text-to-image models (one per line)
COMPARE_PROMPT_LINES = 3  # rows of the prompt box
COMPARE_COUNT_RANGE = (1, 64)
COMPARE_COUNT_DEFAULT = 10
COMPARE_SEED_DEFAULT = 0
CFG_RANGE = (0.0, 10.0)
CFG_DEFAULT = 1.25  # digits-dit's measured best (registry default_cfg)
CFG_STEP = 0.1
REPEATS_RANGE = (1, 5)
REPEATS_DEFAULT = 1  # interactive; more runs give a CPU floor (Σ of each step's least time), as `bench` uses
STAGE_ONLY_CHOICES = ONLY_STAGE_CHOICES  # the request's own choices (mosaic_core.requests)
GALLERY_PIXELS = 96  # small images are upscaled (nearest) to about this size
GALLERY_COLUMNS = 5

# Teaching panel: the model's own trajectory (a few images, dense sampling run).
TRAJECTORY_IMAGES = 4
TRAJECTORY_SEED = 0
TRAJECTORY_CACHE_SIZE = 16
CURVE_CACHE_SIZE = 64  # importance-score curves (per schedule, λ, c_x)

# Charts.
SCHEDULE_HEIGHT = 430
SMALL_CHART_HEIGHT = 270
STAGE_COLORS = {"early": "#4C78A8", "middle": "#E45756", "late": "#54A24B"}
TERM_COLORS = {"grad": "#9C755F", "snr": "#B279A2", "score": "#222222"}
THRESHOLD_COLOR = "#F58518"
EDGE_COLOR = "#6B4C9A"  # the draggable stage-edge lines of the schedule chart
HISTORY_HEIGHT = 340
VARIANT_COLORS = {"all stages": "#222222", "early only": "#4C78A8", "middle only": "#E45756", "late only": "#54A24B"}


def cache_dir() -> Path:
    """Where pruned checkpoints and Hessians are cached: $MOSAIC_CACHE_DIR, else <project>/cache."""
    return Path(os.environ.get(CACHE_DIR_ENV) or PROJECT_ROOT / "cache")


def local_model_roots(server_name: str = SERVER_NAME) -> tuple[Path, ...]:
    """Folders under which a local model folder may be opened.

    $MOSAIC_LOCAL_MODEL_ROOTS when set (os.pathsep-separated; empty: none). Otherwise every
    folder when the server binds to the loopback interface only (one user, their own
    machine), and none when it is served to others: the built-in and registry models
    always work.
    """
    configured = os.environ.get(LOCAL_MODEL_ROOTS_ENV)
    if configured is not None:
        return tuple(Path(part).expanduser() for part in configured.split(os.pathsep) if part.strip())
    return (Path("/"),) if server_name in LOCAL_HOSTS else ()
