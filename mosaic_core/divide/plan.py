"""A MosaicDiff plan: the Divide decisions for one model, sampler and sparsity, as a value.

"Decide, then act": `build_plan` runs the pure math (schedule → score → stages → step
counts → allocation → cost) and returns a small frozen `Plan` that serialises to JSON
(`to_dict` / `from_dict`). Pruning and staged sampling read the plan later; they never
recompute the decisions. The score curve is not stored (T floats), only what rebuilds it:
`Plan.curve()` recomputes it from the scheduler config, λ and c_x in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from mosaic_core.divide.allocation import (
    Allocation,
    allocate_sparsity,
    check_sparsity,
    manual_sparsity,
    uniform_sparsity,
)
from mosaic_core.divide.cost import ideal_speedup, linear_parameter_count, sampling_macs, staged_parameter_count
from mosaic_core.divide.shapes import BlockwiseShape, TransformerShape, shape_from_dict
from mosaic_core.limits import shown
from mosaic_core.models.registry import ModelSpec, resolve_model
from mosaic_core.divide.noise_schedule import ScoreCurve, alphas_cumprod, check_cx, check_lam, importance_score
from mosaic_core.divide.flow_schedule import flow_importance_score, flow_schedule, is_flow_matching
from mosaic_core.models.samplers import (
    check_drop_steps,
    check_num_steps,
    check_sampler_fits,
    check_scheduler_name,
    kept_step_indices,
    sampler_timesteps,
)
from mosaic_core.divide.stages import DEFAULT_M, EDGE_SOURCES, STAGE_NAMES, StageBounds, check_edges, check_M, divide_stages

DEFAULT_LAM = 0.01
DEFAULT_STEPS = 50


def schedule_curve(
    scheduler_config: Mapping[str, Any], lam: float, cx: float, image_seq_len: Optional[int] = None
) -> ScoreCurve:
    """The importance score of a model's schedule: ᾱ-based (method §1) or flow matching (§8).

    `image_seq_len` (image tokens per sample) matters only for a dynamically shifted flow
    schedule, whose σ depends on it.
    """
    if is_flow_matching(scheduler_config):
        return flow_importance_score(flow_schedule(scheduler_config, image_seq_len), lam, cx)
    return importance_score(alphas_cumprod(scheduler_config), lam, cx)


def _json_number(value: float) -> int | float:
    """An integral float as int (timesteps read 999, not 999.0), anything else as float."""
    value = float(value)
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class Plan:
    """Stages, step counts, per-stage sparsity and cost of one MosaicDiff configuration.

    `timesteps[k]` is the model timestep of sampler step k and `step_stages[k]` its stage
    index (0 early, 1 middle, 2 late). MACs are block-linear, one image, no CFG doubling.
    `edges_source` says where the stage edges came from: "M" (the threshold rule, eq. 1.4)
    or "manual" (set by hand, `build_plan(edges=...)`; M is then recorded but unused).
    """

    model: str
    scheduler: str
    num_inference_steps: int
    M: float
    lam: float
    cx: float
    mode: str
    scheduler_config: Mapping[str, Any]
    shape: TransformerShape | BlockwiseShape
    bounds: StageBounds
    allocation: Allocation
    timesteps: tuple[float, ...]
    step_stages: tuple[int, ...]
    macs_dense: int
    macs_staged: int
    image_seq_len: Optional[int] = None  # image tokens per sample; set only when it shifted σ (§8.1)
    edges_source: str = "M"
    # reference steps dropped evenly (`samplers.kept_step_indices`): `timesteps` are the kept ones of the
    # `num_inference_steps` reference steps, sampled with `SampleConfig(drop_steps=...)` (docs/method.md §4.6)
    drop_steps: int = 0

    def __post_init__(self) -> None:
        if self.edges_source not in EDGE_SOURCES:
            raise ValueError(f"edges_source must be one of {', '.join(EDGE_SOURCES)}, got {self.edges_source!r}")

    @property
    def manual_edges(self) -> Optional[tuple[int, int]]:
        """The hand-set edges (τ_lo, τ_hi) when `edges_source` is "manual", else None."""
        return self.bounds.middle if self.edges_source == "manual" else None

    @property
    def step_counts(self) -> tuple[int, int, int]:
        """(n_early, n_middle, n_late): sampler steps per stage."""
        return self.allocation.step_counts

    @property
    def overall_sparsity(self) -> float:
        """Achieved step-weighted sparsity Σ nᵢ aᵢ / Σ nᵢ."""
        return self.allocation.overall_achieved

    @property
    def ideal_speedup(self) -> float:
        """Dense MACs / staged MACs."""
        return ideal_speedup(self.macs_dense, self.macs_staged)

    def layer_keep_counts(self, stage: int) -> dict[str, int] | None:
        """Kept groups per prunable layer name for `stage` (blockwise shapes), else None."""
        keeps = self.allocation.layer_keeps
        if keeps is None or keeps[stage] is None:
            return None
        return {layer.name: int(kept) for layer, kept in zip(self.shape.layers, keeps[stage])}

    def memory_figures(self) -> dict[str, int]:
        """Parameters (dense, three stage networks side by side) and the float64 Hessian bytes
        of a prune: every prunable layer at once, and the largest block (block by block).

        Derived figures, so not part of `to_dict` (whose content keys the checkpoint cache);
        `plan --json` prints them next to it."""
        return {
            "parameters_dense": int(linear_parameter_count(self.shape)),
            "parameters_staged": int(staged_parameter_count(self.shape, self.allocation if self.allocation.layer_keeps else list(zip(self.allocation.heads_kept, self.allocation.units_kept)))),
            "hessian_bytes": int(self.shape.hessian_bytes()),
            "hessian_block_bytes": int(self.shape.block_hessian_bytes()),
        }

    def stage_of(self, timesteps) -> np.ndarray:
        """Stage index (0 early, 1 middle, 2 late) of model timesteps (rounded, clipped)."""
        return self.bounds.stage_of(timesteps)

    def curve(self) -> ScoreCurve:
        """The importance score curve this plan was divided on (recomputed, cheap)."""
        return schedule_curve(self.scheduler_config, self.lam, self.cx, self.image_seq_len)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (see `from_dict` for the way back)."""
        allocation = self.allocation
        stages = []
        for index, name in enumerate(STAGE_NAMES):
            bounds = self.bounds.ranges[index]
            stages.append(
                {
                    "name": name,
                    "t_min": None if bounds is None else int(bounds[0]),
                    "t_max": None if bounds is None else int(bounds[1]),
                    "num_steps": int(allocation.step_counts[index]),
                    "sparsity": float(allocation.achieved[index]),
                    "requested_sparsity": float(allocation.requested[index]),
                    "heads_kept": int(allocation.heads_kept[index]),
                    "units_kept": int(allocation.units_kept[index]),
                }
            )
            if allocation.layer_keeps is not None:
                stages[-1]["layer_keeps"] = [int(k) for k in allocation.layer_keeps[index]]
        data = {
            "model": self.model,
            "scheduler": self.scheduler,
            "num_inference_steps": int(self.num_inference_steps),
            "M": float(self.M),
            "lam": float(self.lam),
            "cx": float(self.cx),
            "mode": self.mode,
            "num_train_timesteps": int(self.bounds.num_train_timesteps),
            "stages": stages,
            "middle_capped": bool(allocation.middle_capped),
            "overall_sparsity": float(allocation.overall_achieved),
            "requested_sparsity": float(allocation.overall_requested),
            "macs_dense": int(self.macs_dense),
            "macs_staged": int(self.macs_staged),
            "ideal_speedup": float(self.ideal_speedup),
            "timesteps": [_json_number(t) for t in self.timesteps],
            "step_stages": [STAGE_NAMES[s] for s in self.step_stages],
            "shape": self.shape.to_dict(),
            "scheduler_config": dict(self.scheduler_config),
        }
        if self.image_seq_len is not None:  # only dynamically shifted schedules: other plans' dicts are unchanged
            data["image_seq_len"] = int(self.image_seq_len)
        if self.edges_source != "M":  # only then: plans divided by M keep their old dict (and cache keys)
            data["edges_source"] = self.edges_source
        if self.drop_steps:  # likewise: plans of every reference step keep their old dict
            data["drop_steps"] = int(self.drop_steps)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Rebuild a `Plan` from `to_dict()` output; raises ValueError on a malformed dict."""
        try:
            stages = list(data["stages"])
            if [stage["name"] for stage in stages] != list(STAGE_NAMES):
                raise ValueError(f"plan stages must be named {list(STAGE_NAMES)} in that order")
            middle = stages[1]
            bounds = StageBounds.from_middle(
                (int(middle["t_min"]), int(middle["t_max"])), int(data["num_train_timesteps"]), float(data["M"])
            )
            for index, stage in enumerate(stages):
                expected = bounds.ranges[index]
                given = None if stage["t_min"] is None else (int(stage["t_min"]), int(stage["t_max"]))
                if given != expected:
                    raise ValueError(f"plan stage {stage['name']} range {given} disagrees with the middle stage {bounds.middle}")
            allocation = Allocation(
                mode=str(data["mode"]),
                step_counts=tuple(int(stage["num_steps"]) for stage in stages),  # type: ignore[arg-type]
                requested=tuple(float(stage["requested_sparsity"]) for stage in stages),  # type: ignore[arg-type]
                achieved=tuple(float(stage["sparsity"]) for stage in stages),  # type: ignore[arg-type]
                heads_kept=tuple(int(stage["heads_kept"]) for stage in stages),  # type: ignore[arg-type]
                units_kept=tuple(int(stage["units_kept"]) for stage in stages),  # type: ignore[arg-type]
                overall_requested=float(data["requested_sparsity"]),
                overall_achieved=float(data["overall_sparsity"]),
                middle_capped=bool(data.get("middle_capped", False)),
                layer_keeps=tuple(tuple(int(k) for k in stage["layer_keeps"]) for stage in stages) if "layer_keeps" in stages[0] else None,  # type: ignore[arg-type]
            )
            return cls(
                model=str(data["model"]),
                scheduler=str(data["scheduler"]),
                num_inference_steps=int(data["num_inference_steps"]),
                M=float(data["M"]),
                lam=float(data["lam"]),
                cx=float(data["cx"]),
                mode=str(data["mode"]),
                scheduler_config=dict(data["scheduler_config"]),
                shape=shape_from_dict(data["shape"]),
                bounds=bounds,
                allocation=allocation,
                timesteps=tuple(float(t) for t in data["timesteps"]),
                step_stages=tuple(STAGE_NAMES.index(name) for name in data["step_stages"]),
                macs_dense=int(data["macs_dense"]),
                macs_staged=int(data["macs_staged"]),
                image_seq_len=None if data.get("image_seq_len") is None else int(data["image_seq_len"]),
                edges_source=str(data.get("edges_source", "M")),
                drop_steps=int(data.get("drop_steps", 0)),
            )
        except KeyError as error:
            raise ValueError(f"plan dict is missing the key {error}") from None
        except (TypeError, IndexError) as error:
            raise ValueError(f"malformed plan dict: {error}") from None


def build_plan(
    spec: ModelSpec | str,
    num_inference_steps: int = DEFAULT_STEPS,
    M: float = DEFAULT_M,
    lam: float = DEFAULT_LAM,
    sparsity: Optional[float] = None,
    stage_sparsity: Optional[Sequence[float]] = None,
    uniform: bool = False,
    scheduler: str = "ddim",
    cx: float = 1.0,
    image_seq_len: Optional[int] = None,
    edges: Optional[Sequence[int]] = None,
    drop_steps: int = 0,
) -> Plan:
    """Divide a model's sampling trajectory and allocate per-stage sparsity (docs/method.md §1-2).

    Give at most one of `sparsity` (overall target s̄, auto allocation, or one network for
    all steps with `uniform=True`) and `stage_sparsity` (early, middle, late; manual);
    neither means sparsity 0. `edges` = (τ_lo, τ_hi), the middle stage in training
    timesteps (inclusive), sets the stage edges by hand instead of the threshold M
    (docs/method.md §12.1). Every argument is checked before any work, and a bad one
    raises ValueError naming the value and the allowed range.

    A flow-matching model (method §8) takes a `flow-*` sampler; its stage bounds and
    timesteps are in the scheduler's units t = σ·T. `image_seq_len` (image tokens per
    sample; default the spec's) sets μ when its schedule uses dynamic shifting.
    `drop_steps` k keeps N − k of the N reference steps, spread evenly (DDIM only; §4.6): step
    counts, allocation and MACs are then those of the kept steps.
    """
    # 1. Validate everything at the edge (cheap; diffusers is imported only in step 4).
    if isinstance(spec, str):
        spec = resolve_model(spec)
    M = check_M(M)
    lam = check_lam(lam)
    cx = check_cx(cx)
    scheduler = check_scheduler_name(scheduler)
    if sparsity is not None and stage_sparsity is not None:
        raise ValueError("give either sparsity (overall target) or stage_sparsity (early, middle, late), not both")
    if uniform and stage_sparsity is not None:
        raise ValueError("uniform means one sparsity for every step: give sparsity, not stage_sparsity")
    if stage_sparsity is not None:
        if isinstance(stage_sparsity, (str, bytes, dict, set)) or not hasattr(stage_sparsity, "__len__") or len(stage_sparsity) != 3:
            raise ValueError(
                f"stage sparsity needs exactly 3 values (early, middle, late) each in [0, 0.9], got {shown(stage_sparsity)}"
            )
        values = tuple(stage_sparsity)
        for value, name in zip(values, STAGE_NAMES):
            check_sparsity(value, f"{name} sparsity")
        mode = "manual"
    else:
        target = 0.0 if sparsity is None else check_sparsity(sparsity)
        mode = "uniform" if uniform else "auto"
    check_sampler_fits(scheduler, spec.scheduler_config)
    # 2. Schedule and importance score (eq. 1.1-1.3; flow matching: eq. 8.4-8.8).
    if is_flow_matching(spec.scheduler_config):
        if image_seq_len is None:
            image_seq_len = getattr(spec, "image_seq_len", None)
        schedule = flow_schedule(spec.scheduler_config, image_seq_len)
        image_seq_len = schedule.image_seq_len  # kept only when it shifted σ
        num_train_timesteps = schedule.num_train_timesteps
        steps = check_num_steps(num_inference_steps, num_train_timesteps)
        curve = flow_importance_score(schedule, lam, cx)
    else:
        image_seq_len = None
        alpha_bar = alphas_cumprod(spec.scheduler_config)
        num_train_timesteps = alpha_bar.size
        steps = check_num_steps(num_inference_steps, num_train_timesteps)
        curve = importance_score(alpha_bar, lam, cx)
    drop = check_drop_steps(drop_steps, steps, scheduler)
    if edges is not None:
        edges = check_edges(edges, num_train_timesteps)
    # 3. Stages: from the threshold M (eq. 1.4), or the edges set by hand (§12.1).
    bounds = divide_stages(curve, M) if edges is None else StageBounds.from_middle(edges, num_train_timesteps, M)
    # 4. Which stage each sampler step lands in.
    timesteps = sampler_timesteps(scheduler, spec.scheduler_config, steps, image_seq_len)
    if drop:
        timesteps = timesteps[kept_step_indices(steps, drop)]
    step_stages = bounds.stage_of(timesteps)
    counts = bounds.count_steps(timesteps)
    # 5. Per-stage sparsity, rounded to whole heads and units.
    if mode == "manual":
        allocation = manual_sparsity(values, counts, spec.shape)
    elif mode == "uniform":
        allocation = uniform_sparsity(target, counts, spec.shape)
    else:
        allocation = allocate_sparsity(curve, bounds, counts, target, spec.shape)
    # 6. Cost.
    return Plan(
        model=spec.name,
        scheduler=scheduler,
        num_inference_steps=steps,
        M=M,
        lam=lam,
        cx=cx,
        mode=mode,
        scheduler_config=dict(spec.scheduler_config),
        shape=spec.shape,
        bounds=bounds,
        allocation=allocation,
        timesteps=tuple(float(t) for t in timesteps),
        step_stages=tuple(int(s) for s in step_stages),
        macs_dense=sampling_macs(spec.shape, None, counts),
        macs_staged=sampling_macs(spec.shape, allocation, counts),
        image_seq_len=image_seq_len,
        edges_source="M" if edges is None else "manual",
        drop_steps=drop,
    )


def stage_only_plan(spec: ModelSpec | str, plan: Plan, stage: int) -> Plan:
    """The plan that prunes only `stage` (0 early, 1 middle, 2 late) at its sparsity in `plan`.

    Everything else (sampler, steps, M, λ, c_x, hand-set edges) is kept, so comparing the result with the
    dense model shows what that one stage's pruning costs.
    """
    if isinstance(stage, bool) or stage not in (0, 1, 2):
        raise ValueError(f"stage must be 0 (early), 1 (middle) or 2 (late), got {stage!r}")
    name = STAGE_NAMES[stage]
    if plan.step_counts[stage] == 0:
        raise ValueError(f"the {name} stage has no sampler steps in this plan: pruning it alone changes nothing")
    sparsity = plan.allocation.achieved[stage]
    if sparsity <= 0:
        raise ValueError(f"the {name} stage is not pruned in this plan (sparsity 0): raise its sparsity first")
    values = tuple(sparsity if index == stage else 0.0 for index in range(3))
    return build_plan(
        spec, plan.num_inference_steps, plan.M, plan.lam, stage_sparsity=values, scheduler=plan.scheduler, cx=plan.cx,
        image_seq_len=plan.image_seq_len, edges=plan.manual_edges, drop_steps=plan.drop_steps,
    )
