"""Physical surgery: slice attention heads and MLP units out of diffusers DiT blocks.

Masking (zeroing the removed input columns of `attn1.to_out.0` and `ff.net.2`) proves
what pruning does to the function; slicing makes it real — smaller matmuls, fewer MACs.
The two agree to float precision (`tests/test_surgery.py`).

What a sliced block is (docs/method.md §3–4):

- a NEW `BasicTransformerBlock` object whose `attn1` and `ff` are new modules with sliced
  weights: rows h·hd…(h+1)·hd of to_q/to_k/to_v and the same input columns of to_out.0
  per kept head h; row j (+ bias j) of ff.net.0.proj and input column j of ff.net.2 per
  kept unit j. The biases of to_out.0 and ff.net.2 are not pruned and are shared.
- every other submodule (norm1 with its timestep/label embedders and adaLN linear,
  norm3, dropouts, the attention processor) is the *same Python object* as in the dense
  block, so three stage sub-networks cost only their pruned weights (`staged.memory_ledger`).
- the original block is never modified: new Parameters are copies.

diffusers' `Attention` keeps the head count in attributes that the processors read
instead of deriving it from the weights: `heads` (reshapes in AttnProcessor2_0 /
AttnProcessor), `inner_dim`, `inner_kv_dim`, and `sliceable_head_dim` (checked by
`set_attention_slice`); all are set to the kept count. The softmax scale stays
1/√head_dim (SDPA derives it from the per-head width, AttnProcessor from `attn.scale`),
and heads = 0 would divide by zero in `head_dim = inner_dim // attn.heads`, so at least
one head must stay. The model config still names the dense head count: a sliced model
cannot round-trip through `from_pretrained` (save kept indices + weights instead).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mosaic_core.prune.obs import group_columns

__all__ = ["BlockKeep", "slice_block", "mask_block_", "sliced_model", "block_sizes"]

# The per-instance containers of torch.nn.Module (_parameters, _buffers, _modules, hook
# dicts, ...). A bare copy.copy of a module would share them with the original, so that
# assigning a submodule or parameter on the copy would silently change the original too.
_MODULE_CONTAINERS = tuple(name for name, value in vars(nn.Module()).items() if isinstance(value, (dict, set)))


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object that shares every child/parameter but owns its containers."""
    clone = copy.copy(module)
    for name in _MODULE_CONTAINERS:
        if name in clone.__dict__:
            clone.__dict__[name] = copy.copy(clone.__dict__[name])
    return clone


def _check_indices(name: str, values: Iterable[int]) -> tuple[int, ...]:
    result = tuple(int(v) for v in values)
    if any(v < 0 for v in result) or any(b <= a for a, b in zip(result, result[1:])):
        raise ValueError(f"{name} must be strictly increasing non-negative indices, got {result}")
    return result


@dataclass(frozen=True)
class BlockKeep:
    """Which attention heads and MLP hidden units one transformer block keeps (sorted)."""

    heads: tuple[int, ...]
    units: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _check_indices("heads", self.heads))
        object.__setattr__(self, "units", _check_indices("units", self.units))

    @classmethod
    def full(cls, num_heads: int, num_units: int) -> "BlockKeep":
        """Keep everything: heads 0..num_heads-1 and units 0..num_units-1."""
        return cls(tuple(range(num_heads)), tuple(range(num_units)))

    @classmethod
    def from_dict(cls, value: Mapping[str, Sequence[int]]) -> "BlockKeep":
        """Inverse of `to_dict` (for JSON manifests)."""
        return cls(tuple(value["heads"]), tuple(value["units"]))

    def to_dict(self) -> dict[str, list[int]]:
        """{"heads": [...], "units": [...]}: JSON-serialisable."""
        return {"heads": list(self.heads), "units": list(self.units)}


def block_sizes(block: nn.Module) -> tuple[int, int, int]:
    """(num_heads, head_dim, num_units) of a (possibly sliced) BasicTransformerBlock."""
    attn = block.attn1
    return attn.heads, attn.inner_dim // attn.heads, block.ff.net[2].in_features


def _check_keep(block: nn.Module, keep: BlockKeep) -> tuple[int, int, int]:
    num_heads, head_dim, num_units = block_sizes(block)
    if keep.heads and keep.heads[-1] >= num_heads:
        raise ValueError(f"heads must be in [0, {num_heads}), got {keep.heads}")
    if keep.units and keep.units[-1] >= num_units:
        raise ValueError(f"units must be in [0, {num_units}), got max {keep.units[-1]}")
    return num_heads, head_dim, num_units


def _check_supported(block: nn.Module) -> None:
    attn, ff = block.attn1, block.ff
    if getattr(attn, "fused_projections", False):
        raise ValueError("attention with fused projections (to_qkv) is not supported; unfuse it first")
    if attn.inner_kv_dim != attn.inner_dim:
        raise ValueError(
            f"grouped-query attention (inner_kv_dim {attn.inner_kv_dim} != inner_dim {attn.inner_dim}) is not supported"
        )
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        raise ValueError("attention with added key/value projections is not supported")
    head_dim = attn.inner_dim // attn.heads
    for norm in (attn.norm_q, attn.norm_k):
        shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
        if norm is not None and shape not in (None, (head_dim,), head_dim):
            raise ValueError("q/k norms across heads are not supported by head slicing")
    proj = getattr(ff.net[0], "proj", None)
    if proj is None or proj.out_features != ff.net[2].in_features:
        raise ValueError(
            f"feed-forward activation {type(ff.net[0]).__name__} is not supported "
            "(need one projection of width equal to ff.net.2's inputs; GEGLU/SwiGLU are not)"
        )


def _columns(groups: Sequence[int], group_size: int, device: torch.device) -> torch.Tensor:
    """The input columns of `groups` (obs.group_columns: the one definition), on `device`."""
    return group_columns(groups, group_size).to(device)  # (groups·size,)


def _new_parameter(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.to(device=like.device, dtype=like.dtype).contiguous(), requires_grad=like.requires_grad)


def _slice_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A copy of `linear` keeping output rows `rows` (weight and bias)."""
    new = _shallow_copy(linear)
    with torch.no_grad():
        new.weight = _new_parameter(linear.weight.index_select(0, rows), linear.weight)  # |rows| × in
        if linear.bias is not None:
            new.bias = _new_parameter(linear.bias.index_select(0, rows), linear.bias)  # (|rows|,)
    new.out_features = int(rows.numel())
    return new


def _slice_columns(linear: nn.Linear, columns: torch.Tensor, weight: torch.Tensor | None, name: str) -> nn.Linear:
    """A copy of `linear` keeping input columns `columns` (or using the given kept weight); bias shared."""
    new = _shallow_copy(linear)
    expected = (linear.out_features, int(columns.numel()))
    with torch.no_grad():
        if weight is None:
            value = linear.weight.index_select(1, columns)  # out × |columns|
        else:
            if tuple(weight.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} (out × kept columns), got {tuple(weight.shape)}")
            value = weight.detach().clone()
        new.weight = _new_parameter(value, linear.weight)
    new.in_features = int(columns.numel())
    return new


def slice_block(
    block: nn.Module,
    keep: BlockKeep,
    out_weight: torch.Tensor | None = None,
    fc2_weight: torch.Tensor | None = None,
) -> nn.Module:
    """A new block keeping `keep.heads` and `keep.units`; unpruned submodules are shared.

    `out_weight` (D × kept·hd) and `fc2_weight` (D × kept units) replace the sliced
    columns of attn1.to_out.0 / ff.net.2 — pass the OBS-reconstructed weights here
    (`obs.reconstruct_weights`). The input block is not modified.
    """
    num_heads, head_dim, _ = _check_keep(block, keep)
    _check_supported(block)
    if not keep.heads:
        raise ValueError(
            f"at least one attention head must stay (diffusers divides by the head count); "
            f"got heads=() for a block with {num_heads} heads"
        )
    attn, ff = block.attn1, block.ff
    device = attn.to_q.weight.device

    # Attention: rows of q/k/v and input columns of to_out for the kept heads.
    head_cols = _columns(keep.heads, head_dim, device)  # (kept·hd,)
    new_attn = _shallow_copy(attn)
    new_attn.to_q = _slice_rows(attn.to_q, head_cols)
    new_attn.to_k = _slice_rows(attn.to_k, head_cols)
    new_attn.to_v = _slice_rows(attn.to_v, head_cols)
    new_out = _slice_columns(attn.to_out[0], head_cols, out_weight, "out_weight")
    new_attn.to_out = nn.ModuleList([new_out, *attn.to_out[1:]])  # dropout shared
    kept_heads = len(keep.heads)
    new_attn.heads = kept_heads
    new_attn.inner_dim = kept_heads * head_dim
    new_attn.inner_kv_dim = kept_heads * head_dim
    new_attn.sliceable_head_dim = kept_heads

    # MLP: rows (+bias) of the first projection and input columns of fc2 for the kept units.
    unit_cols = _columns(keep.units, 1, device)  # (kept units,)
    new_act = _shallow_copy(ff.net[0])
    new_act.proj = _slice_rows(ff.net[0].proj, unit_cols)
    new_fc2 = _slice_columns(ff.net[2], unit_cols, fc2_weight, "fc2_weight")
    new_ff = _shallow_copy(ff)
    new_ff.net = nn.ModuleList([new_act, ff.net[1], new_fc2, *ff.net[3:]])  # dropouts shared

    new_block = _shallow_copy(block)
    new_block.attn1 = new_attn
    new_block.ff = new_ff
    if hasattr(new_block, "num_attention_heads"):
        new_block.num_attention_heads = kept_heads  # informational in diffusers; kept consistent
    return new_block


def mask_block_(
    block: nn.Module,
    keep: BlockKeep,
    out_weight_full: torch.Tensor | None = None,
    fc2_weight_full: torch.Tensor | None = None,
) -> None:
    """In place: zero the removed input columns of attn1.to_out.0 and ff.net.2 (full width).

    The reference for surgery tests: q/k/v and fc1 still compute every head/unit, but the
    removed ones no longer reach the output. `*_weight_full` (D × full width), if given,
    are copied in first (e.g. OBS-updated weights scattered back to full width).
    """
    _, head_dim, _ = _check_keep(block, keep)
    out_linear, fc2 = block.attn1.to_out[0], block.ff.net[2]
    with torch.no_grad():
        for linear, full, groups, size, name in (
            (out_linear, out_weight_full, keep.heads, head_dim, "out_weight_full"),
            (fc2, fc2_weight_full, keep.units, 1, "fc2_weight_full"),
        ):
            if full is not None:
                if full.shape != linear.weight.shape:
                    raise ValueError(f"{name} must have shape {tuple(linear.weight.shape)}, got {tuple(full.shape)}")
                linear.weight.copy_(full)
            removed = torch.ones(linear.in_features, dtype=torch.bool, device=linear.weight.device)
            removed[_columns(groups, size, linear.weight.device)] = False
            linear.weight[:, removed] = 0.0


def sliced_model(
    dense_model: nn.Module,
    keeps: Sequence[BlockKeep],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A DiT whose blocks are sliced per `keeps`; everything else is shared with `dense_model`.

    `weights` maps layer names ("transformer_blocks.{i}.attn1.to_out.0",
    "transformer_blocks.{i}.ff.net.2") to kept-column weights (e.g. OBS-reconstructed).
    pos_embed, norm_out, proj_out_1/2 and each block's norms/embedders are the dense
    model's own objects; the config is the dense config. The dense model is untouched.
    """
    blocks = dense_model.transformer_blocks
    if len(keeps) != len(blocks):
        raise ValueError(f"need one BlockKeep per block: the model has {len(blocks)} blocks, got {len(keeps)}")
    weights = dict(weights or {})
    names = {f"transformer_blocks.{i}.{suffix}" for i in range(len(blocks)) for suffix in ("attn1.to_out.0", "ff.net.2")}
    unknown = sorted(set(weights) - names)
    if unknown:
        raise ValueError(f"unknown layer names in weights: {unknown}; expected names like {sorted(names)[:2]}")
    new_blocks = [
        slice_block(
            block,
            keep,
            out_weight=weights.get(f"transformer_blocks.{i}.attn1.to_out.0"),
            fc2_weight=weights.get(f"transformer_blocks.{i}.ff.net.2"),
        )
        for i, (block, keep) in enumerate(zip(blocks, keeps))
    ]
    model = _shallow_copy(dense_model)
    model.transformer_blocks = nn.ModuleList(new_blocks)
    return model
