"""MosaicDiff Studio: `python app.py`, then open http://127.0.0.1:7860 (GRADIO_SERVER_NAME/PORT override)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mosaic_core.allocator import steady_allocator  # noqa: E402
from ui import settings  # noqa: E402
from ui.engine import StudioEngine  # noqa: E402
from ui.studio import build_studio, launch_kwargs  # noqa: E402
from ui.zerogpu import gpu_bound  # noqa: E402

if __name__ == "__main__":
    steady_allocator()  # freed activations stay in the heap: faster CPU calls, steadier timings
    engine = StudioEngine()
    # On a ZeroGPU Space the GPU-bound calls hold a GPU slice only while they run; elsewhere unchanged.
    engine.prune = gpu_bound("prune")(engine.prune)
    engine.compare = gpu_bound("compare")(engine.compare)
    engine.trajectory = gpu_bound("trace")(engine.trajectory)
    engine.warm_up()  # diffusers import and the default model's caches: a quick first page
    demo = build_studio(engine)
    demo.queue(max_size=settings.EVENT_QUEUE_MAX).launch(server_name=settings.SERVER_NAME, server_port=settings.SERVER_PORT, **launch_kwargs())
