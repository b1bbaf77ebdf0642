"""Physical surgery: slice attention heads and feed-forward units out of diffusers blocks.

Masking (zeroing the removed input columns of `attn1.to_out.0` and `ff.net.2`) proves
what pruning does to the function; slicing makes it real — smaller matmuls, fewer MACs.
The two agree to float precision (`tests/test_surgery.py`).

What a sliced block is (docs/method.md §3–4):

- a NEW block object (any diffusers `BasicTransformerBlock`: DiT's, or a UNet's with
  cross-attention) whose `attn1`, `attn2` and `ff` are new modules with sliced weights:
  rows h·hd…(h+1)·hd of to_q/to_k/to_v (and of add_q/k/v_proj when the attention has added
  context projections, whose `to_add_out` loses the same input columns: joint attention
  slices image and context together) and the same input columns of to_out.0 per kept
  head h; row j (+ bias j) of ff.net.0.proj — rows j and j+F for a gated GEGLU/SwiGLU,
  whose output is proj[:F]·act(proj[F:]) — and input column j of ff.net.2 per kept unit
  j. The biases of to_out.0 and ff.net.2 are not pruned and are shared.
- cross-attention heads (`attn2`, keys/values over the text tokens) are pruned like
  self-attention heads; a `BlockKeep` without `cross_heads` keeps them all.
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

__all__ = [
    "BlockKeep", "slice_attention", "slice_feed_forward", "slice_block", "mask_block_", "sliced_model",
    "block_sizes", "replace_modules", "slice_basic_block", "slice_joint_block", "slice_parallel_block",
]

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
    """Which self-attention heads, feed-forward units and (optionally) cross-attention heads a block keeps.

    `cross_heads` is None for a block without cross-attention, or to keep all its heads.
    """

    heads: tuple[int, ...]
    units: tuple[int, ...]
    cross_heads: tuple[int, ...] | None = None
    context_units: tuple[int, ...] | None = None  # the context stream's feed-forward (joint blocks)
    dual_heads: tuple[int, ...] | None = None  # a joint block's second, image-only self-attention

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", _check_indices("heads", self.heads))
        object.__setattr__(self, "units", _check_indices("units", self.units))
        for name in _OPTIONAL_FIELDS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _check_indices(name, getattr(self, name)))

    @classmethod
    def full(cls, num_heads: int, num_units: int, num_cross_heads: int | None = None) -> "BlockKeep":
        """Keep everything: heads 0..num_heads-1, units 0..num_units-1 (and every cross head)."""
        cross = None if num_cross_heads is None else tuple(range(num_cross_heads))
        return cls(tuple(range(num_heads)), tuple(range(num_units)), cross)

    @classmethod
    def from_dict(cls, value: Mapping[str, Sequence[int]]) -> "BlockKeep":
        """Inverse of `to_dict` (for JSON manifests)."""
        optional = {name: tuple(value[name]) for name in _OPTIONAL_FIELDS if value.get(name) is not None}
        return cls(tuple(value["heads"]), tuple(value["units"]), **optional)

    def to_dict(self) -> dict[str, list[int]]:
        """{"heads": [...], "units": [...]} (+ "cross_heads", "context_units", "dual_heads" when set)."""
        value = {"heads": list(self.heads), "units": list(self.units)}
        for name in _OPTIONAL_FIELDS:
            if getattr(self, name) is not None:
                value[name] = list(getattr(self, name))
        return value


_OPTIONAL_FIELDS = ("cross_heads", "context_units", "dual_heads")


def block_sizes(block: nn.Module) -> tuple[int, int, int]:
    """(num_heads, head_dim, num_units) of a (possibly sliced) block's self-attention and feed-forward."""
    attn = block.attn1
    return attn.heads, attn.inner_dim // attn.heads, block.ff.net[2].in_features


def _cross_attention(block: nn.Module) -> nn.Module | None:
    attn = getattr(block, "attn2", None)
    return attn if attn is not None and getattr(attn, "is_cross_attention", False) else None


def _check_groups(name: str, groups: Sequence[int], count: int) -> None:
    if groups and groups[-1] >= count:
        raise ValueError(f"{name} must be in [0, {count}), got {tuple(groups)}")


def _check_keep(block: nn.Module, keep: BlockKeep) -> tuple[int, int, int]:
    num_heads, head_dim, num_units = block_sizes(block)
    _check_groups("heads", keep.heads, num_heads)
    if keep.units and keep.units[-1] >= num_units:
        raise ValueError(f"units must be in [0, {num_units}), got max {keep.units[-1]}")
    if keep.cross_heads is not None:
        cross = _cross_attention(block)
        if cross is None:
            raise ValueError("cross_heads were given for a block without cross-attention")
        _check_groups("cross_heads", keep.cross_heads, cross.heads)
    return num_heads, head_dim, num_units


def _check_attention(attn: nn.Module) -> int:
    """Head width of a sliceable diffusers Attention, or ValueError naming what is unsupported."""
    if getattr(attn, "fused_projections", False):
        raise ValueError("attention with fused projections (to_qkv) is not supported; unfuse it first")
    inner_kv_dim = getattr(attn, "inner_kv_dim", attn.inner_dim)
    if inner_kv_dim != attn.inner_dim:
        raise ValueError(
            f"grouped-query attention (inner_kv_dim {inner_kv_dim} != inner_dim {attn.inner_dim}) is not supported"
        )
    head_dim = attn.inner_dim // attn.heads
    for norm in (getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)):
        shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
        if norm is not None and shape not in (None, (head_dim,), head_dim):
            raise ValueError("q/k norms across heads are not supported by head slicing")
    return head_dim


def _feed_forward_rows(ff: nn.Module, units: torch.Tensor) -> torch.Tensor:
    """Rows of the input projection that belong to `units`: j, or j and j+F when gated."""
    proj = getattr(ff.net[0], "proj", None)
    width = ff.net[2].in_features  # F
    if proj is None or proj.out_features not in (width, 2 * width):
        raise ValueError(
            f"feed-forward activation {type(ff.net[0]).__name__} is not supported "
            f"(need a projection with F or 2F rows for ff.net.2's F = {width} inputs)"
        )
    if proj.out_features == width:
        return units  # GELU: unit j is row j
    return torch.cat([units, units + width])  # gated (GEGLU, SwiGLU): value row j, gate row j+F


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


def slice_attention(
    attn: nn.Module,
    heads: Sequence[int],
    out_weight: torch.Tensor | None = None,
    name: str = "out_weight",
    add_out_weight: torch.Tensor | None = None,
) -> nn.Module:
    """A copy of a diffusers `Attention` (or a joint attention module alike) keeping `heads`.

    Rows of to_q/to_k/to_v (and add_q/k/v_proj) and input columns of to_out.0 (and
    to_add_out) for each kept head; `out_weight` (D × kept·hd) replaces to_out.0's kept
    columns and `add_out_weight` to_add_out's. `heads`, `inner_dim`, `inner_kv_dim` and
    `sliceable_head_dim` are set to the kept count, since the processors read them instead
    of the weights. An attention without to_out (its output projection fused into the
    block's, `pre_only`) keeps only its q/k/v rows. The original is untouched.
    """
    head_dim = _check_attention(attn)
    heads = _check_indices("heads", heads)
    _check_groups("heads", heads, attn.heads)
    if not heads:
        raise ValueError(
            f"at least one attention head must stay (diffusers divides by the head count); "
            f"got heads=() for an attention with {attn.heads} heads"
        )
    device = attn.to_q.weight.device
    cols = _columns(heads, head_dim, device)  # (kept·hd,)
    new = _shallow_copy(attn)
    for projection in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        module = getattr(attn, projection, None)
        if module is not None:
            setattr(new, projection, _slice_rows(module, cols))
    to_out = getattr(attn, "to_out", None)
    if to_out is not None and len(to_out) > 0:
        new.to_out = nn.ModuleList([_slice_columns(to_out[0], cols, out_weight, name), *to_out[1:]])  # dropout shared
        new.to_out.train(to_out.training)  # a new container takes the original's mode (eval stays eval)
    elif out_weight is not None:
        raise ValueError(f"{name} was given for an attention without an output projection")
    if getattr(attn, "to_add_out", None) is not None:
        new.to_add_out = _slice_columns(attn.to_add_out, cols, add_out_weight, "add_out_weight")
    elif add_out_weight is not None:
        raise ValueError("add_out_weight was given for an attention without to_add_out")
    new.heads = len(heads)
    new.inner_dim = len(heads) * head_dim
    if hasattr(attn, "inner_kv_dim"):
        new.inner_kv_dim = len(heads) * head_dim
    if hasattr(attn, "sliceable_head_dim"):
        new.sliceable_head_dim = len(heads)
    return new


def slice_feed_forward(ff: nn.Module, units: Sequence[int], out_weight: torch.Tensor | None = None, name: str = "fc2_weight") -> nn.Module:
    """A copy of a diffusers `FeedForward` keeping hidden `units` (GELU or gated GEGLU/SwiGLU)."""
    units = _check_indices("units", units)
    width = ff.net[2].in_features
    if units and units[-1] >= width:
        raise ValueError(f"units must be in [0, {width}), got max {units[-1]}")
    device = ff.net[2].weight.device
    unit_cols = _columns(units, 1, device)  # (kept units,)
    rows = _feed_forward_rows(ff, unit_cols)
    new_act = _shallow_copy(ff.net[0])
    new_act.proj = _slice_rows(ff.net[0].proj, rows)
    new_out = _slice_columns(ff.net[2], unit_cols, out_weight, name)
    new = _shallow_copy(ff)
    new.net = nn.ModuleList([new_act, ff.net[1], new_out, *ff.net[3:]])  # dropouts shared
    new.net.train(ff.net.training)
    return new


def slice_block(
    block: nn.Module,
    keep: BlockKeep,
    out_weight: torch.Tensor | None = None,
    fc2_weight: torch.Tensor | None = None,
    cross_out_weight: torch.Tensor | None = None,
) -> nn.Module:
    """A new block keeping `keep.heads`, `keep.units` (and `keep.cross_heads`); the rest is shared.

    `out_weight` (D × kept·hd), `fc2_weight` (D × kept units) and `cross_out_weight`
    replace the sliced columns of attn1.to_out.0 / ff.net.2 / attn2.to_out.0 — pass the
    OBS-reconstructed weights here (`obs.reconstruct_weights`). The input block is not modified.
    """
    _check_keep(block, keep)
    _check_attention(block.attn1)
    _feed_forward_rows(block.ff, torch.zeros(0, dtype=torch.long))
    new_block = _shallow_copy(block)
    new_block.attn1 = slice_attention(block.attn1, keep.heads, out_weight, "out_weight")
    new_block.ff = slice_feed_forward(block.ff, keep.units, fc2_weight, "fc2_weight")
    cross = _cross_attention(block)
    if cross is not None and (keep.cross_heads is not None or cross_out_weight is not None):
        heads = keep.cross_heads if keep.cross_heads is not None else tuple(range(cross.heads))
        new_block.attn2 = slice_attention(cross, heads, cross_out_weight, "cross_out_weight")
    if hasattr(new_block, "num_attention_heads"):
        new_block.num_attention_heads = len(keep.heads)  # informational in diffusers; kept consistent
    return new_block


def _optional(block: nn.Module, name: str) -> nn.Module | None:
    return getattr(block, name, None)


def slice_joint_block(block: nn.Module, keep: BlockKeep, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A new joint-attention block (image and context streams attend together) keeping `keep`.

    The block has `attn` (a joint attention: to_q/k/v over the image tokens, add_q/k/v_proj
    over the context tokens, to_out.0 and, unless the context stream ends here, to_add_out),
    optionally `attn2` (a second, image-only self-attention), `ff` (image feed-forward) and
    optionally `ff_context` (context feed-forward). A head of `attn` is removed from both
    streams at once (`keep.heads`); `keep.dual_heads`, `keep.units` and
    `keep.context_units` slice attn2, ff and ff_context (None: keep all). `weights` maps
    "attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.2", "ff_context.net.2" to
    kept-column weights (docs/method.md §11). The input block is not modified.
    """
    weights = dict(weights or {})
    allowed = {"attn.to_out.0", "attn.to_add_out", "attn2.to_out.0", "ff.net.2", "ff_context.net.2"}
    if set(weights) - allowed:
        raise ValueError(f"unknown weights {sorted(set(weights) - allowed)} for a joint block: allowed are {sorted(allowed)}")
    attn = block.attn
    _check_groups("heads", keep.heads, attn.heads)
    new_block = _shallow_copy(block)
    new_block.attn = slice_attention(attn, keep.heads, weights.get("attn.to_out.0"), "attn.to_out.0", weights.get("attn.to_add_out"))
    dual = _optional(block, "attn2")
    if keep.dual_heads is not None or "attn2.to_out.0" in weights:
        if dual is None:
            raise ValueError("dual_heads were given for a joint block without attn2")
        heads = keep.dual_heads if keep.dual_heads is not None else tuple(range(dual.heads))
        new_block.attn2 = slice_attention(dual, heads, weights.get("attn2.to_out.0"), "attn2.to_out.0")
    units = keep.units
    if units and units[-1] >= block.ff.net[2].in_features:
        raise ValueError(f"units must be in [0, {block.ff.net[2].in_features}), got max {units[-1]}")
    new_block.ff = slice_feed_forward(block.ff, units, weights.get("ff.net.2"), "ff.net.2")
    context_ff = _optional(block, "ff_context")
    if keep.context_units is not None or "ff_context.net.2" in weights:
        if context_ff is None:
            raise ValueError("context_units were given for a joint block without ff_context")
        context_units = keep.context_units if keep.context_units is not None else tuple(range(context_ff.net[2].in_features))
        new_block.ff_context = slice_feed_forward(context_ff, context_units, weights.get("ff_context.net.2"), "ff_context.net.2")
    return new_block


def slice_parallel_block(block: nn.Module, keep: BlockKeep, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A new parallel block (attention and MLP side by side, one fused output projection) keeping `keep`.

    The block computes proj_out([attn(x); act(proj_mlp(x))]): `attn` has q/k/v but no
    output projection, and `proj_out` (D × (inner + F)) reads the attention output in
    columns [0, inner) and the MLP in [inner, inner + F). Head h is rows h·hd… of
    to_q/k/v plus proj_out columns h·hd…(h+1)·hd; MLP unit j is row j of proj_mlp plus
    proj_out column inner + j. `weights` maps "proj_out[attn]" (D × kept·hd) and
    "proj_out[mlp]" (D × kept units) to kept-column weights; the bias is shared.
    """
    weights = dict(weights or {})
    allowed = {"proj_out[attn]", "proj_out[mlp]"}
    if set(weights) - allowed:
        raise ValueError(f"unknown weights {sorted(set(weights) - allowed)} for a parallel block: allowed are {sorted(allowed)}")
    attn = block.attn
    head_dim = _check_attention(attn)
    inner = attn.inner_dim
    width = block.proj_mlp.out_features  # F
    if block.proj_out.in_features != inner + width:
        raise ValueError(f"proj_out reads {block.proj_out.in_features} inputs, expected attention {inner} + MLP {width}")
    if keep.units and keep.units[-1] >= width:
        raise ValueError(f"units must be in [0, {width}), got max {keep.units[-1]}")
    device = block.proj_out.weight.device
    head_cols = _columns(keep.heads, head_dim, device)  # (kept·hd,)
    unit_cols = _columns(keep.units, 1, device)  # (kept units,)
    new_block = _shallow_copy(block)
    new_block.attn = slice_attention(attn, keep.heads)
    new_block.proj_mlp = _slice_rows(block.proj_mlp, unit_cols)
    parts = []
    for key, cols, count in (("proj_out[attn]", head_cols, head_cols.numel()), ("proj_out[mlp]", unit_cols + inner, unit_cols.numel())):
        given = weights.get(key)
        if given is None:
            parts.append(block.proj_out.weight.detach().index_select(1, cols))  # out × kept columns
        elif tuple(given.shape) != (block.proj_out.out_features, count):
            raise ValueError(f"{key} must have shape {(block.proj_out.out_features, count)}, got {tuple(given.shape)}")
        else:
            parts.append(given.detach())
    new_block.proj_out = _slice_columns(block.proj_out, torch.cat([head_cols, unit_cols + inner]), torch.cat(parts, dim=1), "proj_out")
    if hasattr(block.proj_out, "_tp_packed_row_blocks"):
        new_block.proj_out._tp_packed_row_blocks = [int(head_cols.numel()), int(unit_cols.numel())]
    new_block.mlp_hidden_dim = int(unit_cols.numel())
    return new_block


def mask_block_(
    block: nn.Module,
    keep: BlockKeep,
    out_weight_full: torch.Tensor | None = None,
    fc2_weight_full: torch.Tensor | None = None,
    cross_out_weight_full: torch.Tensor | None = None,
) -> None:
    """In place: zero the removed input columns of attn1.to_out.0, ff.net.2 (and attn2.to_out.0).

    The reference for surgery tests: q/k/v and fc1 still compute every head/unit, but the
    removed ones no longer reach the output. `*_weight_full` (D × full width), if given,
    are copied in first (e.g. OBS-updated weights scattered back to full width).
    """
    _, head_dim, _ = _check_keep(block, keep)
    targets = [
        (block.attn1.to_out[0], out_weight_full, keep.heads, head_dim, "out_weight_full"),
        (block.ff.net[2], fc2_weight_full, keep.units, 1, "fc2_weight_full"),
    ]
    cross = _cross_attention(block)
    if cross is not None and keep.cross_heads is not None:
        targets.append((cross.to_out[0], cross_out_weight_full, keep.cross_heads, cross.inner_dim // cross.heads, "cross_out_weight_full"))
    with torch.no_grad():
        for linear, full, groups, size, name in targets:
            if full is not None:
                if full.shape != linear.weight.shape:
                    raise ValueError(f"{name} must have shape {tuple(linear.weight.shape)}, got {tuple(full.shape)}")
                linear.weight.copy_(full)
            removed = torch.ones(linear.in_features, dtype=torch.bool, device=linear.weight.device)
            removed[_columns(groups, size, linear.weight.device)] = False
            linear.weight[:, removed] = 0.0


def replace_modules(root: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A shallow copy of `root` with the modules at the given paths replaced; `root` is untouched.

    Every ancestor of a replaced module is shallow-copied once (it owns its child dict), so
    the copy and the original share every other module and parameter.
    """
    new_root = _shallow_copy(root)
    copies: dict[str, nn.Module] = {"": new_root}
    for path, module in replacements.items():
        parts = path.split(".")
        parent_path, parent = "", new_root
        for part in parts[:-1]:
            child_path = f"{parent_path}.{part}" if parent_path else part
            if child_path not in copies:
                original = parent._modules.get(part)
                if original is None:
                    raise ValueError(f"no module at {child_path!r} in {type(root).__name__}")
                copies[child_path] = _shallow_copy(original)
                parent._modules[part] = copies[child_path]
            parent_path, parent = child_path, copies[child_path]
        if parts[-1] not in parent._modules:
            raise ValueError(f"no module at {path!r} in {type(root).__name__}")
        parent._modules[parts[-1]] = module
    return new_root


_WEIGHT_SUFFIXES = {"attn1.to_out.0": "out_weight", "ff.net.2": "fc2_weight", "attn2.to_out.0": "cross_out_weight"}


def sliced_model(
    dense_model: nn.Module,
    keeps: Sequence[BlockKeep],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A denoiser whose prunable blocks are sliced per `keeps`; everything else is shared.

    The blocks are the family adapter's (`block_paths`, e.g. "transformer_blocks.{i}" for
    DiT, "down_blocks.1.attentions.0.transformer_blocks.0" for a UNet), one `BlockKeep`
    each in that order. `weights` maps output-projection names ("<block>.attn1.to_out.0",
    "<block>.ff.net.2", "<block>.attn2.to_out.0") to kept-column weights (e.g.
    OBS-reconstructed), and "<name>.bias" to a refit bias of such a layer (prune/refit.py).
    Embedders, norms, resnets and the config are the dense model's own objects. The
    dense model is untouched.
    """
    from mosaic_core.models.adapters.base import adapter_for_model

    adapter = adapter_for_model(dense_model)
    paths = adapter.block_paths(dense_model)
    if len(keeps) != len(paths):
        raise ValueError(f"need one BlockKeep per block: the model has {len(paths)} blocks, got {len(keeps)}")
    weights = dict(weights or {})
    modules = dict(dense_model.named_modules())
    layers = adapter.prunable_layers(dense_model)
    names = {part.key: layer.block for layer in layers for part in layer.parts}
    # Refit biases (prune/refit.py): "<layer>.bias" of a single-module layer that lost groups.
    refittable = {layer.name for layer in layers if len(layer.parts) == 1 and layer.parts[0].module == layer.name}
    biases = {name: weights.pop(name) for name in list(weights) if name.endswith(".bias") and name[: -len(".bias")] in refittable}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"unknown layer names in weights: {unknown}; expected names like {sorted(names)[:2]}")
    replacements = {}
    for index, (path, keep) in enumerate(zip(paths, keeps)):
        block_weights = {name[len(path) + 1 :]: value for name, value in weights.items() if names[name] == index}
        replacements[path] = adapter.slice_block(modules[path], keep, block_weights)
    model = replace_modules(dense_model, replacements)
    sliced = dict(model.named_modules())
    for name, value in sorted(biases.items()):
        layer = name[: -len(".bias")]
        linear = sliced[layer]
        if linear is modules[layer] or linear.bias is None or tuple(value.shape) != tuple(linear.bias.shape):
            raise ValueError(
                f"{name}: a refit bias needs a layer that lost groups and has a bias of shape "
                f"{tuple(modules[layer].bias.shape) if modules[layer].bias is not None else None}, got {tuple(value.shape)}"
            )
        linear.bias = _new_parameter(value.detach(), linear.bias)  # its own: the dense bias stays shared elsewhere
    return model


def slice_basic_block(block: nn.Module, keep: BlockKeep, weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """`slice_block` with the weights named by their path in the block ("attn1.to_out.0", "ff.net.2", "attn2.to_out.0")."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(_WEIGHT_SUFFIXES))
    if unknown:
        raise ValueError(f"unknown weights {unknown} for a transformer block: allowed are {sorted(_WEIGHT_SUFFIXES)}")
    if "attn2.to_out.0" in weights and _cross_attention(block) is None:
        raise ValueError("attn2.to_out.0 weights were given for a block without cross-attention")
    return slice_block(block, keep, **{arg: weights.get(suffix) for suffix, arg in _WEIGHT_SUFFIXES.items()})
