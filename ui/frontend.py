"""Browser-side pieces of the studio: the threshold- and edge-drag listener (JS) and the CSS.

Gradio 6 takes both in `launch(js=..., css=...)`, not in `gr.Blocks()`.

How a drag reaches Python (gr.Plot has only a `change` event, so it goes through JS):

1. ui/charts.py marks the threshold line `editable=True` and `name="threshold"`, and puts
   `max_score` and the M range in `layout.meta`.
2. This script finds the plotly graph div inside `#mosaic-schedule-plot` and listens to
   `plotly_relayout`, which plotly fires when the mouse releases a dragged shape, with keys
   such as `shapes[3].y0`. It computes M = y / max score, clamps it to the M slider's range
   and writes "M|nonce" into the hidden textbox `#mosaic-drag-m`, then dispatches a DOM
   `input` event. Svelte's value binding takes the new value, and the textbox fires its
   gradio `change` event (not gradio's `input`, which Gradio 6 raises from key presses
   only). The nonce makes a second drop at the same M a new value too.
3. Python (`DivideHandlers.drag`, on the textbox's `.change`) parses M, sets the M slider
   and re-renders everything.

Stage edges (the two vertical lines `edge-low` / `edge-high`, shapes 1 and 2) take the same
road into their own hidden textbox `#mosaic-drag-edges`: the listener sends
"edge-low:x|nonce" with the dropped line's x in data units (model timesteps), and Python
(`DivideHandlers.drag_edges`) turns it into hand-set edges (`ui.divide_tab.dragged_edges`).

Re-renders: gradio updates the plot with `Plotly.react` on the same div, which keeps the
listener; if the div is replaced (re-mount) or plotly drops its listeners, the binder below
sees that our listener is missing and binds again (a MutationObserver plus a slow poll).
"""

from __future__ import annotations

PLOT_ELEM_ID = "mosaic-schedule-plot"
DRAG_ELEM_ID = "mosaic-drag-m"
EDGE_DRAG_ELEM_ID = "mosaic-drag-edges"

STUDIO_JS = """
() => {
  const PLOT_ID = "%(plot)s";
  const DRAG_ID = "%(drag)s";
  const EDGE_DRAG_ID = "%(edge_drag)s";
  const THRESHOLD = "threshold";
  const EDGES = ["edge-low", "edge-high"];

  function send(id, text) {
    const box = document.querySelector("#" + id + " textarea, #" + id + " input");
    if (!box) return;
    box.value = text + "|" + Date.now();
    box.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function movedShapes(event) {
    const moved = new Set();
    for (const key of Object.keys(event)) {
      const match = /^shapes\\[(\\d+)\\]/.exec(key);
      if (match) moved.add(Number(match[1]));
    }
    return moved;
  }

  function droppedX(gd, event, index) {
    const prefix = "shapes[" + index + "].";
    const xs = ["x0", "x1"].filter((key) => (prefix + key) in event).map((key) => Number(event[prefix + key]));
    if (xs.length === 2) return (xs[0] + xs[1]) / 2;
    const shape = (gd.layout.shapes || [])[index];  // one end moved: plotly has already updated the layout
    if (shape && shape.x0 !== undefined) return (Number(shape.x0) + Number(shape.x1)) / 2;
    return null;
  }

  function onEdgeRelayout(gd, event) {
    const shapes = (gd.layout && gd.layout.shapes) || [];
    for (const index of movedShapes(event)) {
      const name = shapes[index] && shapes[index].name;
      if (!EDGES.includes(name)) continue;
      const x = droppedX(gd, event, index);
      if (x === null || !Number.isFinite(x)) return;
      send(EDGE_DRAG_ID, name + ":" + x.toFixed(3));
      return;
    }
  }

  function thresholdIndex(gd) {
    const shapes = (gd.layout && gd.layout.shapes) || [];
    return shapes.findIndex((shape) => shape && shape.name === THRESHOLD);
  }

  function droppedY(gd, event, index) {
    const prefix = "shapes[" + index + "].";
    const ys = ["y0", "y1"].filter((key) => (prefix + key) in event).map((key) => Number(event[prefix + key]));
    if (ys.length) return ys.reduce((a, b) => a + b, 0) / ys.length;
    const whole = event["shapes[" + index + "]"] || (Array.isArray(event.shapes) ? event.shapes[index] : null);
    if (whole && whole.y0 !== undefined) return (Number(whole.y0) + Number(whole.y1)) / 2;
    return null;
  }

  function onRelayout(gd, event) {
    if (!event) return;
    onEdgeRelayout(gd, event);
    const index = thresholdIndex(gd);
    if (index < 0) return;
    const y = droppedY(gd, event, index);
    const meta = gd.layout.meta || {};
    const maxScore = Number(meta.max_score);
    if (y === null || !Number.isFinite(y) || !(maxScore > 0)) return;
    const low = Number(meta.M_min), high = Number(meta.M_max), step = Number(meta.M_step);
    if (!(step > 0) || !(high > low)) return;
    const M = Number((Math.round(Math.min(Math.max(y / maxScore, low), high) / step) * step).toFixed(6));
    send(DRAG_ID, String(M));
  }

  function bind() {
    const gd = document.querySelector("#" + PLOT_ID + " .js-plotly-plot");
    if (!gd || typeof gd.on !== "function") return;
    const listeners = gd._ev && typeof gd._ev.listeners === "function" ? gd._ev.listeners("plotly_relayout") : [];
    if (gd.__mosaicListener && listeners.includes(gd.__mosaicListener)) return;
    gd.__mosaicListener = (event) => onRelayout(gd, event);
    gd.on("plotly_relayout", gd.__mosaicListener);
    gd.setAttribute("data-mosaic-drag", "bound");
  }

  new MutationObserver(bind).observe(document.body, { childList: true, subtree: true });
  setInterval(bind, 1000);
}
""" % {"plot": PLOT_ELEM_ID, "drag": DRAG_ELEM_ID, "edge_drag": EDGE_DRAG_ELEM_ID}

STUDIO_CSS = """
.mosaic-panel table.mosaic-table { border-collapse: collapse !important; width: 100%; font-size: 0.9rem; margin: 0.2rem 0 0.7rem; border: none !important; }
.mosaic-panel table.mosaic-table caption { caption-side: top; text-align: left; color: var(--body-text-color-subdued); padding: 0 0 0.3rem; font-size: 0.85rem; }
.mosaic-panel table.mosaic-table th, .mosaic-panel table.mosaic-table td {
  padding: 0.3rem 0.6rem !important; border: none !important; border-bottom: 1px solid var(--border-color-primary) !important;
  text-align: right; white-space: nowrap; background: transparent !important;
}
.mosaic-panel table.mosaic-table tr { border: none !important; background: transparent !important; }
.mosaic-panel table.mosaic-table th:first-child, .mosaic-panel table.mosaic-table td:first-child { text-align: left; }
.mosaic-panel table.mosaic-table thead th { font-weight: 600; color: var(--body-text-color-subdued); border-bottom: 2px solid var(--border-color-primary) !important; }
.mosaic-panel table.mosaic-summary th { font-weight: 500; text-align: left; width: 36%; color: var(--body-text-color-subdued); white-space: normal; }
.mosaic-panel table.mosaic-summary td { text-align: left; white-space: normal; }
.mosaic-chip { display: inline-block; width: 0.7rem; height: 0.7rem; border-radius: 2px; margin-right: 0.45rem; vertical-align: -1px; }
.mosaic-muted { color: var(--body-text-color-subdued); font-size: 0.85em; }
.mosaic-note { color: var(--body-text-color-subdued); font-size: 0.85rem; margin: 0.2rem 0; }
.mosaic-placeholder { opacity: 0.7; }
#mosaic-status p { margin: 0; }
"""
