"""Cost model: block-linear MACs and parameters of a (pruned) DiT (docs/method.md §4).

Only the layers that pruning touches are counted, which is the paper's MACs convention
(dense DiT-XL/2 at DDIM-50 = 5.72 T; the exact figure here is 5.7076e12). Per token and
block, with D = hidden_size, h = heads kept, hd = head_dim, u = MLP hidden units kept:

    attention: q, k, v (D → h·hd) and out (h·hd → D)  =  4 · D · h · hd   MACs
    MLP:       fc1 (D → u) and fc2 (u → D)             =  2 · D · u        MACs

times `num_tokens` and `num_layers` for one model call on one image (no classifier-free
guidance doubling), times the number of sampler steps for a whole sample.

| code name     | symbol | DiT-XL/2 |
|---------------|--------|----------|
| `hidden_size` | D      | 1152     |
| `head_dim`    | hd     | 72       |
| `heads_kept`  | h      | ≤ 16     |
| `units_kept`  | u      | ≤ 4608   |
| `step_counts` | nᵢ     | steps per stage |

A heterogeneous network (`shapes.BlockwiseShape`, a UNet whose blocks differ in width and
token count, and whose cross-attention K/V run over the text tokens) has one cost per
prunable layer instead (`LayerShape`): the totals below are then Σ over layers of kept
groups × that layer's MACs (or weights) per group, with the kept counts of
`Allocation.layer_keeps`.

`allocation_or_keep_counts` arguments take either an object with `heads_kept` and
`units_kept` sequences of length 3 (an `allocation.Allocation`), or three `(heads, units)`
pairs, or `None` for the dense network at every stage.
"""

from __future__ import annotations

from typing import Any, Sequence

from mosaic_core.divide.shapes import BlockwiseShape, TransformerShape


def _blockwise_keeps(shape: BlockwiseShape, allocation_or_keep_counts: Any) -> list:
    """Per-stage per-layer kept counts of a blockwise shape (None = dense)."""
    if allocation_or_keep_counts is None:
        return [None] * 3
    keeps = getattr(allocation_or_keep_counts, "layer_keeps", allocation_or_keep_counts)
    if keeps is None or len(keeps) != 3:
        raise ValueError("a blockwise shape needs per-layer kept counts for each of the 3 stages (Allocation.layer_keeps)")
    return list(keeps)


def _keep_counts(shape: TransformerShape, heads_kept: int | None, units_kept: int | None) -> tuple[int, int]:
    heads = shape.num_heads if heads_kept is None else int(heads_kept)
    units = shape.mlp_hidden if units_kept is None else int(units_kept)
    if not 0 <= heads <= shape.num_heads:
        raise ValueError(f"heads_kept must be in [0, {shape.num_heads}], got {heads_kept}")
    if not 0 <= units <= shape.mlp_hidden:
        raise ValueError(f"units_kept must be in [0, {shape.mlp_hidden}], got {units_kept}")
    return heads, units


def group_macs_per_token(kind: str, hidden_size: int, group_size: int = 1) -> int:
    """MACs of one prunable group in one block, per token: the one per-group cost rule.

    An attention head ("attn", group_size = hd) costs q, k, v and out: 4 · D · hd; an MLP
    hidden unit ("mlp") costs fc1 and fc2: 2 · D.
    """
    if kind == "attn":
        return 4 * hidden_size * group_size
    if kind == "mlp":
        return 2 * hidden_size
    raise ValueError(f"group kind must be 'attn' or 'mlp', got {kind!r}")


def head_macs_per_step(shape: TransformerShape) -> int:
    """MACs of one attention head in every block for one model call: L · N · 4 · D · hd."""
    return shape.num_layers * shape.num_tokens * group_macs_per_token("attn", shape.hidden_size, shape.head_dim)


def unit_macs_per_step(shape: TransformerShape) -> int:
    """MACs of one MLP hidden unit in every block for one model call: L · N · 2 · D."""
    return shape.num_layers * shape.num_tokens * group_macs_per_token("mlp", shape.hidden_size)


def block_macs_per_step(shape: TransformerShape, heads_kept: int | None = None, units_kept: int | None = None) -> int:
    """Block-linear MACs of one model call: L · N · (4·D·h·hd + 2·D·u); dense when None."""
    heads, units = _keep_counts(shape, heads_kept, units_kept)
    return heads * head_macs_per_step(shape) + units * unit_macs_per_step(shape)


def _stage_keep_counts(shape: TransformerShape, allocation_or_keep_counts: Any) -> list[tuple[int, int]]:
    if allocation_or_keep_counts is None:
        return [(shape.num_heads, shape.mlp_hidden)] * 3
    if hasattr(allocation_or_keep_counts, "heads_kept") and hasattr(allocation_or_keep_counts, "units_kept"):
        pairs = list(zip(allocation_or_keep_counts.heads_kept, allocation_or_keep_counts.units_kept))
    else:
        pairs = [tuple(pair) for pair in allocation_or_keep_counts]
    if len(pairs) != 3 or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"expected 3 (heads_kept, units_kept) pairs, one per stage, got {allocation_or_keep_counts!r}")
    return [_keep_counts(shape, heads, units) for heads, units in pairs]


def _check_step_counts(step_counts: Sequence[int]) -> tuple[int, int, int]:
    counts = tuple(int(n) for n in step_counts)
    if len(counts) != 3 or any(n < 0 for n in counts):
        raise ValueError(f"step_counts must be 3 non-negative integers (early, middle, late), got {tuple(step_counts)}")
    return counts  # type: ignore[return-value]


def sampling_macs(shape: TransformerShape, allocation_or_keep_counts: Any, step_counts: Sequence[int]) -> int:
    """Σᵢ nᵢ · MACs(stage i network): the block-linear MACs of one whole sample.

    `allocation_or_keep_counts=None` gives the dense total, `Σ nᵢ · block_macs_per_step(shape)`.
    """
    counts = _check_step_counts(step_counts)
    if isinstance(shape, BlockwiseShape):
        return sum(n * shape.macs(keep) for n, keep in zip(counts, _blockwise_keeps(shape, allocation_or_keep_counts)))
    keeps = _stage_keep_counts(shape, allocation_or_keep_counts)
    return sum(n * block_macs_per_step(shape, heads, units) for n, (heads, units) in zip(counts, keeps))


def ideal_speedup(macs_dense: float, macs_staged: float) -> float:
    """Dense MACs / staged MACs: the speed-up if block-linear layers were all the time spent."""
    if not macs_staged > 0:
        raise ValueError(f"staged MACs must be > 0, got {macs_staged}")
    return float(macs_dense) / float(macs_staged)


def linear_parameter_count(shape: TransformerShape, heads_kept: int | None = None, units_kept: int | None = None) -> int:
    """Weights + biases of the prunable linear layers of one network (all blocks).

    Per block: q, k, v = 3 · (D · h·hd + h·hd); out = h·hd · D + D; fc1 = D · u + u;
    fc2 = u · D + D. The out and fc2 biases (D each) are never pruned but are counted,
    since a sliced copy of those layers stores them too.
    """
    if isinstance(shape, BlockwiseShape):
        if heads_kept is not None or units_kept is not None:
            raise ValueError("a blockwise shape counts parameters per layer: use shape.parameters(layer_keeps)")
        return shape.parameters()
    heads, units = _keep_counts(shape, heads_kept, units_kept)
    width = shape.hidden_size
    inner = heads * shape.head_dim
    attention = 3 * (width * inner + inner) + (inner * width + width)
    mlp = (width * units + units) + (units * width + width)
    return shape.num_layers * (attention + mlp)


def staged_parameter_count(shape: TransformerShape, allocation_or_keep_counts: Any) -> int:
    """Prunable-linear parameters of three stage networks stored side by side.

    Everything else (embedders, adaLN, final layer) is shared between stages and not
    counted (docs/method.md §4, ours); compare with `linear_parameter_count(shape)` for dense.
    """
    if isinstance(shape, BlockwiseShape):
        return sum(shape.parameters(keep) for keep in _blockwise_keeps(shape, allocation_or_keep_counts))
    keeps = _stage_keep_counts(shape, allocation_or_keep_counts)
    return sum(linear_parameter_count(shape, heads, units) for heads, units in keeps)
