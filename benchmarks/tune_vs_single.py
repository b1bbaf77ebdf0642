"""Does the tuner beat every single technique? Its choice against each alone, at equal MACs.

    python benchmarks/tune_vs_single.py                                # budgets 0.7,0.5,0.3
    python benchmarks/tune_vs_single.py --budgets 0.5 --test-images 200 --out assets/bench/tune-vs-single

For each budget b (a fraction of the dense MACs at N = --steps DDIM steps) the tuner
(`mosaic_core.conquer.tune`, its default methods: fewer steps, block reuse, paper and measured
pruning, pruning with block reuse, dropped reference steps alone and pruned for them; and, as `tuner, all methods` when its choice differs, with
the opt-in pruning with cache-dit too) searches on --val-images validation images (seed 0). Then its
chosen point and the best each single technique can do at the same budget are sampled on
--test-images **held-out** images (seed --test-seed, other noise than the tuner saw) and
scored by PSNR to the dense model's images of the same noise:

    fewer-steps   the dense model at ⌊b·N⌋ steps
    drop          the dense model at ⌊b·N⌋ of the N reference steps, the rest dropped evenly (method §4.6)
    prune         the default prune (measured allocation, refit) at N steps, sparsity raised until it fits b

and, when the tuner chose a pruned point, `tuner+refit`: that point pruned as `prune` would
write it (with the refit, which the tuner leaves out of its search to keep it fast).
    cache         the dense model at N steps with the block-reuse setting closest to b from below
    cache-dit     the dense model at N steps with cache-dit's DBCache, its threshold matched to b
                  on the validation images in 7 runs (its held-out MACs are counted as run, and reported)

Printed: per budget, every row's steps, MACs (of dense), held-out PSNR, and the tuner's
margin over the best single technique. Not a test: it prints figures and asserts nothing;
timings are not reported (take them from `bench`, on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from mosaic_core.allocator import steady_allocator

    steady_allocator()  # the heap the CLI and the studio run with (mosaic_core/allocator.py)
    from dataclasses import replace

    from mosaic_core.conquer.cache_dit_row import CacheDiT, match_threshold
    from mosaic_core.conquer.caching import BlockReuse, match_cache_to_macs
    from mosaic_core.conquer.conditions import conditions_for, default_values
    from mosaic_core.conquer.metrics import mean_psnr
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_loaded
    from mosaic_core.conquer.tune import DEFAULT_METHODS, METHODS, TunePoint, candidate_denoiser, staged_step_macs, tune, _sparsity_within
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.divide.stages import DEFAULT_M
    from mosaic_core.models.adapters import adapter_for_model
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.samplers import model_default_sampler
    from mosaic_core.models.registry import DEFAULT_MODEL, resolve_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--budgets", default="0.7,0.5,0.3")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--val-images", type=int, default=8)
    parser.add_argument("--test-images", type=int, default=64)
    parser.add_argument("--test-seed", type=int, default=1000)
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]

    spec = resolve_model(args.model)
    loaded = load_model(spec, device="cpu")
    scheduler = model_default_sampler(spec)
    cfg = spec.default_cfg
    n0 = args.steps
    config = PruneConfig(CalibrationConfig(size=args.calib_size))
    common = dict(M=DEFAULT_M, lam=0.01, scheduler=scheduler, cx=1.0)
    analyses: dict = {}
    memo: dict = {}
    labels = conditions_for(loaded, default_values(spec, args.test_images))

    def held_out(steps: int, transformer=None, drop: int = 0):
        config = SampleConfig(steps + drop, cfg, scheduler, args.test_seed, drop_steps=drop)
        return run_to_end(sample_loaded(loaded, labels, config, transformer=transformer)).images

    started = time.perf_counter()
    reference = held_out(n0)
    dense_macs = float(build_plan(spec, n0, DEFAULT_M, 0.01, scheduler=scheduler).macs_dense)
    dense_step = dense_macs / n0
    num_blocks = len(adapter_for_model(loaded.transformer).block_paths(loaded.transformer))
    rows = []
    for budget in budgets:
        # every method first, then the default ones on the same memo (their points are recalled, not resampled)
        t0 = time.perf_counter()
        everything = tune(loaded, budget, config, reference_steps=n0, images=args.val_images, analyses=analyses, memo=memo,
                          methods=METHODS, guidance_scale=cfg, **common)
        result = tune(loaded, budget, config, reference_steps=n0, images=args.val_images, analyses=analyses, memo=memo,
                      methods=DEFAULT_METHODS, guidance_scale=cfg, **common)
        tuned_seconds = time.perf_counter() - t0
        chosen = result.points[result.chosen]
        entries = [("tuner", chosen.allocation, chosen, candidate_denoiser(loaded, chosen, config, analyses=analyses, **common))]
        if chosen.allocation not in ("dense", "cache"):
            entries.append(("tuner+refit", chosen.allocation, chosen,
                            candidate_denoiser(loaded, chosen, config, analyses=analyses, refit=True, **common)))
        wider = everything.points[everything.chosen]
        if wider != chosen:  # the opt-in measured+cache-dit won on the validation images
            entries.append(("tuner, all methods", wider.allocation, wider,
                            candidate_denoiser(loaded, wider, config, analyses=analyses, **common)))
        fewer = max(1, int(budget * n0 + 1e-9))
        entries.append(("fewer-steps", "dense", TunePoint(fewer, "dense", 0.0, dense_step * fewer, fewer / n0, 0, 0, 0), None))
        if scheduler == "ddim" and fewer < n0:
            entries.append(("drop", "drop", TunePoint(fewer, "drop", 0.0, dense_step * fewer, fewer / n0, 0, 0, 0, drop_steps=n0 - fewer), None))
        sparsity = _sparsity_within(spec, n0, DEFAULT_M, 0.01, scheduler, 1.0, 1.0 - budget, budget * dense_macs)
        if sparsity is not None:
            plan = build_plan(spec, n0, DEFAULT_M, 0.01, sparsity=sparsity, scheduler=scheduler)
            pruned = run_to_end(prune_steps(loaded, plan, replace(config, allocation="measured", refit=True), analyses=analyses))
            macs = sum(staged_step_macs(plan, pruned))
            entries.append(("prune", "measured", TunePoint(n0, "measured", plan.overall_sparsity, macs, macs / dense_macs, 0, 0, 0), pruned.staged))
        fit = match_cache_to_macs(num_blocks, [dense_step] * n0, budget * dense_macs, within=True)
        if fit is not None:
            entries.append(("cache", "cache", TunePoint(n0, "cache", 0.0, fit[1], fit[1] / dense_macs, 0, 0, 0,
                                                       cache=(fit[0].interval, fit[0].keep_first, fit[0].keep_last)),
                            BlockReuse(loaded.transformer, fit[0])))
        # cache-dit alone: its DBCache threshold matched to the budget on the validation images
        validation = conditions_for(loaded, default_values(spec, args.val_images))
        setting, share = match_threshold(
            lambda row: run_to_end(sample_loaded(loaded, validation, SampleConfig(n0, cfg, scheduler, 0), transformer=row)),
            loaded.transformer, n0, budget, probes=7,
        )
        if share <= budget + 1e-9:
            entries.append(("cache-dit", "cache-dit", TunePoint(n0, "cache-dit", 0.0, share * dense_macs, share, 0, 0, 0,
                                                               cache_dit=(setting.threshold, setting.fn, setting.bn, setting.warmup)),
                            CacheDiT(loaded.transformer, setting, n0)))
        measured = []
        for name, method, point, transformer in entries:
            psnr = mean_psnr(held_out(point.steps, transformer, point.drop_steps), reference)
            macs = point.macs_fraction
            if isinstance(transformer, CacheDiT):  # which steps skip depends on the images: the held-out run's cost
                macs = transformer.computed_fraction() * point.steps / n0
            measured.append(dict(budget=budget, row=name, method=method, steps=point.steps, drop_steps=point.drop_steps, macs=round(macs, 4),
                                 cache=point.cache, cache_dit=point.cache_dit, sparsity=round(point.sparsity, 4), psnr=round(psnr, 3),
                                 validation_psnr=round(point.psnr, 3) if name.startswith("tuner") else None))
        best_single = max(m["psnr"] for m in measured if not m["row"].startswith("tuner"))
        for m in measured:
            if m["row"].startswith("tuner"):
                m["margin_db"] = round(m["psnr"] - best_single, 3)
        measured[0]["tune_seconds"] = round(tuned_seconds, 1)
        rows.extend(measured)
        for m in measured:
            reuse = "-" if m["cache"] is None else "{}:{}/{}".format(*m["cache"])
            reuse = reuse if m["cache_dit"] is None else f"δ{m['cache_dit'][0]:.3g}"
            extra = f"  margin {m['margin_db']:+.2f} dB over the best single (tuned in {tuned_seconds:.0f} s)" if "margin_db" in m else ""
            steps = f"{m['steps']}/{m['steps'] + m['drop_steps']}" if m["drop_steps"] else str(m["steps"])
            print(f"b={budget:.2f} {m['row']:<12} {m['method']:<15} steps {steps:>5} sparsity {m['sparsity']:.3f} reuse {reuse:>6} "
                  f"MACs {m['macs']:.3f}  PSNR {m['psnr']:.2f} dB{extra}", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(model=spec.name, sampler=scheduler, steps=n0, cfg=cfg, val_images=args.val_images, val_seed=0,
                    test_images=args.test_images, test_seed=args.test_seed, calib_size=args.calib_size)
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        lines = [
            f"# Tuner against each single technique: {spec.name}, {scheduler}-{n0}, CFG {cfg:g}",
            "",
            f"Tuned on {args.val_images} validation images (seed 0); every row scored on {args.test_images} held-out images "
            f"(seed {args.test_seed}) by PSNR to the dense model's images of the same noise.",
            f"Made by `python benchmarks/tune_vs_single.py --budgets {args.budgets} --test-images {args.test_images} --out {args.out}`.",
            "",
            "| budget | row | method | steps | sparsity | reuse | MACs (of dense) | PSNR (dB), held out | margin over best single |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m in rows:
            reuse = "-" if m["cache"] is None else "every {}, first {}/last {}".format(*m["cache"])
            if m["cache_dit"] is not None:
                reuse = "cache-dit δ {:.3g}, F{}B{}, first {} full".format(*m["cache_dit"])
            margin = f"{m['margin_db']:+.2f} dB" if "margin_db" in m else ""
            steps = f"{m['steps']} of {m['steps'] + m['drop_steps']}" if m["drop_steps"] else str(m["steps"])
            lines.append(f"| {m['budget']:.2f} | {m['row']} | {m['method']} | {steps} | {m['sparsity']:.3f} | {reuse} | "
                         f"{m['macs']:.3f} | {m['psnr']:.2f} | {margin} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
