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
