r"""Greedy structured Optimal Brain Surgeon (OBS) for groups of input columns (docs/method.md §3).

Lineage: OBS (Hassibi & Stork 1993) → OBC / SparseGPT (Frantar & Alistarh 2022–23) →
ZipLM (Kurtic et al. 2023), whose structured variant removes whole groups of input
columns (attention heads, MLP units) one group at a time.

Notation
--------

=====================  =================  ==================================================
code                   symbol             meaning
=====================  =================  ==================================================
``weight``, ``W``      W  (out × in)      the layer weight, y = W x
``hessian``            H  (in × in)       XᵀX / n over the n calibration tokens (rows of X)
``damping``            λ                  relative damping, H_λ = H + λ·mean(diag H)·I
``h_inv``              H⁻¹                inverse of H_λ restricted to the kept columns
                                          (removed rows/columns are kept at zero)
``group_size``         |g|                columns per group (head_dim or 1)
``g``                  g                  one group = input columns [g·|g|, (g+1)·|g|)
``block_inv[g]``       ((H⁻¹)_gg)⁻¹       inverse of the g×g diagonal block of H⁻¹
``saliency[g]``        ε_g                error increase if group g is removed next
``keep``               S                  the kept columns
``dead``               —                  columns with H_jj = 0 (input always zero)
=====================  =================  ==================================================

Derivation
----------

1. *Objective.* For a linear layer the output reconstruction error of a weight change
   ΔW over the calibration tokens is E(ΔW) = ‖ΔW Xᵀ‖²_F / n = tr(ΔW H ΔWᵀ) — exactly
   quadratic, so the second-order OBS formulas below are exact, not approximations.
   E decomposes over output rows: every row solves the same problem with the same H.

2. *Removing group g.* Minimise E(ΔW) subject to ΔW[:, g] = −W[:, g] (the group's
   columns become zero); the Lagrangian gives, per row w (1 × in),

       δw = −w_g ((H⁻¹)_gg)⁻¹ (H⁻¹)_g,:        ε_g = w_g ((H⁻¹)_gg)⁻¹ w_gᵀ,

   and summed over rows: ε_g = tr(W[:, g] ((H⁻¹)_gg)⁻¹ W[:, g]ᵀ). The update
   W ← W − W[:, g] ((H⁻¹)_gg)⁻¹ (H⁻¹)_g,: moves the *kept* columns to absorb what the
   removed ones contributed (that is the "surgeon" part; magnitude pruning has none).

3. *Next step.* With g gone the problem lives on the remaining columns S; the inverse of
   H_SS is the Schur-complement downdate

       H⁻¹ ← H⁻¹ − (H⁻¹)_:,g ((H⁻¹)_gg)⁻¹ (H⁻¹)_g,:,

   after which the g rows/columns are exactly zero (we zero them explicitly against
   round-off). Greedy: always remove the group of smallest ε_g.

4. *One pass gives every sparsity.* The sequentially updated W after k removals equals
   the joint least-squares optimum for the kept set S_k,

       W'_S = W H_:,S (H_SS)⁻¹                           (`reconstruct_weights`),

   because each OBS step is the exact minimiser given the previous optimum: if W₁ is
   optimal on S (its residual is H-orthogonal to the columns S), then for any W' on
   S' ⊂ S, E(W' − W) = E(W₁ − W) + E(W' − W₁) (Pythagoras), and minimising the second
   term with the columns S∖S' forced to zero is exactly one OBS step with H_SS. So the
   greedy order is recorded once (`obs_prune_order`) and the weights of any prefix come
   from the closed form; `tests/test_obs.py` checks the two agree. The sum of the first
   k saliencies is the total error E of the k-removal solution (measured with H_λ).

Why damping. H is singular or badly conditioned whenever the calibration tokens span
fewer directions than `in` (few tokens, correlated channels); H⁻¹ would then amplify
noise into huge weight updates. Adding λ·mean(diag H)·I (λ = 0.01, **always on**, as in
SparseGPT) bounds the condition number at the cost of a slightly biased objective; the
reported errors are measured with this damped H_λ.

Why dead columns. A column whose input is always zero on the calibration data has
H_jj = 0 (and, H being PSD, a zero row and column): H is singular without damping, and
with it the column's only curvature is the tiny damping term, so (H⁻¹)_jj is huge and
meaningless. As in SparseGPT the column gets H_jj = 1 (then is damped like the others);
its zero row/column decouple it from every other column, so its weights neither
influence nor receive any update and are kept as they are. Its true cost of removal is
zero, so a group whose columns are all dead is removed first with error 0, and dead
columns do not count in the saliency of partly dead groups.

Cost. For |g| = 1 (MLP units) the downdate is kept as a low-rank factor (see
`_remove_columns`): a 192 × 768 layer removing 700 units takes ≈ 0.4 s on one CPU core.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PruneTrace",
    "damped_hessian",
    "group_columns",
    "obs_prune",
    "obs_prune_order",
    "reconstruct_weights",
    "prepare_layer",
    "PreparedLayer",
    "magnitude_prune_order",
    "layer_reconstruction_error",
    "full_width_weight",
]


@dataclass(frozen=True)
class PruneTrace:
    """The greedy removal order of one layer's groups and the error of each removal.

    `order[i]` is the group removed at step i and `errors[i]` its saliency ε (for OBS: the
    increase of tr(ΔW H_λ ΔWᵀ); for magnitude: the group's column norm). Removing the
    first k groups of `order` is the k-group pruning of this layer. `method` is "obs" or
    "magnitude"; `damping` is λ (0 for magnitude).
    """

    order: tuple[int, ...]
    errors: tuple[float, ...]
    damping: float
    group_size: int
    num_groups: int
    method: str = "obs"

    def __post_init__(self) -> None:
        if len(self.order) != len(self.errors):
            raise ValueError(f"order and errors differ in length: {len(self.order)} vs {len(self.errors)}")
        if len(set(self.order)) != len(self.order) or any(not 0 <= g < self.num_groups for g in self.order):
            raise ValueError(f"order must hold distinct groups in [0, {self.num_groups}), got {self.order}")

    def kept_groups(self, num_remove: int) -> tuple[int, ...]:
        """The groups that remain (ascending) after the first `num_remove` removals."""
        _check_count("num_remove", num_remove, len(self.order))
        removed = set(self.order[:num_remove])
        return tuple(g for g in range(self.num_groups) if g not in removed)

    def to_dict(self) -> dict:
        """JSON-serialisable form (for cached plans)."""
        return {
            "order": list(self.order),
            "errors": list(self.errors),
            "damping": self.damping,
            "group_size": self.group_size,
            "num_groups": self.num_groups,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, value: dict) -> "PruneTrace":
        """Inverse of `to_dict`."""
        return cls(
            order=tuple(int(g) for g in value["order"]),
            errors=tuple(float(e) for e in value["errors"]),
            damping=float(value["damping"]),
            group_size=int(value["group_size"]),
            num_groups=int(value["num_groups"]),
            method=str(value.get("method", "obs")),
        )

    def cumulative_error(self, num_remove: int) -> float:
        """Σ of the first `num_remove` errors (for OBS: the layer's total reconstruction error)."""
        _check_count("num_remove", num_remove, len(self.order))
        return float(sum(self.errors[:num_remove]))


def _check_count(name: str, value: int, maximum: int) -> int:
    if isinstance(value, bool) or int(value) != value or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [0, {maximum}], got {value!r}")
    return int(value)


def _check_layer(weight: torch.Tensor, group_size: int) -> tuple[int, int, int]:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out × in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if isinstance(group_size, bool) or int(group_size) != group_size or not 1 <= group_size <= in_features:
        raise ValueError(f"group_size must be an integer in [1, {in_features}], got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input columns")
    return out_features, in_features, in_features // int(group_size)


def _check_hessian(hessian: torch.Tensor, in_features: int) -> None:
    if tuple(hessian.shape) != (in_features, in_features):
        raise ValueError(
            f"hessian must be {in_features} × {in_features} to match the weight's inputs, "
            f"got shape {tuple(hessian.shape)}"
        )


def _check_damping(damping: float) -> float:
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0 (0.01 is the default), got {damping!r}")
    return float(damping)


def group_columns(groups: Iterable[int], group_size: int) -> torch.Tensor:
    """The input-column indices of `groups` (in the given order), as a LongTensor."""
    groups = torch.as_tensor(list(groups), dtype=torch.long)
    offsets = torch.arange(group_size, dtype=torch.long)
    return (groups[:, None] * group_size + offsets[None, :]).reshape(-1)  # (groups·size,)


def damped_hessian(hessian: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_λ, dead): float64 H with dead columns set to H_jj = 1, plus λ·mean(diag H)·I.

    `dead` (bool, in) marks the zero-diagonal columns. mean(diag H) is taken over the
    original diagonal (1.0 if that is zero, i.e. every column is dead).
    """
    damping = _check_damping(damping)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square, got shape {tuple(hessian.shape)}")
    h = hessian.detach().to(torch.float64).clone()
    if not torch.isfinite(h).all():
        raise ValueError("hessian has non-finite entries; check the calibration inputs")
    diagonal = h.diagonal()  # a view: writes go into h
    dead = diagonal == 0
    scale = diagonal.mean().item()
    if scale <= 0:
        scale = 1.0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diagonal[dead] = 1.0
    diagonal += damping * scale
    return h, dead


def _cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError(
            f"the Hessian is not positive definite with damping {damping}; "
            "use damping > 0 (0.01 is the default) or more calibration tokens"
        )
    return factor


# Per-step work (elements) below which the greedy loop runs on one CPU thread.
_SMALL_STEP_ELEMENTS = 1 << 22


@contextlib.contextmanager
def _few_threads_for_small_steps(device: torch.device, out_features: int, in_features: int) -> Iterator[None]:
    """Run OBS on a small CPU layer on one intra-op thread, restoring the count after.

    Each greedy step is a dozen ops of ≲ 10⁶ elements, where thread fork/join dominates. When
    another process competes for the cores it is far worse: measured here (2 cores, a
    2-thread training job alongside) a 192 × 768 layer removing 700 columns took 23 s
    with 2 threads and 0.4 s with 1. Big layers (e.g. DiT-XL's 1152 × 4608 fc2) and GPUs
    keep the default. `torch.set_num_threads` is process-wide, so other threads' CPU ops
    run single-threaded for the duration of this call.
    """
    small = device.type == "cpu" and in_features * (out_features + in_features) <= _SMALL_STEP_ELEMENTS
    previous = torch.get_num_threads()
    if not small or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _remove_groups(
    w: torch.Tensor, h_inv: torch.Tensor, dead: torch.Tensor, group_size: int, num_remove: int
) -> tuple[list[int], list[float]]:
    """Greedy OBS over groups of `group_size` > 1 columns; updates `w` and `h_inv` in place.

    Dense downdates of H⁻¹ (in² per step): groups are few (attention heads), so this is cheap.
    """
    out_features, in_features = w.shape
    num_groups = in_features // group_size
    device = w.device
    live = (~dead).to(torch.float64)  # (in,); dead columns do not count in ε
    dead_group = dead.view(num_groups, group_size).all(dim=1)  # (groups,)
    removed = torch.zeros(num_groups, dtype=torch.bool, device=device)
    eye = torch.eye(group_size, dtype=torch.float64, device=device)
    index = torch.arange(num_groups, device=device)
    order: list[int] = []
    errors: list[float] = []
    for _ in range(num_remove):
        # 1. ε_g = tr(W_:,g ((H⁻¹)_gg)⁻¹ W_:,gᵀ) for every group at once; removed groups
        #    get an identity block so the batched inverse stays defined.
        blocks_4d = h_inv.view(num_groups, group_size, num_groups, group_size)
        blocks = blocks_4d[index, :, index, :]  # (groups, |g|, |g|) diagonal blocks of H⁻¹
        blocks = torch.where(removed[:, None, None], eye, blocks)
        block_inv = torch.linalg.inv(blocks)  # (groups, |g|, |g|) = ((H⁻¹)_gg)⁻¹
        w_groups = (w * live).view(out_features, num_groups, group_size)  # out × groups × |g|
        saliency = torch.einsum("oni,nij,onj->n", w_groups, block_inv, w_groups)  # (groups,)

        # 2. Pick the smallest ε: fully dead groups first, removed groups never.
        priority = torch.where(dead_group, -math.inf, saliency)
        priority = torch.where(removed, math.inf, priority)
        g = int(torch.argmin(priority).item())
        order.append(g)
        errors.append(0.0 if bool(dead_group[g]) else max(float(saliency[g]), 0.0))  # ≥ 0 vs round-off

        # 3. W ← W − W_:,g ((H⁻¹)_gg)⁻¹ (H⁻¹)_g,:   and   H⁻¹ ← H⁻¹ − (H⁻¹)_:,g ((H⁻¹)_gg)⁻¹ (H⁻¹)_g,:
        cols = slice(g * group_size, (g + 1) * group_size)
        rows = h_inv[cols, :].clone()  # |g| × in  (= (H⁻¹)_g,: ; H⁻¹ is symmetric)
        pivot = block_inv[g]  # |g| × |g|
        w.sub_((w[:, cols] @ pivot) @ rows)  # out × in
        h_inv.sub_(rows.T @ (pivot @ rows))  # in × in

        # 4. The removed columns are zero by construction; make it exact.
        w[:, cols] = 0.0
        h_inv[cols, :] = 0.0
        h_inv[:, cols] = 0.0
        removed[g] = True
    return order, errors


def _remove_columns(
    w: torch.Tensor, h_inv: torch.Tensor, dead: torch.Tensor, num_remove: int, damping: float
) -> tuple[list[int], list[float]]:
    """Greedy OBS over single columns (|g| = 1); updates `w` in place, leaves `h_inv` (= H_λ⁻¹) intact.

    Same algorithm as `_remove_groups`, organised for speed: with |g| = 1 each downdate is
    rank one, H⁻¹_k = H⁻¹_0 − Σ_{i<k} u_i u_iᵀ with u_i = (H⁻¹_i)_:,j / √(H⁻¹_i)_jj. Only
    the diagonal (for ε) and the pivot row (for the update) of H⁻¹_k are ever needed,
    so they are computed from the factor U = [u_0 … u_{k-1}] (in × k) instead of rewriting
    the whole in × in matrix every step: O(in·k + out·in) per step instead of O(in²).
    """
    out_features, in_features = w.shape
    device = w.device
    live = (~dead).to(torch.float64)  # (in,)
    removed = torch.zeros(in_features, dtype=torch.bool, device=device)
    diag = h_inv.diagonal().clone()  # (in,) diag of H⁻¹_k, kept current
    factor = torch.zeros(in_features, num_remove, dtype=torch.float64, device=device)  # U, in × k
    order: list[int] = []
    errors: list[float] = []
    for k in range(num_remove):
        # 1. ε_j = Σ_rows W_ij² / (H⁻¹)_jj for every column at once.
        w_live = w * live if bool(dead.any()) else w  # out × in
        saliency = (w_live * w_live).sum(dim=0) / torch.where(removed, 1.0, diag)  # (in,)

        # 2. Pick the smallest ε: dead columns first, removed columns never.
        priority = torch.where(dead, -math.inf, saliency)
        priority = torch.where(removed, math.inf, priority)
        j = int(torch.argmin(priority).item())
        order.append(j)
        errors.append(0.0 if bool(dead[j]) else max(float(saliency[j]), 0.0))  # ≥ 0 vs round-off

        # 3. Pivot row of the current inverse: (H⁻¹_k)_j,: = (H⁻¹_0)_j,: − U_j,: Uᵀ.
        row = h_inv[j] - factor[:, :k] @ factor[j, :k]  # (in,)
        row[removed] = 0.0  # removed columns are decoupled exactly
        pivot = float(row[j])
        if not pivot > 0.0:
            raise ValueError(
                f"OBS lost positive definiteness at step {k} (pivot {pivot:.3g}); increase damping above {damping}"
            )

        # 4. W ← W − W_:,j (H⁻¹)_j,: / (H⁻¹)_jj ;  H⁻¹ ← H⁻¹ − u uᵀ with u = (H⁻¹)_:,j / √(H⁻¹)_jj.
        w.addr_(w[:, j].clone(), row, alpha=-1.0 / pivot)  # rank-1 weight update, out × in
        u = row / math.sqrt(pivot)  # (in,)
        factor[:, k] = u
        diag -= u * u

        # 5. The removed column is zero by construction; make it exact.
        w[:, j] = 0.0
        removed[j] = True
    return order, errors


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    num_remove: int,
    damping: float = 0.01,
) -> tuple[PruneTrace, torch.Tensor]:
    """Greedy structured OBS: the removal trace and the updated full-width weight (float64).

    Removes `num_remove` of the in/group_size groups one at a time (smallest ε_g first,
    fully dead groups before all others), updating the kept weights after each removal.
    The returned weight is out × in with the removed columns exactly zero.
    """
    out_features, in_features, num_groups = _check_layer(weight, group_size)
    _check_hessian(hessian, in_features)
    num_remove = _check_count("num_remove", num_remove, num_groups)
    damping = _check_damping(damping)
    device = weight.device

    with _few_threads_for_small_steps(device, out_features, in_features):
        w = weight.detach().to(device=device, dtype=torch.float64).clone()  # out × in
        h, dead = damped_hessian(hessian.to(device), damping)
        h_inv = torch.cholesky_inverse(_cholesky(h, damping))  # in × in, H_λ⁻¹
        h_inv = (h_inv + h_inv.T) / 2
        if group_size == 1:
            order, errors = _remove_columns(w, h_inv, dead, num_remove, damping)
        else:
            order, errors = _remove_groups(w, h_inv, dead, group_size, num_remove)
    trace = PruneTrace(tuple(order), tuple(errors), damping, int(group_size), num_groups, "obs")
    return trace, w


def obs_prune_order(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    num_remove: int,
    damping: float = 0.01,
) -> PruneTrace:
    """The greedy OBS removal order and per-removal errors ε of `num_remove` groups.

    `weight` is out × in, `hessian` in × in (XᵀX/n at the layer input). Use
    `reconstruct_weights(weight, hessian, trace.kept_groups(k), ...)` for the optimal
    weights after any k ≤ num_remove removals.
    """
    trace, _ = obs_prune(weight, hessian, group_size, num_remove, damping)
    return trace


def _check_groups(groups: Iterable[int], num_groups: int, name: str) -> list[int]:
    chosen = sorted(int(g) for g in groups)
    if len(set(chosen)) != len(chosen) or any(not 0 <= g < num_groups for g in chosen):
        raise ValueError(f"{name} must be distinct groups in [0, {num_groups}), got {chosen}")
    return chosen


def reconstruct_weights(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    keep_groups: Iterable[int],
    group_size: int,
    damping: float = 0.01,
    prepared: "PreparedLayer | None" = None,
) -> torch.Tensor:
    """Least-squares optimal weight on the kept columns: W'_S = W H_λ[:, S] (H_λ[S, S])⁻¹.

    Returns out × (len(keep_groups)·group_size) in `weight`'s dtype, columns in ascending
    group order. With the same damping this equals the weight that `obs_prune` reaches by
    sequential removals (module docstring, step 4). `prepared` (`prepare_layer` of the same
    weight, Hessian and damping) skips the work every kept set shares: one layer solved at
    many sparsities (the tuner, the studio's slider) pays it once.
    """
    out_features, in_features, num_groups = _check_layer(weight, group_size)
    keep = _check_groups(keep_groups, num_groups, "keep_groups")
    if prepared is None:
        prepared = prepare_layer(weight, hessian, damping)
    elif prepared.weight_times_hessian.shape != (out_features, in_features):
        raise ValueError(f"prepared is for a {tuple(prepared.weight_times_hessian.shape)} layer, the weight is {out_features} × {in_features}")
    columns = group_columns(keep, group_size).to(weight.device)  # (|S|,)
    if columns.numel() == 0:
        return weight.new_zeros(out_features, 0)
    h = prepared.damped_hessian
    factor = _cholesky(h[columns][:, columns], prepared.damping)  # |S| × |S|
    rhs = prepared.weight_times_hessian[:, columns].T  # |S| × out: (W H_λ)[:, S]
    kept = torch.cholesky_solve(rhs, factor).T  # out × |S|
    return kept.to(weight.dtype)


@dataclass(frozen=True)
class PreparedLayer:
    """What every kept set of one layer shares: H_λ (float64, dead columns fixed) and W·H_λ."""

    damped_hessian: torch.Tensor  # in × in
    weight_times_hessian: torch.Tensor  # out × in
    damping: float

    @property
    def nbytes(self) -> int:
        return self.damped_hessian.numel() * 8 + self.weight_times_hessian.numel() * 8


def prepare_layer(weight: torch.Tensor, hessian: torch.Tensor, damping: float = 0.01) -> PreparedLayer:
    """H_λ and W·H_λ of one layer (float64, on `weight`'s device), for `reconstruct_weights(prepared=...)`."""
    _, in_features, _ = _check_layer(weight, 1)
    _check_hessian(hessian, in_features)
    h, _ = damped_hessian(hessian.to(weight.device), damping)
    return PreparedLayer(h, weight.detach().to(torch.float64) @ h, float(damping))


def magnitude_prune_order(weight: torch.Tensor, group_size: int, num_remove: int) -> PruneTrace:
    """Baseline: remove the groups of smallest column L2 norm first, no weight update.

    `errors` holds the norms ‖W[:, g]‖_F in removal order; `damping` is 0.
    """
    out_features, _, num_groups = _check_layer(weight, group_size)
    num_remove = _check_count("num_remove", num_remove, num_groups)
    w = weight.detach().to(torch.float64).reshape(out_features, num_groups, int(group_size))  # out × groups × |g|
    norms = w.pow(2).sum(dim=(0, 2)).sqrt()  # (groups,)
    ranked = torch.argsort(norms, stable=True)[:num_remove]
    order = tuple(int(g) for g in ranked)
    return PruneTrace(order, tuple(float(norms[g]) for g in order), 0.0, int(group_size), num_groups, "magnitude")


def full_width_weight(
    kept_weight: torch.Tensor, keep_groups: Sequence[int], group_size: int, num_groups: int
) -> torch.Tensor:
    """Scatter an out × (kept columns) weight back to out × in, zeros in the removed columns."""
    keep = _check_groups(keep_groups, num_groups, "keep_groups")
    columns = group_columns(keep, group_size).to(kept_weight.device)  # (|S|,)
    if kept_weight.ndim != 2 or kept_weight.shape[1] != columns.numel():
        raise ValueError(
            f"kept_weight must be out × {columns.numel()} for {len(keep)} groups of {group_size}, "
            f"got shape {tuple(kept_weight.shape)}"
        )
    full = kept_weight.new_zeros(kept_weight.shape[0], num_groups * group_size)  # out × in
    full[:, columns] = kept_weight
    return full


def layer_reconstruction_error(
    weight_dense: torch.Tensor, weight_pruned_full_width: torch.Tensor, hessian: torch.Tensor
) -> float:
    """E = tr(ΔW H ΔWᵀ) = ‖ΔW Xᵀ‖²/n, ΔW = pruned − dense (both out × in, removed columns zero)."""
    if weight_dense.shape != weight_pruned_full_width.shape:
        raise ValueError(
            f"weights must have the same shape, got {tuple(weight_dense.shape)} "
            f"and {tuple(weight_pruned_full_width.shape)}"
        )
    _check_hessian(hessian, weight_dense.shape[1])
    delta = weight_pruned_full_width.to(torch.float64) - weight_dense.to(torch.float64)  # out × in
    return float(((delta @ hessian.to(delta)) * delta).sum())
