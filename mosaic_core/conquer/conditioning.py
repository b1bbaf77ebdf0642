"""The adaLN conditioning of a whole trajectory, computed once before the first step.

A class-conditioned DiT modulates every block from (t, y) alone: block ℓ's adaLN-Zero runs
its own timestep + label embedding e_ℓ = emb_ℓ(t, y) and a linear m_ℓ = W_ℓ·SiLU(e_ℓ) + b_ℓ,
split into six shift/scale/gate vectors (diffusers' `AdaLayerNormZero`); the final layer
embeds (t, y) once more with block 0's embedder. None of it depends on the latents, and a
sampler knows every timestep and label in advance, so the work of all N steps can run as
one batched call per block instead of N small ones (docs/method.md §9, eq. 9.2).

The values are the same as the per-call ones (the same modules on the same inputs; rows of a
batched linear are independent). What changes is time: on a CPU the per-block embedding
and modulation of a call is small GEMMs and many tiny kernels, 7–11 % of a digits-dit call
at 16 rows (more at fewer rows) and none of it prunable. Removing it from every call
shortens the dense and the pruned networks alike, so a pruned network's measured speed-up
comes closer to its MACs ratio.

`TrajectoryConditioning(model, call_timesteps, class_labels)` finds every `AdaLayerNormZero`
with its own embedder in `model` (all stage networks of a staged denoiser; a module shared
by networks is computed once); `precompute()` fills the table. Inside `with`, a module
answers a call from the table only when the call's timestep is one of the table's own
tensors (`call_timesteps[i]`, by identity, so no value is read back from a GPU): any other
call (another sampler in another thread, a staged denoiser's mixed batch, a caller that
builds its own timestep) runs the module's own forward. Tables active at once (threads,
nested samplers) are kept in one registry per module and each removes only itself, so
leaving them in any order restores every module. Other families (SD3's and Flux's adaLN
take a text-dependent embedding; PixArt computes its one `adaln_single` per call already)
find no such module and run unchanged.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
from torch import nn


def _ada_norms(model: nn.Module) -> list[nn.Module]:
    """Every diffusers `AdaLayerNormZero` with its own (timestep, label) embedder, once each."""
    try:
        from diffusers.models.normalization import AdaLayerNormZero
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return []
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, AdaLayerNormZero) and getattr(module, "emb", None) is not None:
            found.setdefault(id(module), module)
    return list(found.values())


_LOCK = threading.Lock()
_ACTIVE: dict[int, list["TrajectoryConditioning"]] = {}  # id(AdaLayerNormZero) -> tables active on it
_BLOCKS: dict[int, list] = {}  # id(block) -> [block, how many tables are active on it]: its forward is replaced while any is


def _lookup(norm: nn.Module, timestep: Any) -> tuple["TrajectoryConditioning", int] | None:
    for table in tuple(_ACTIVE.get(id(norm), ())):
        step = table.step_of(timestep)
        if step is not None:
            return table, step
    return None


def _norm_forward(norm: nn.Module, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    found = None if emb is not None else _lookup(norm, timestep)
    if found is None:
        return type(norm).forward(norm, x, timestep, class_labels, hidden_dtype=hidden_dtype, emb=emb)
    table, step = found
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.modulation[id(norm)][step].chunk(6, dim=1)
    x = norm.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _plain_dit_block(block: nn.Module) -> bool:
    """Whether `block` is a diffusers `BasicTransformerBlock` that `_block_forward` reproduces op
    for op: adaLN-Zero, self-attention by `AttnProcessor2_0` with nothing else configured
    (no cross-attention, norms on q/k, spatial or group norm, residual, output rescale), a
    GELU MLP, no chunking. Anything else keeps diffusers' forward."""
    try:
        from diffusers.models.activations import GELU
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    if type(block) is not BasicTransformerBlock or getattr(block, "norm_type", None) != "ada_norm_zero":
        return False
    attn, ff = block.attn1, block.ff
    return (
        block.attn2 is None and block.pos_embed is None and block._chunk_size is None and not block.only_cross_attention
        and type(attn) is Attention and type(attn.processor) is AttnProcessor2_0
        and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
        and not attn.residual_connection and attn.rescale_output_factor == 1.0 and len(attn.to_out) == 2
        and len(ff.net) in (3, 4) and type(ff.net[0]) is GELU and isinstance(ff.net[2], nn.Linear)
        and all(isinstance(ff.net[i], nn.Dropout) for i in range(1, len(ff.net)) if i != 2)
    )


def _block_forward(block: nn.Module, hidden_states, attention_mask=None, encoder_hidden_states=None,
                   encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                   added_cond_kwargs=None):
    """A plain DiT block's forward with its modulation from the table: diffusers' operations in
    diffusers' order, minus the per-call work that computes nothing in inference (the
    processor's signature check, identity dropouts, the division by an output scale of 1),
    so the same values bit for bit (an `addcmul` would fuse the modulation's multiply-add and
    round differently). Any call it does not cover runs diffusers' forward."""
    found = None
    if attention_mask is None and not cross_attention_kwargs and not block.training:
        found = _lookup(block.norm1, timestep)
    if found is None:
        return type(block).forward(block, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    table, step = found
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.modulation[id(block.norm1)][step][:, None].chunk(6, dim=2)
    # 1. self-attention on the modulated norm (AttnProcessor2_0's steps for a 3-d input)
    x = block.norm1.norm(hidden_states) * (1 + scale_msa) + shift_msa
    attn = block.attn1
    batch = x.shape[0]
    query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    x = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    x = attn.to_out[0](x.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype))
    hidden_states = gate_msa * x + hidden_states
    # 2. the MLP on the modulated norm
    x = block.norm3(hidden_states) * (1 + scale_mlp) + shift_mlp
    x = block.ff.net[2](block.ff.net[0](x))
    return gate_mlp * x + hidden_states


def _emb_forward(norm: nn.Module, timestep, class_labels=None, hidden_dtype=None):
    # DiT's final layer embeds (t, y) with block 0's embedder directly.
    found = _lookup(norm, timestep)
    if found is None:
        return type(norm.emb).forward(norm.emb, timestep, class_labels, hidden_dtype=hidden_dtype)
    table, step = found
    return table.embeddings[id(norm)][step]


class TrajectoryConditioning:
    """Per-step adaLN modulation of every class-conditioned adaLN-Zero block, for one trajectory.

    `call_timesteps`: S×R, the timestep tensor of each of the S calls (model units; call i
    must hand the network `call_timesteps[i]` itself); `class_labels`: the R labels of every
    call (guidance's [cond, null] rows included).
    """

    def __init__(self, model: nn.Module, call_timesteps: torch.Tensor, class_labels: torch.Tensor) -> None:
        if call_timesteps.dim() != 2 or class_labels.dim() != 1 or call_timesteps.shape[1] != class_labels.shape[0]:
            raise ValueError(
                "need timesteps of shape steps×rows and one label per row, "
                f"got {tuple(call_timesteps.shape)} and {tuple(class_labels.shape)}"
            )
        self.norms = _ada_norms(model)
        # the blocks whose whole forward the table can run (`_block_forward`; a pruned network's
        # blocks share the dense network's norms, so several blocks can share one norm1)
        norms = {id(n) for n in self.norms}
        self.blocks = list(
            {id(m): m for m in model.modules() if id(getattr(m, "norm1", None)) in norms and _plain_dit_block(m)}.values()
        )
        self.timesteps = call_timesteps
        self.call_timesteps = list(call_timesteps.unbind(0))  # the tensors the calls pass, looked up by identity
        self._steps = {id(t): i for i, t in enumerate(self.call_timesteps)}
        self.class_labels = class_labels
        self.steps, self.rows = int(call_timesteps.shape[0]), int(call_timesteps.shape[1])
        self.embeddings: dict[int, torch.Tensor] = {}  # id(norm) -> S×R×D   emb_ℓ(t, y)
        self.modulation: dict[int, torch.Tensor] = {}  # id(norm) -> S×R×6D  W_ℓ·SiLU(e_ℓ) + b_ℓ
        self._entered = False

    def __bool__(self) -> bool:
        """Whether the model has anything to precompute."""
        return bool(self.norms)

    def step_of(self, timestep: Any) -> int | None:
        """Which call `timestep` is (by identity), or None when it is not one of this table's."""
        step = self._steps.get(id(timestep))
        if step is None or self.call_timesteps[step] is not timestep or not self.modulation:
            return None
        return step

    @torch.no_grad()
    def precompute(self) -> None:
        """One batched embedding + modulation call per module over all S·R rows."""
        flat_t = self.timesteps.reshape(-1)
        flat_y = self.class_labels.repeat(self.steps)
        for norm in self.norms:
            weight = norm.linear.weight
            emb = norm.emb(flat_t.to(weight.device), flat_y.to(weight.device), hidden_dtype=weight.dtype)
            self.embeddings[id(norm)] = emb.reshape(self.steps, self.rows, -1)
            self.modulation[id(norm)] = norm.linear(norm.silu(emb)).reshape(self.steps, self.rows, -1)

    def __enter__(self) -> "TrajectoryConditioning":
        with _LOCK:
            for norm in self.norms:
                tables = _ACTIVE.setdefault(id(norm), [])
                if not tables:  # the first table on this module installs the dispatchers
                    norm.forward = functools.partial(_norm_forward, norm)
                    norm.emb.forward = functools.partial(_emb_forward, norm)
                tables.append(self)
            for block in self.blocks:
                entry = _BLOCKS.setdefault(id(block), [block, 0])
                if not entry[1]:
                    block.forward = functools.partial(_block_forward, block)
                entry[1] += 1
            self._entered = True
        return self

    def __exit__(self, *exc: Any) -> None:
        with _LOCK:
            for norm in self.norms:
                tables = _ACTIVE.get(id(norm), [])
                if self in tables:
                    tables.remove(self)
                if not tables:  # the last one out restores the class's forward
                    _ACTIVE.pop(id(norm), None)
                    norm.__dict__.pop("forward", None)
                    norm.emb.__dict__.pop("forward", None)
            if self._entered:
                self._entered = False
                for block in self.blocks:
                    entry = _BLOCKS.get(id(block))
                    if entry is not None:
                        entry[1] -= 1
                        if entry[1] <= 0:  # the last table out restores the class's forward
                            del _BLOCKS[id(block)]
                            block.__dict__.pop("forward", None)
