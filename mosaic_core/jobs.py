"""Cooperative cancellation for long engine jobs.

Engine loops (calibration, pruning, sampling, training) poll a `should_stop` callable
between units of work and raise `Cancelled` when it returns True. The UI catches it and
reports "stopped" instead of an error; nothing half-written is left behind because every
writer in the engine is atomic (see `mosaic_core.atomic`).
"""

from __future__ import annotations

from typing import Any, Callable, Generator, TypeVar

Event = TypeVar("Event")


class Cancelled(Exception):
    """Raised by an engine loop when its `should_stop()` returned True."""


def run_to_end(generator: Generator[Any, None, Any], on_event: Callable[[Any], None] | None = None) -> Any:
    """Drive an engine generator to its end, handing each event to `on_event`; return its value."""
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)


def relay(generator: Generator[Any, None, Any], convert: Callable[[Any], Event]) -> Generator[Event, None, Any]:
    """Re-yield an engine generator's events through `convert`, and return its return value.

    `result = yield from relay(inner, to_my_event)` nests one long job inside another
    while the outer job's caller sees its own event type.
    """
    while True:
        try:
            event = next(generator)
        except StopIteration as stop:
            return stop.value
        yield convert(event)
