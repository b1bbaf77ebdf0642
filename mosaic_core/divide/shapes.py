"""The block shapes of a transformer that pruning and the cost model act on (pure data).

Lives in `divide` so the pure-math modules (cost, allocation, plan) need no registry, which
touches the file system and the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class TransformerShape:
    """The shapes of a DiT-like transformer that pruning and the cost model act on.

    | name          | meaning                                        | DiT-XL/2 |
    |---------------|------------------------------------------------|----------|
    | num_layers    | transformer blocks                             | 28       |
    | num_heads     | attention heads per block                      | 16       |
    | head_dim      | channels per head                              | 72       |
    | hidden_size   | D, the token width (= num_heads * head_dim)    | 1152     |
    | mlp_hidden    | F, hidden units of the feed-forward            | 4608     |
    | num_tokens    | tokens per image ((sample_size / patch)^2)      | 256      |
    """

    num_layers: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_tokens: int

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_dit_config(cls, config: Mapping[str, Any]) -> "TransformerShape":
        """Shapes of a `DiTTransformer2DModel` from its diffusers config dict."""
        heads = int(config.get("num_attention_heads", 16))
        head_dim = int(config.get("attention_head_dim", 72))
        patch = int(config.get("patch_size", 2))
        size = int(config.get("sample_size", 32))
        return cls(
            num_layers=int(config.get("num_layers", 28)),
            num_heads=heads,
            head_dim=head_dim,
            mlp_hidden=4 * heads * head_dim,  # diffusers' FeedForward: mult=4
            num_tokens=(size // patch) ** 2,
        )

    def hessian_bytes(self) -> int:
        """Float64 Hessians of every prunable layer at once: L · ((H·hd)² + F²) · 8 bytes."""
        return self.num_layers * self.block_hessian_bytes()

    def block_hessian_bytes(self) -> int:
        """Float64 Hessians of one block's layers: ((H·hd)² + F²) · 8 bytes."""
        return 8 * (self.hidden_size**2 + self.mlp_hidden**2)

    def to_dict(self) -> dict[str, int]:
        """JSON form (the five fields)."""
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "mlp_hidden": self.mlp_hidden,
            "num_tokens": self.num_tokens,
        }


LAYER_KINDS = ("attn", "cross_attn", "mlp", "joint_attn", "context_mlp", "dual_attn")
MLP_KINDS = ("mlp", "context_mlp")  # kinds whose groups are feed-forward units (the rest are heads)


@dataclass(frozen=True)
class LayerShape:
    """One prunable layer of a heterogeneous network (a UNet's blocks differ in width and tokens).

    `name` is the module path of the layer's output projection (the Hessian site); a group
    is `group_size` of its input columns. Costs are per model call on one image:

    | kind         | groups | MACs per group                         | weights per group          |
    |--------------|--------|----------------------------------------|----------------------------|
    | `attn`       | heads  | q,k,v,out over N tokens: 4·N·D·hd      | 4·D·hd                     |
    | `cross_attn` | heads  | q,out over N; k,v over M context tokens of width C: (2·N·D + 2·M·C)·hd | (2·D + 2·C)·hd |
    | `mlp`        | units  | in rows (g per unit: 1, or 2 when gated) and out: (g+1)·N·D | (g+1)·D     |
    | `joint_attn` | heads  | q,k,v,out over N image tokens, add q,k,v(,out) over M context tokens: (4·N + 4·M)·D·hd | 8·D·hd |
    | `context_mlp`| units  | as `mlp` over the M context tokens     | 2·D                        |
    | `dual_attn`  | heads  | as `attn`                              | 4·D·hd                     |

    plus the biases of the rows that go with a group (`params_per_group` counts them).
    `fixed_params` are the parameters of the layers that never shrink (the output bias).
    """

    name: str
    block: int
    kind: str
    num_groups: int
    group_size: int
    macs_per_group: int
    params_per_group: int
    fixed_params: int = 0

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layer kind must be one of {', '.join(LAYER_KINDS)}, got {self.kind!r}")
        if min(self.num_groups, self.group_size) < 1 or min(self.macs_per_group, self.params_per_group) < 0:
            raise ValueError(f"layer {self.name}: group counts must be >= 1 and costs >= 0")

    @property
    def in_features(self) -> int:
        """Input width of the output projection (= num_groups · group_size)."""
        return self.num_groups * self.group_size

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class BlockwiseShape:
    """A network as a list of prunable layers, each with its own cost (per-block cost model).

    The aggregate names of `TransformerShape` are kept for displays: `num_heads` is the
    total of attention heads over every attention layer, `mlp_hidden` the total of
    feed-forward units, `num_layers` the number of blocks.
    """

    layers: tuple[LayerShape, ...]
    num_tokens: int = 0  # tokens of the largest block (display only)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("a blockwise shape needs at least one prunable layer")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("prunable layer names must be unique")

    @property
    def num_layers(self) -> int:
        """Number of prunable blocks."""
        return len({layer.block for layer in self.layers})

    @property
    def num_heads(self) -> int:
        """Attention heads over every attention layer (self and cross)."""
        return sum(layer.num_groups for layer in self.layers if layer.kind not in MLP_KINDS)

    @property
    def mlp_hidden(self) -> int:
        """Feed-forward units over every block."""
        return sum(layer.num_groups for layer in self.layers if layer.kind in MLP_KINDS)

    @property
    def head_dim(self) -> int:
        """The head width when every attention layer shares it, else 0."""
        sizes = {layer.group_size for layer in self.layers if layer.kind not in MLP_KINDS}
        return sizes.pop() if len(sizes) == 1 else 0

    @property
    def hidden_size(self) -> int:
        """The widest attention layer's inner width (display only)."""
        return max((layer.in_features for layer in self.layers if layer.kind not in MLP_KINDS), default=0)

    def dense_keeps(self) -> tuple[int, ...]:
        """Every group kept, layer by layer."""
        return tuple(layer.num_groups for layer in self.layers)

    def _check_keeps(self, keeps) -> tuple[int, ...]:
        keeps = self.dense_keeps() if keeps is None else tuple(int(k) for k in keeps)
        if len(keeps) != len(self.layers):
            raise ValueError(f"need one kept count per prunable layer ({len(self.layers)}), got {len(keeps)}")
        for layer, kept in zip(self.layers, keeps):
            if not 0 <= kept <= layer.num_groups:
                raise ValueError(f"{layer.name}: kept groups must be in [0, {layer.num_groups}], got {kept}")
        return keeps

    def macs(self, keeps=None) -> int:
        """Block-linear MACs of one model call on one image with `keeps` groups per layer."""
        keeps = self._check_keeps(keeps)
        return sum(kept * layer.macs_per_group for layer, kept in zip(self.layers, keeps))

    def parameters(self, keeps=None) -> int:
        """Parameters of the prunable layers with `keeps` groups per layer."""
        keeps = self._check_keeps(keeps)
        return sum(kept * layer.params_per_group + layer.fixed_params for layer, kept in zip(self.layers, keeps))

    def hessian_bytes(self) -> int:
        """Float64 Hessians of every prunable layer at once: Σ in_features² · 8 bytes."""
        return sum(8 * layer.in_features**2 for layer in self.layers)

    def block_hessian_bytes(self) -> int:
        """Float64 Hessians of the largest block's layers (gathering one block at a time)."""
        per_block: dict[int, int] = {}
        for layer in self.layers:
            per_block[layer.block] = per_block.get(layer.block, 0) + 8 * layer.in_features**2
        return max(per_block.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the aggregate figures and every layer."""
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "mlp_hidden": self.mlp_hidden,
            "num_tokens": self.num_tokens,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockwiseShape":
        """Inverse of `to_dict`."""
        return cls(tuple(LayerShape(**layer) for layer in data["layers"]), int(data.get("num_tokens", 0)))


def shape_from_dict(data: Mapping[str, Any]):
    """A `TransformerShape` or a `BlockwiseShape` from its `to_dict()` form."""
    if "layers" in data:
        return BlockwiseShape.from_dict(data)
    return TransformerShape(**{k: int(v) for k, v in data.items()})
