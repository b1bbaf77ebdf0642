"""A K-stage plan: the three-stage plan's score and sampler, cut into K ≥ 2 stages (docs/method.md §12.6).

`build_k_plan` is `build_plan` with `num_stages`: the score curve and the sampler's
timesteps are the three-stage plan's, the stages come from `divide_k_stages` (K = 3 is
eq. 1.4 exactly), the sparsities from `allocate_k_stages`. It is what `plan --stages K`
prints and what `prune --stages K` prunes and writes (checkpoint format v3).

The plan is a plain record: `to_dict` / `from_dict` round-trip it through JSON, and
`check` recomputes what can be recomputed without the model (the step counts of the
stored timesteps, the means of eq. 2.1, the MACs), so an edited plan is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mosaic_core.divide.plan import _json_number
from mosaic_core.divide.multistage import StageAllocation, StagePartition, allocate_k_stages, check_num_stages, divide_k_stages, k_stage_macs
from mosaic_core.divide.shapes import TransformerShape


@dataclass(frozen=True)
class KStagePlan:
    """K stages of one model's sampling trajectory and the heads and units each keeps."""

    model: str
    scheduler: str
    num_inference_steps: int
    M: float
    lam: float
    cx: float
    sparsity: float  # the overall target (eq. 2.1 mean over steps)
    timesteps: tuple[float, ...]  # the sampler's model timesteps, in sampling order
    partition: StagePartition
    allocation: StageAllocation
    shape: TransformerShape

    @property
    def num_stages(self) -> int:
        """K."""
        return self.partition.num_stages

    @property
    def step_counts(self) -> tuple[int, ...]:
        """Sampler steps per stage, noisiest first."""
        return self.allocation.step_counts

    @property
    def macs_dense(self) -> int:
        """Block-linear MACs of one image with the dense network at every step."""
        return k_stage_macs(self.shape, _dense_allocation(self))

    @property
    def macs_staged(self) -> int:
        """Block-linear MACs of one image with each stage's network (eq. 4.7 for K stages)."""
        return k_stage_macs(self.shape, self.allocation)

    @property
    def ideal_speedup(self) -> float:
        """MACs ratio dense / staged."""
        return self.macs_dense / self.macs_staged if self.macs_staged else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (`from_dict` reads it back)."""
        a = self.allocation
        return {
            "kind": "k-stage",
            "model": self.model,
            "scheduler": self.scheduler,
            "num_inference_steps": self.num_inference_steps,
            "M": self.M,
            "lam": self.lam,
            "cx": self.cx,
            "sparsity": self.sparsity,
            "num_stages": self.num_stages,
            "num_train_timesteps": self.partition.num_train_timesteps,
            "cuts": list(self.partition.cuts),
            "timesteps": [_json_number(t) for t in self.timesteps],
            "shape": {"num_layers": self.shape.num_layers, "num_heads": self.shape.num_heads, "head_dim": self.shape.head_dim,
                      "mlp_hidden": self.shape.mlp_hidden, "num_tokens": self.shape.num_tokens},
            "stages": [
                {"index": i, "t_min": None if r is None else r[0], "t_max": None if r is None else r[1], "num_steps": n,
                 "requested": q, "sparsity": s, "heads_kept": h, "units_kept": u}
                for i, (r, n, q, s, h, u) in enumerate(
                    zip(self.partition.ranges, a.step_counts, a.requested, a.achieved, a.heads_kept, a.units_kept)
                )
            ],
            "overall_sparsity": a.overall_achieved,
            "overall_requested": a.overall_requested,
            "peak_stage": a.peak_stage,
            "peak_capped": a.peak_capped,
            "macs_dense": self.macs_dense,
            "macs_staged": self.macs_staged,
            "ideal_speedup": self.ideal_speedup,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KStagePlan":
        """A plan from `to_dict`'s form; ValueError (or KeyError/TypeError) when it does not hold together."""
        if data.get("kind") != "k-stage":
            raise ValueError("not a K-stage plan (kind must be 'k-stage')")
        stages = data["stages"]
        partition = StagePartition(int(data["num_train_timesteps"]), tuple(data["cuts"]))
        if len(stages) != partition.num_stages or data["num_stages"] != partition.num_stages:
            raise ValueError(f"{len(stages)} stages listed, the cuts make {partition.num_stages}")
        counts = partition.count_steps(np.asarray(data["timesteps"], dtype=np.float64))
        achieved = tuple(float(s["sparsity"]) for s in stages)
        allocation = StageAllocation(
            step_counts=counts,
            requested=tuple(float(s["requested"]) for s in stages),
            achieved=achieved,
            heads_kept=tuple(int(s["heads_kept"]) for s in stages),
            units_kept=tuple(int(s["units_kept"]) for s in stages),
            overall_requested=float(data["overall_requested"]),
            overall_achieved=float(sum(n * s for n, s in zip(counts, achieved)) / max(1, sum(counts))),
            peak_stage=int(data["peak_stage"]),
            peak_capped=bool(data["peak_capped"]),
        )
        shape = TransformerShape(**{k: int(v) for k, v in data["shape"].items()})
        plan = cls(
            model=str(data["model"]), scheduler=str(data["scheduler"]), num_inference_steps=int(data["num_inference_steps"]),
            M=float(data["M"]), lam=float(data["lam"]), cx=float(data["cx"]), sparsity=float(data["sparsity"]),
            timesteps=tuple(float(t) for t in data["timesteps"]), partition=partition, allocation=allocation, shape=shape,
        )
        plan.check(data)
        return plan

    def check(self, data: Optional[dict[str, Any]] = None) -> None:
        """ValueError unless the stored figures agree with what the plan recomputes."""
        if len(self.timesteps) != self.num_inference_steps:
            raise ValueError(f"{len(self.timesteps)} timesteps for {self.num_inference_steps} steps")
        for index, stage in enumerate((data or {}).get("stages", [])):
            expected = self.partition.ranges[index]
            if (stage.get("t_min"), stage.get("t_max")) != ((None, None) if expected is None else tuple(expected)):
                raise ValueError(f"stage {index} lists timesteps {stage.get('t_min')}–{stage.get('t_max')}, its cuts say {expected}")
            if stage.get("num_steps") != self.step_counts[index]:
                raise ValueError(f"stage {index} lists {stage.get('num_steps')} steps, its timesteps give {self.step_counts[index]}")
        for heads, units in zip(self.allocation.heads_kept, self.allocation.units_kept):
            if not (1 <= heads <= self.shape.num_heads and 1 <= units <= self.shape.mlp_hidden):
                raise ValueError(f"kept counts ({heads} heads, {units} units) outside the model's {self.shape.num_heads} and {self.shape.mlp_hidden}")


def _dense_allocation(plan: KStagePlan) -> StageAllocation:
    k = plan.num_stages
    return StageAllocation(plan.step_counts, (0.0,) * k, (0.0,) * k, (plan.shape.num_heads,) * k, (plan.shape.mlp_hidden,) * k,
                           0.0, 0.0, plan.allocation.peak_stage)


def build_k_plan(
    model,
    num_inference_steps: Optional[int] = None,
    M: float = 0.55,
    lam: float = 0.01,
    sparsity: float = 0.0,
    num_stages: int = 3,
    scheduler: Optional[str] = None,
    cx: float = 1.0,
) -> KStagePlan:
    """The K-stage plan of `model` (a registry name, folder or `ModelSpec`); see the module docstring.

    ValueError for a model whose cost is priced layer by layer (`BlockwiseShape`: a UNet, whose
    levels differ per block, and the text-to-image transformers with cross or joint attention;
    one head and unit count per stage does not describe them) and for a K the trajectory
    cannot hold.
    """
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.registry import resolve_model
    from mosaic_core.models.samplers import model_default_sampler

    num_stages = check_num_stages(num_stages)
    spec = resolve_model(model) if isinstance(model, str) else model
    if not isinstance(spec.shape, TransformerShape):
        raise ValueError(
            f"a K-stage plan needs a DiT-style transformer (one self-attention and one MLP per block, the same sizes in "
            f"every block, like digits-dit and facebook/DiT-XL-2-256); '{spec.name}' is not one: use 3 stages"
        )
    scheduler = model_default_sampler(spec) if scheduler is None else scheduler
    steps = spec.default_steps if num_inference_steps is None else num_inference_steps
    three = build_plan(spec, steps, M, lam, sparsity=sparsity, scheduler=scheduler, cx=cx)
    curve = three.curve()
    partition = divide_k_stages(curve, num_stages, M)
    timesteps = tuple(float(t) for t in np.asarray(three.timesteps, dtype=np.float64).reshape(-1))
    counts = partition.count_steps(np.asarray(timesteps, dtype=np.float64))
    allocation = allocate_k_stages(curve, partition, counts, sparsity, spec.shape)
    return KStagePlan(spec.name, scheduler, steps, float(M), float(lam), float(cx), float(sparsity), timesteps, partition, allocation, spec.shape)


def format_k_plan(plan: KStagePlan) -> str:
    """The plan as a table: one row per stage, noisiest first."""
    lines = [
        f"{plan.model}: {plan.scheduler} {plan.num_inference_steps} steps, K = {plan.num_stages} stages (M = {plan.M}, λ = {plan.lam})",
        f"{'stage':>5} {'timesteps':>11} {'steps':>5} {'sparsity':>8} {'heads':>5} {'units':>6}",
    ]
    a = plan.allocation
    for i, r in enumerate(plan.partition.ranges):
        span = "-" if r is None else f"{r[1]}–{r[0]}"
        mark = "  <- peak" if i == a.peak_stage else ""
        lines.append(f"{i:>5} {span:>11} {a.step_counts[i]:>5} {a.achieved[i]:>8.3f} {a.heads_kept[i]:>5} {a.units_kept[i]:>6}{mark}")
    lines.append(
        f"overall sparsity {a.overall_achieved:.3f} (asked {plan.sparsity:.3f}); MACs {plan.macs_staged:,} of {plan.macs_dense:,}; "
        f"ideal speed-up {plan.ideal_speedup:.2f}×"
    )
    return "\n".join(lines)
