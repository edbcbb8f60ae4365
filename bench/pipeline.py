"""Seconds per training step of the demo's job, synchronous vs overlapped (issue 15), same code and seed.

    python -m bench.pipeline [--steps 20] [--seed 0] [--configs sync,overlap,default] [OVERRIDE ...]
    python -m bench.pipeline --alternate 5 --steps 60 [--seed 0] [OVERRIDE ...]

Trains the demo's configuration (conf/config.yaml: FIPO, 16 prompts × 8 samples per step, 2 optimizer steps,
the tiny model after its cached warm-start) for `--steps` steps without evaluations, once per configuration,
one after the other in this process:

    sync      trainer.max_staleness=0, algorithm.adaptive_gen_rounds=false   (the loop before the pipeline)
    overlap   trainer.max_staleness=1, algorithm.adaptive_gen_rounds=false   (overlap alone)
    default   trainer.max_staleness=1, algorithm.adaptive_gen_rounds=true    (the demo's default)
    default_sync  trainer.max_staleness=0, algorithm.adaptive_gen_rounds=true  (the default without the overlap:
              `default` over this is what staleness 1 buys in the same code)
    no_filter algorithm=dapo, algorithm.filter_groups=false, max_staleness 1  (the job TRL's GRPOTrainer runs:
              no dynamic sampling; only with --configs)

With `--alternate K`, one run of `default` instead, in which the rollout pipeline collects the next batch
ahead only in every other block of K steps: the steps inside a synchronous block (whose own batch was collected
in the step, and which start no collection ahead) and inside an overlapped block (batch collected ahead, and the
next one started) are timed side by side, minutes apart at most. This machine's speed drifts by up to 50% within
an hour, which separate runs see as noise in their ratio; the alternating run measures the overlap's ratio under
the same conditions (its training mixes staleness 0 and 1, so its accuracy is not the demo's).

It prints, per configuration, the median seconds per step (over the steps after the first two, which hold
start-up effects, and without the last, which saves a checkpoint), trained samples/s (samples in the update /
s per step), generated samples/s (prompts drawn × group size / s per step), the mean share of rollout time
hidden behind training, and the ratios against `sync` measured in the same run. One JSON line last.
"""

from __future__ import annotations

from orchestration.cluster.env import use_local_defaults

use_local_defaults()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import device_info, git_commit, print_result  # noqa: E402
from orchestration.pipeline import RolloutPipeline  # noqa: E402

CONFIGS = {
    "sync": ["trainer.max_staleness=0", "algorithm.adaptive_gen_rounds=false"],
    "overlap": ["trainer.max_staleness=1", "algorithm.adaptive_gen_rounds=false"],
    "default": ["trainer.max_staleness=1", "algorithm.adaptive_gen_rounds=true"],
    "default_sync": ["trainer.max_staleness=0", "algorithm.adaptive_gen_rounds=true"],
    # TRL's GRPOTrainer job (no dynamic sampling: every generated group is trained on), overlapped
    "no_filter": ["algorithm=dapo", "algorithm.filter_groups=false", "trainer.max_staleness=1"],
}


def run_config(name: str, overrides: list[str], steps: int, seed: int, out: Path) -> dict:
    """Train `steps` steps of the demo with `overrides`; per-step statistics from its metrics.jsonl."""
    from orchestration.train import train
    from tools.demo import compose_config

    cfg = compose_config([
        *overrides, f"seed={seed}", f"trainer.total_steps={steps}", "trainer.eval_every=0",
        "trainer.eval_before_train=false", "trainer.save_every=0", "logger=disabled",
        f"trainer.output_dir={out / name}",
    ])  # fmt: skip
    train(cfg)
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:-1] or rows
    seconds = statistics.median(r["timing_s/step"] for r in steady)
    generated = statistics.median(r["dynamic_filter/groups_seen"] * cfg.algorithm.group_size for r in steady)
    return {
        "seconds_per_step": seconds,
        "trained_samples_per_s": rows[0]["rollout/samples"] / seconds,
        "generated_samples_per_s": generated / seconds,
        "rollout_hidden_frac": statistics.fmean(r.get("perf/rollout_hidden_frac", 0.0) for r in steady),
        "rollout_busy_s": statistics.median(r["timing_s/rollout_busy"] for r in steady),
        "update_s": statistics.median(r["timing_s/update"] for r in steady),
        "gen_rounds": statistics.fmean(r["dynamic_filter/gen_rounds"] for r in steady),
        "steps_measured": len(steady),
    }


class _AlternatingPipeline(RolloutPipeline):
    """The loop's RolloutPipeline (max_staleness 1) that collects ahead only in odd blocks of `block` steps."""

    block = 5

    def start(self, step: int) -> None:
        if (step // self.block) % 2 == 1:
            super().start(step)


def run_alternating(block: int, steps: int, seed: int, overrides: list[str], out: Path) -> dict:
    """`default` for `steps` steps, overlapped only in odd blocks of `block` steps (module docstring); the
    median seconds per step of the purely synchronous and purely overlapped steps, and their ratio."""
    import orchestration.train
    from tools.demo import compose_config

    _AlternatingPipeline.block = block
    cfg = compose_config([
        *CONFIGS["default"], *overrides, f"seed={seed}", f"trainer.total_steps={steps}", "trainer.eval_every=0",
        "trainer.eval_before_train=false", "trainer.save_every=0", "logger=disabled",
        f"trainer.output_dir={out / 'alternate'}",
    ])  # fmt: skip
    original = orchestration.train.RolloutPipeline
    orchestration.train.RolloutPipeline = _AlternatingPipeline
    try:
        orchestration.train.train(cfg)
    finally:
        orchestration.train.RolloutPipeline = original
    rows = [json.loads(line) for line in (out / "alternate" / "metrics.jsonl").read_text().splitlines()]
    ahead = [(s // block) % 2 == 1 for s in range(steps + 1)]  # was step s's batch collected ahead?
    per_mode: dict[str, list[float]] = {"sync": [], "overlap": []}
    per_block: dict[int, list[float]] = {}
    for s, row in enumerate(rows[2:-1], start=2):  # as run_config: no start-up steps, no final checkpoint
        if ahead[s] == ahead[s + 1]:  # pure: the step's own batch and the next are collected the same way
            per_mode["overlap" if ahead[s] else "sync"].append(row["timing_s/step"])
            per_block.setdefault(s // block, []).append(row["timing_s/step"])
    medians = {mode: statistics.median(t) for mode, t in per_mode.items()}
    return {
        "block": block,
        "sync_seconds_per_step": medians["sync"],
        "overlap_seconds_per_step": medians["overlap"],
        "speedup_overlap_vs_sync": medians["sync"] / medians["overlap"],
        "steps_measured": {mode: len(t) for mode, t in per_mode.items()},
        # median seconds per step of each block, in order: even blocks synchronous, odd ones overlapped
        "block_medians": [round(statistics.median(per_block[b]), 3) for b in sorted(per_block)],
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="sync,overlap,default", help=f"comma-separated among {list(CONFIGS)}")
    p.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="K",
        help="one run of `default`, overlapped in every other block of K steps (module docstring)",
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides added to every configuration (learner.world_size=1)")
    args = p.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or args.steps < 4:
        p.error(f"unknown configs {unknown}" if unknown else "--steps must be >= 4")
    if args.alternate:
        if args.steps < 4 * args.alternate:
            p.error("--steps must be at least 4 blocks of --alternate")
        with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
            r = run_alternating(args.alternate, args.steps, args.seed, args.overrides, Path(tmp))
        print(
            f"alternating blocks of {args.alternate}: sync {r['sync_seconds_per_step']:.2f} s/step, overlapped "
            f"{r['overlap_seconds_per_step']:.2f} s/step: {r['speedup_overlap_vs_sync']:.2f}x",
            flush=True,
        )
        print_result({"bench": "pipeline", "commit": git_commit(), **device_info(), "steps": args.steps,
                      "seed": args.seed, "overrides": args.overrides, "results": {"alternate": r}})  # fmt: skip
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        for name in names:
            results[name] = run_config(name, [*CONFIGS[name], *args.overrides], args.steps, args.seed, Path(tmp))
            r = results[name]
            print(
                f"{name:12s} {r['seconds_per_step']:.2f} s/step  {r['trained_samples_per_s']:.1f} trained samples/s  "
                f"{r['generated_samples_per_s']:.1f} generated samples/s  hidden {r['rollout_hidden_frac']:.0%}",
                flush=True,
            )
    base = results.get("sync")
    if base is not None:
        for r in results.values():
            r["speedup_vs_sync"] = base["seconds_per_step"] / r["seconds_per_step"]
    if "default" in results and "default_sync" in results:
        overlap = results["default_sync"]["seconds_per_step"] / results["default"]["seconds_per_step"]
        results["default"]["speedup_vs_default_sync"] = overlap
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print_result({"bench": "pipeline", "commit": git_commit(), **device_info(), "steps": args.steps,
                  "seed": args.seed, "overrides": args.overrides, "loadavg": load, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
