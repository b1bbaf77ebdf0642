"""Cooperative cancellation for long engine jobs.

Engine loops (calibration, pruning, sampling, training) poll a `should_stop` callable
between units of work and raise `Cancelled` when it returns True. The UI catches it and
reports "stopped" instead of an error; nothing half-written is left behind because every
writer in the engine is atomic (see `mosaic_core.atomic`).
"""

from __future__ import annotations


class Cancelled(Exception):
    """Raised by an engine loop when its `should_stop()` returned True."""
