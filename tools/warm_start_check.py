"""Follow one warm-start step by step: `python -m tools.warm_start_check [hydra overrides] [--every N]`.

Builds the tiny model and warm-starts it exactly as a run with the same overrides would
(`orchestration.inputs.run_warm_start`, `orchestration.data.warm_start.warm_start`: the result lands in the
same cache, so a run with these overrides then starts from it), and every `--every` SFT steps measures it on the
held-out problems (`orchestration.data.warm_start_eval`, which leaves the training untouched): next-token
accuracy on the worked chains by role (copy / operation / result / answer; "operation" is whether the model
follows the prompt's k-th operation on line k), the share of chains right in full (the run's warm-start check,
model.warm_start_min_chain_accuracy), and the accuracy and habits of responses sampled at the evaluation's
temperature and top-p. A warm-start found cached is measured once. Prints one line per measurement and writes
them all, with the loss of every step, to `--output` (JSON), e.g.

    python -m tools.warm_start_check experiment=study_fipo_vs_dapo model.init_seed=1 --output init1.json

It compares a good and a failed warm-start and measures a recipe across init seeds and thread counts
(docs/warm_start.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from orchestration.errors import clean_exit
from tools.demo import compose_config


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=200, help="SFT steps between two measurements")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems measured (the first N)")
    parser.add_argument("--samples", type=int, default=2, help="sampled responses per held-out problem")
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the measurements and losses")
    args, overrides = parser.parse_known_args(argv)
    from orchestration.cluster.env import use_local_defaults

    use_local_defaults()  # offline hub
    import torch  # heavy: torch and transformers, once the offline environment is set
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestration.config.components import init_seed, tiny_model_args
    from orchestration.data.warm_start import ARGS_FILE, sft_seconds
    from orchestration.data.warm_start_eval import sampled_report, teacher_forced_report
    from orchestration.inputs import run_warm_start, synthetic_rows, warm_start_stages
    from rollout.tiny import build_tiny_model_in

    cfg = compose_config(overrides)
    m, t = cfg.model, cfg.trainer
    if m.path or cfg.data.train_files or m.warm_start_steps == 0:
        raise SystemExit("error: tools.warm_start_check measures the tiny model's warm-start on the built-in task")
    base = build_tiny_model_in(m.tiny_dir, **tiny_model_args(cfg))
    stages = warm_start_stages(cfg)
    held_out = synthetic_rows(cfg)[1][: args.problems]
    tokenizer = AutoTokenizer.from_pretrained(base)
    recipes = [asdict(recipe) for _, recipe in stages]
    record: dict = {"overrides": overrides, "init_seed": init_seed(cfg), "recipes": recipes, "measurements": [],
                    "round_ends": []}  # fmt: skip  # the SFT step at the end of every stage and stepwise round
    losses: list[float] = []
    start = time.monotonic()

    def measure(step: int, loss: float, model) -> None:
        row = {"step": step, "loss": loss, "seconds": time.monotonic() - start}
        row |= teacher_forced_report(model, tokenizer, held_out)
        row |= sampled_report(
            model,
            tokenizer,
            held_out,
            samples=args.samples,
            temperature=t.eval_temperature,
            top_p=t.eval_top_p,
            max_tokens=cfg.rollout.max_response_tokens,
            seed=cfg.seed,
        )
        record["measurements"].append(row)
        print(_line(row), flush=True)

    def on_step(step: int, loss: float, model, round_end: bool) -> None:
        losses.append(loss)
        if step % args.every == 0 or round_end:
            measure(step, loss, model)
            model.train()
        if round_end:
            record["round_ends"].append(step)

    def on_cached(step: int, path: Path) -> None:  # a stage or round found cached: measured once, at its end
        final_loss = json.loads((path / ARGS_FILE).read_text())["final_loss"]
        measure(step, final_loss, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        record["round_ends"].append(step)

    path = run_warm_start(cfg, base, on_step, on_cached)  # steps count on across stages and rounds
    record |= {"model_dir": str(path), "losses": losses, "seconds": time.monotonic() - start}
    record["sft_seconds"] = sft_seconds(path)  # the training of every stage and round, cached ones included
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=1))
    return record


def _line(row: dict) -> str:
    habits = " ".join(
        f"{h} {100 * row[h + '_frac']:.0f}%/{100 * row.get(h + '_accuracy', 0):.0f}%"
        for h in ("direct", "at_once", "partial", "stepwise", "other")
        if row.get(h + "_frac")
    )
    return (
        f"step {row['step']}: loss {row['loss']:.4f} | next-token copy {row['copy_accuracy']:.3f} operation "
        f"{row['operation_accuracy']:.3f} result {row['result_accuracy']:.3f} answer {row['answer_accuracy']:.3f} | "
        f"operation right by line {' '.join(f'{x:.2f}' for x in row['operation_by_line'])} (after a unique / "
        f"repeated operation {row.get('operation_after_unique', 0):.2f} / {row.get('operation_after_repeated', 0):.2f})"
        f" | chains right in full "
        f"{100 * row['chain_exact']:.1f}% | sampled: right {100 * row['accuracy']:.1f}% (habit share/right: {habits}) "
        f"[{row['seconds']:.0f} s]"
    )


if __name__ == "__main__":
    with clean_exit():
        main(sys.argv[1:])
