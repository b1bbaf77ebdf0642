"""HTML panels of the Divide section: the per-stage table and the live cost panel.

Pure functions of a `Plan` (and the dense parameter split), returning small HTML strings.
Cells carry `data-*` attributes (`data-stage`, `data-field`) so browser tests read values
without parsing the layout.
"""

from __future__ import annotations

import html

from mosaic_core.divide.cost import staged_parameter_count
from mosaic_core.divide.plan import Plan
from mosaic_core.divide.stages import STAGE_NAMES

from ui import settings
from mosaic_core.models.parameters import ParameterSplit
from mosaic_core.units import format_count


def _chip(name: str) -> str:
    color = settings.STAGE_COLORS[name]
    return f'<span class="mosaic-chip" style="background:{color}"></span>{name}'


def _cell(stage: str, field: str, text: str) -> str:
    return f'<td data-stage="{stage}" data-field="{field}">{html.escape(text)}</td>'


def steps_text(plan: Plan) -> str:
    """"50 steps", or "45 of 50 steps (5 dropped evenly)" for a plan with dropped steps."""
    if plan.drop_steps:
        return f"{len(plan.step_stages)} of {plan.num_inference_steps} steps ({plan.drop_steps} dropped evenly)"
    return f"{plan.num_inference_steps} steps"


def stage_table_html(plan: Plan) -> str:
    """Stage, τ range, sampler steps and achieved sparsity, one row per stage."""
    total = max(sum(plan.step_counts), 1)
    rows = []
    for index, name in enumerate(STAGE_NAMES):
        bounds = plan.bounds.ranges[index]
        tau = "empty" if bounds is None else f"{bounds[0]}–{bounds[1]}"
        steps = plan.step_counts[index]
        rows.append(
            f'<tr data-stage="{name}"><td>{_chip(name)}</td>'
            + _cell(name, "tau", tau)
            + _cell(name, "steps", str(steps))
            + _cell(name, "share", f"{steps / total:.0%}")
            + _cell(name, "sparsity", f"{plan.allocation.achieved[index]:.3f}")
            + "</tr>"
        )
    edges = "set by hand" if plan.manual_edges else "from M"
    caption = (
        f"M = <b data-field=\"M\">{plan.M:.3f}</b>, edges <b data-field=\"edges\">{edges}</b>, "
        f"λ = <b data-field=\"lam\">{plan.lam:g}</b>, "
        f"c<sub>x</sub> = {plan.cx:g} · {plan.scheduler} {steps_text(plan)}"
    )
    return (
        '<div class="mosaic-panel" id="mosaic-stage-table"><table class="mosaic-table">'
        f"<caption>{caption}</caption>"
        "<thead><tr><th>stage</th><th>τ range</th><th>steps</th><th>share</th><th>sparsity</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def cost_panel_html(plan: Plan, split: ParameterSplit) -> str:
    """Requested vs achieved sparsity, kept structure, MACs and parameters of the plan."""
    allocation, shape = plan.allocation, plan.shape
    rows = []
    for index, name in enumerate(STAGE_NAMES):
        rows.append(
            f'<tr data-stage="{name}"><td>{_chip(name)}</td>'
            + _cell(name, "requested", f"{allocation.requested[index]:.3f}")
            + _cell(name, "achieved", f"{allocation.achieved[index]:.3f}")
            + _cell(name, "heads", f"{allocation.heads_kept[index]}/{shape.num_heads}")
            + _cell(name, "units", f"{allocation.units_kept[index]}/{shape.mlp_hidden}")
            + "</tr>"
        )
    staged_linear = staged_parameter_count(shape, allocation)
    staged_total = split.shared + staged_linear
    naive_total = 3 * split.shared + staged_linear
    dense = split.total
    estimate = "" if split.exact else " (estimated from the registry's shape)"
    note = ""
    if allocation.middle_capped:
        note = '<p class="mosaic-note">The middle stage\'s ratio was capped to the lowest of the other stages.</p>'
    mode = {"auto": "automatic allocation", "manual": "set per stage", "uniform": "uniform"}[plan.mode]
    return (
        '<div class="mosaic-panel" id="mosaic-cost-panel">'
        '<table class="mosaic-table">'
        f"<caption>per-stage networks · {html.escape(mode)} · {shape.num_layers} blocks × "
        f"{shape.num_heads} heads × {shape.mlp_hidden} MLP units</caption>"
        "<thead><tr><th>stage</th><th>requested</th><th>achieved</th><th>heads kept</th><th>MLP units kept</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<table class="mosaic-table mosaic-summary"><tbody>'
        "<tr><th>overall sparsity (step-weighted)</th>"
        f'<td>requested <b data-field="overall-requested">{allocation.overall_requested:.3f}</b>, '
        f'achieved <b data-field="overall-achieved">{allocation.overall_achieved:.3f}</b></td></tr>'
        "<tr><th>block-linear MACs per image</th>"
        f'<td>dense <b data-field="macs-dense">{format_count(plan.macs_dense)}</b> → staged '
        f'<b data-field="macs-staged">{format_count(plan.macs_staged)}</b></td></tr>'
        "<tr><th>ideal speed-up</th>"
        f'<td><b data-field="speedup">{plan.ideal_speedup:.2f}×</b> '
        '<span class="mosaic-muted">(if block-linear layers were all the time)</span></td></tr>'
        "<tr><th>prunable linear parameters</th>"
        f'<td>dense <b data-field="linear-dense">{format_count(split.prunable_linear)}</b> · three stage sets '
        f'<b data-field="linear-staged">{format_count(staged_linear)}</b> '
        f"({staged_linear / split.prunable_linear:.2f}× dense)</td></tr>"
        f"<tr><th>all parameters{estimate}</th>"
        f'<td>dense <b data-field="params-dense">{format_count(dense)}</b> · staged, shared rest '
        f'<b data-field="params-staged">{format_count(staged_total)}</b> ({staged_total / dense:.2f}×) · '
        f'naive three copies <b data-field="params-naive">{format_count(naive_total)}</b> ({naive_total / dense:.2f}×)</td></tr>'
        f"</tbody></table>{note}</div>"
    )
