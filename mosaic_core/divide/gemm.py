"""GEMM-friendly kept counts: round a stage's kept MLP units to a multiple the kernels like.

A pruned MLP is two matrix products of inner width u (fc1: D → u, fc2: u → D). BLAS and
GPU kernels tile that width in blocks (8/16/32/64 lanes, tensor-core tiles of 8 or 16), so
an odd width such as 727 pads its last tile and can run slower than the dense 768 it was cut
from (docs/method.md §9). Heads need no rounding of their own: h heads give an inner width
h · head_dim, already a multiple of head_dim. Pure arithmetic: numbers in, numbers out; the
allocation decides what to do with the MACs a rounding adds or frees.
"""

from __future__ import annotations

from dataclasses import dataclass

ROUNDINGS = ("nearest", "down", "up")


def gemm_friendly_units(units_kept: int, mlp_hidden: int, multiple: int = 32, rounding: str = "nearest") -> int:
    """`units_kept` rounded to a multiple of `multiple` (ties down), within [0, mlp_hidden]; the dense width stays."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if isinstance(multiple, bool) or int(multiple) != multiple or not 1 <= multiple <= 4096:
        raise ValueError(f"multiple must be a whole number in [1, 4096], got {multiple!r}")
    if not 0 <= units_kept <= mlp_hidden:
        raise ValueError(f"units_kept must be in [0, {mlp_hidden}], got {units_kept}")
    if units_kept == mlp_hidden:
        return units_kept
    below = (units_kept // multiple) * multiple
    above = below + multiple if below != units_kept else below
    if rounding == "down":
        choice = below
    elif rounding == "up":
        choice = above
    else:
        choice = below if units_kept - below <= above - units_kept else above
    return min(choice, mlp_hidden)


@dataclass(frozen=True)
class RoundedKeep:
    """A stage's kept counts after rounding, and the block-linear MACs per model call it adds (< 0: frees)."""

    heads_kept: int
    units_kept: int
    macs_delta: int


def round_stage_keep(shape, heads_kept: int, units_kept: int, multiple: int = 32, rounding: str = "nearest") -> RoundedKeep:
    """Round one stage's units for a homogeneous `TransformerShape`; report the MACs change per call."""
    from mosaic_core.divide.cost import unit_macs_per_step

    units = gemm_friendly_units(units_kept, shape.mlp_hidden, multiple, rounding)
    return RoundedKeep(int(heads_kept), units, (units - int(units_kept)) * unit_macs_per_step(shape))
