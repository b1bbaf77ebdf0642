"""Every size-bearing input's bound, in one place that the CLI, the Python API and the studio share.

Values are checked *while they are parsed*, never after something of their size was built:
a label list such as `0-9999,0-9999,…` is refused at the token that crosses `MAX_IMAGES`,
before the ids exist. Each check raises `ValueError` naming the parameter, what was given
and what is allowed.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_IMAGES = 4096  # images in one sampling / comparison call (sampling.MAX_BATCH)
MAX_SAMPLE_IMAGES = 100_000  # images of one `sample` run (FID at scale: 50k; held in memory until written)
MAX_STEPS = 1000  # sampler steps (at most T)
MAX_CALIBRATION_SIZE = 8192  # clean calibration images per stage
MAX_REPEATS = 20  # timed repeats of a comparison / bench
MAX_SEED = 2**31 - 1
MAX_NAME_LENGTH = 512  # a model name or folder path
MAX_TEXT_LENGTH = 4096  # a label list, a prompt, any other free text
MAX_LABEL_TOKENS = 4096
MAX_PROMPTS = 256  # prompts in one list (a comparison repeats them to its image count)
MAX_PROMPT_LENGTH = 1000  # characters of one prompt or negative prompt (CLIP reads 77 tokens, the rest is cut)
MAX_TRAIN_STEPS = 1_000_000  # optimizer steps of `train`
MAX_PATH_LENGTH = 4096  # an output file or folder path
MAX_TRAIN_TIMESTEPS = 100_000  # T of a local model's scheduler config (the schedule arrays are T long)
MAX_CONFIG_BYTES = 1 << 20  # a local model's JSON config files are read only up to this size
MIN_METRIC_IMAGES = 2  # Fréchet distance fits a covariance: at least two images

# Caches (mosaic_core.prune.cache): bytes on disk under cache/, bytes of Hessians held in memory.
CACHE_MAX_BYTES_ENV = "MOSAIC_CACHE_MAX_BYTES"
DEFAULT_CACHE_MAX_BYTES = 2 << 30  # 2 GiB: ~20 digits-dit analyses or a few hundred checkpoints
ANALYSIS_MEMORY_BYTES_ENV = "MOSAIC_ANALYSIS_MEMORY_BYTES"
DEFAULT_ANALYSIS_MEMORY_BYTES = 512 << 20  # 512 MiB: ~6 digits-dit stage analyses (87 MB each)
MAX_CACHE_BYTES = 1 << 50

_LABEL_TOKEN = re.compile(r"^\s*(\d{1,7})\s*(?:-\s*(\d{1,7}))?\s*$")


def shown(value: Any, max_length: int = 60) -> str:
    """`repr(value)` cut to `max_length` characters, for error messages (never echo a huge input)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not replace the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= max_length else text[: max_length - 1] + "…"


def check_text(name: str, value: Any, max_length: int = MAX_TEXT_LENGTH) -> str:
    """A string of at most `max_length` characters (no NUL), or ValueError naming `name`."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise ValueError(f"{name} is {len(value)} characters long: at most {max_length} allowed")
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL characters")
    return value


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """A whole number in [low, high] (an integral float is accepted), or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {shown(value)}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {shown(value)}")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {shown(number)}")
    return number


def check_float(name: str, value: Any, low: float, high: float) -> float:
    """A finite number in [low, high], or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {shown(value)}")
    return number


def check_bytes_setting(name: str, value: Any, default: int) -> int:
    """A byte budget from an environment variable's text (None/empty = `default`), or ValueError naming it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    text = check_text(name, str(value), 32).strip()
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of bytes in [0, {MAX_CACHE_BYTES}], got {text!r}") from None
    return check_int(name, number, 0, MAX_CACHE_BYTES)


def parse_int(name: str, text: Any, low: int, high: int) -> int:
    """A command-line integer, checked against [low, high] before anything of its size is built."""
    raw = check_text(name, str(text), 32).strip()
    try:
        number = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {raw!r}") from None
    return check_int(name, number, low, high)


def parse_float(name: str, text: Any, low: float, high: float) -> float:
    """A command-line number, finite and in [low, high]."""
    raw = check_text(name, str(text), 64).strip()
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {raw!r}") from None
    return check_float(name, number, low, high)


def parse_label_list(text: Any, num_classes: int, max_ids: int = MAX_IMAGES) -> list[int]:
    """'0-9', '1,3,5', '0-4, 7' -> class ids, bounded while parsing.

    At most `max_ids` ids in total and ids in 0..num_classes-1; the first token that breaks
    a rule is named in the error, and nothing larger than the limit is ever built.
    """
    text = check_text("class labels", "" if text is None else text)
    tokens = [token.strip() for token in text.replace(";", ",").split(",") if token.strip()]
    if not tokens:
        raise ValueError(f"class labels are empty: give ids like 0-9 or 1,3,5 (allowed 0..{num_classes - 1})")
    if len(tokens) > MAX_LABEL_TOKENS:
        raise ValueError(f"class labels have {len(tokens)} entries: at most {MAX_LABEL_TOKENS} allowed")
    ids: list[int] = []
    for token in tokens:
        match = _LABEL_TOKEN.match(token)
        if match is None:
            raise ValueError(f"class labels must be ids or ranges like 0-9 or 1,3,5, got {token[:40]!r}")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise ValueError(f"a label range must go up (like 2-7), got {token!r}")
        if high >= num_classes:
            raise ValueError(f"class id {high} is out of range: allowed 0..{num_classes - 1}")
        if len(ids) + (high - low + 1) > max_ids:
            raise ValueError(f"class labels name more than {max_ids} images: at most {max_ids} allowed")
        ids.extend(range(low, high + 1))
    return ids


def parse_prompt_list(value: Any, max_prompts: int = MAX_PROMPTS) -> list[str]:
    """Prompts from text (one per line) or a list of strings, bounded while parsing.

    Blank lines are dropped and each prompt is stripped. At most `max_prompts` prompts of at
    most `MAX_PROMPT_LENGTH` characters each; the first one that breaks a rule is named.
    """
    if isinstance(value, str):
        check_text("prompts", value, max_prompts * (MAX_PROMPT_LENGTH + 1))
        items: list[Any] = value.splitlines()
    elif isinstance(value, (list, tuple)):
        if len(value) > max_prompts:
            raise ValueError(f"prompts has {len(value)} entries: at most {max_prompts} allowed")
        items = list(value)
    else:
        raise ValueError(f"prompts must be text (one prompt per line) or a list of strings, got {type(value).__name__}")
    prompts = []
    for index, item in enumerate(items):
        text = check_text(f"prompt {index + 1}", item, MAX_PROMPT_LENGTH).strip()
        if text:
            prompts.append(text)
    if not prompts:
        raise ValueError("prompts are empty: give one prompt per line (a text-to-image model needs at least one)")
    if len(prompts) > max_prompts:
        raise ValueError(f"prompts has {len(prompts)} lines: at most {max_prompts} allowed")
    return prompts


# Ranges of the integer fields of a denoiser config that the engine reads (a hostile config is
# refused before anything is built from it); families add their own fields to these.
TRANSFORMER_CONFIG_INTS = {
    "num_attention_heads": (1, 1024),
    "attention_head_dim": (1, 4096),
    "num_layers": (1, 1024),
    "patch_size": (1, 64),
    "sample_size": (1, 4096),
    "in_channels": (1, 64),
    "out_channels": (1, 128),
}
