"""What each sampled image is conditioned on, for any family: class ids or prompts.

A class-conditional model samples class ids; a text-to-image model samples prompts, which its
family adapter embeds (`FamilyAdapter.condition_for`, with an optional negative prompt as
CFG's unconditional branch). Callers that sample many images without naming them (the
benchmark, the trajectory trace) use `default_values`: image i gets class i mod the class
count, or prompt i mod the list in `assets/prompts.txt` — the same image index always gets
the same condition, whatever the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

PROMPTS_FILE = "prompts.txt"  # in assets/: the default prompts of text-to-image models


def read_prompts(path: str | Path | None = None) -> list[str]:
    """The non-blank lines of a prompt file (default `assets/prompts.txt`), stripped, in order."""
    from mosaic_core.models.registry import ASSETS_DIR

    path = Path(path) if path is not None else ASSETS_DIR / PROMPTS_FILE
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path.name} has no prompts: give one prompt per line")
    return prompts


def default_values(spec, num_images: int) -> list:
    """Image i's condition when none is given: class i mod num_classes, or prompt i mod assets/prompts.txt."""
    if spec.conditioning == "text":
        prompts = read_prompts()
        return [prompts[i % len(prompts)] for i in range(num_images)]
    if spec.num_classes < 1:
        raise ValueError(f"model '{spec.name}' has no classes to sample: it conditions on {spec.conditioning}")
    return [i % spec.num_classes for i in range(num_images)]


def conditions_for(loaded, values: Sequence[Any], negative_prompt: str = "") -> Any:
    """What the sampler takes for `values`: class ids as an array, or the family's condition of prompts.

    `negative_prompt` ("" = none) is the unconditional branch of a text model; a class model
    refuses a non-empty one (its adapter's `condition_for` says why).
    """
    if loaded.adapter.conditioning == "text":
        return loaded.adapter.condition_for(loaded, [str(value) for value in values], negative_prompt=negative_prompt or None)
    if negative_prompt and negative_prompt.strip():
        loaded.adapter.condition_for(loaded, values, negative_prompt=negative_prompt)  # raises: no negative for classes
    return np.asarray(values)
