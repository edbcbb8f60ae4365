"""What a run starts from: the policy's model directory (the configured one, or the tiny model built and
warm-started) and the prompt rows (data files or the built-in task), checked and filtered, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestration.config.components import init_seed, tiny_model_args
from orchestration.config.errors import ConfigError
from orchestration.config.schema import TrainConf
from orchestration.data.prompts import (
    DataError,
    PromptRow,
    drop_long_prompts,
    find_duplicates,
    load_datasets,
    load_rows,
)
from orchestration.data.tasks import make_rows, write_jsonl
from orchestration.data.warm_start import WarmStartConfig, WarmStartError, warm_start, with_shortcuts


def prepare_model(cfg: TrainConf) -> str:
    """The policy's HF directory: the configured path, or the tiny model built (once) from the config; then,
    when model.warm_start_steps > 0, the supervised warm-start of it (trained once, cached by a hash)."""
    m = cfg.model
    if m.path:
        path = m.path
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(
                f"model.path: {path!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1): "
                "download the model first and point model.path at it"
            )
    else:
        from rollout.tiny import build_tiny_model_in  # heavy: torch and transformers

        path = build_tiny_model_in(m.tiny_dir, **tiny_model_args(cfg))
    if m.warm_start_steps > 0:
        path = run_warm_start(cfg, path)
        if m.warm_start_min_chain_accuracy > 0 and not m.path and not cfg.data.train_files:
            held_out = synthetic_rows(cfg)[1]
            if held_out:
                report = Path(cfg.trainer.output_dir) / WARM_START_CHECK_FILE
                check_warm_start(path, held_out, m.warm_start_min_chain_accuracy, report)
            else:
                print("warm-start check: skipped, no held-out problems (data.synthetic_val_prompts=0)", flush=True)
    return str(path)


WARM_START_CHECK_FILE = "warm_start_check.json"  # in the run's output directory


def check_warm_start(model_dir: str | Path, held_out: list[dict], bar: float, report_path: Path) -> dict[str, Any]:
    """Measure a warm-started tiny model on the built-in task's held-out rows (teacher-forced, greedy:
    warm_start_eval.teacher_forced_report), write the report with the bar and the verdict to `report_path`,
    print one line, and raise WarmStartError when fewer than `bar` of the worked chains come out right in full.
    Returns the report."""
    import torch  # heavy: torch and transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestration.data.warm_start_eval import teacher_forced_report

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    report = teacher_forced_report(model, tokenizer, held_out)
    report |= {"model_dir": str(model_dir), "problems": len(held_out), "bar": bar}
    report["passed"] = report["chain_exact"] >= bar
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1))
    chains, ops, sums = report["chain_exact"], report["operation_lines"], report["result_accuracy"]
    print(
        f"warm-start check: on {len(held_out)} held-out problems the warm-started model writes the worked chain "
        f"right in full for {100 * chains:.1f}% (bar {100 * bar:.0f}%); its lines follow the prompt's operation "
        f"{100 * ops:.1f}% of the time, its arithmetic is right {100 * sums:.1f}% of the time (next-token, "
        "teacher-forced)",
        flush=True,
    )
    if chains < bar:
        habit = (
            "it has not learned to find the next operation in the prompt (the failed warm-start's pattern)"
            if ops < 0.5
            else f"its lines follow the prompt's operations ({100 * ops:.0f}%), but its arithmetic is right only "
            f"{100 * sums:.1f}% of the time, too little for whole chains (train it longer: model.warm_start_steps)"
        )
        raise WarmStartError(
            f"warm-start failed: {model_dir} writes a fully right worked chain for {100 * chains:.1f}% of the "
            f"held-out problems, below model.warm_start_min_chain_accuracy={bar}: {habit}. RL from such a model "
            "learns little or nothing, so the run stops before RL. Change the warm-start recipe "
            "(model.warm_start_*; docs/warm_start.md), or set model.warm_start_min_chain_accuracy=0 to train on "
            "it anyway."
        )
    return report


StepHook = Callable[[int, float, Any, bool], None]  # (SFT steps done in all, loss, model, last step of its round)


def run_warm_start(cfg: TrainConf, base: str | Path, on_step: StepHook | None = None,
                   on_cached: Callable[[int, Path], None] | None = None) -> Path:  # fmt: skip
    """The warm-started model's directory: the stages of `warm_start_stages` from `base`, each from the last
    one's (cached) result; the first, stepwise stage in up to model.warm_start_stepwise_rounds rounds, until a
    round's development chains reach model.warm_start_stepwise_target (`stepwise_chains_right`).
    on_step(steps_done, loss, model, round_end) after every SFT step trained here (steps count on across
    stages and rounds; it must leave the model and torch's RNG as they were), on_cached(steps_done, directory)
    for a stage or round found cached (tools.warm_start_check measures with them)."""
    m, path, done = cfg.model, Path(base), 0
    stages = warm_start_stages(cfg)
    for index, (examples, recipe) in enumerate(stages):
        rounds = m.warm_start_stepwise_rounds if index == 0 and len(stages) > 1 else 1
        for round_ in range(rounds):
            trained = False

            def hook(step: int, loss: float, model, done=done, last=recipe.steps) -> None:
                nonlocal trained
                trained = True
                if on_step is not None:
                    on_step(done + step, loss, model, step == last)

            path = warm_start(path, examples, recipe, m.warm_start_dir, hook)
            done += recipe.steps
            if not trained and on_cached is not None:
                on_cached(done, path)
            if round_ + 1 < rounds:
                chains = stepwise_chains_right(cfg, path)
                target = m.warm_start_stepwise_target
                print(f"warm-start: stepwise round {round_ + 1} of at most {rounds}: development chains right in "
                      f"full {100 * chains:.1f}% (target {100 * target:.0f}%)", flush=True)  # fmt: skip
                if chains >= target:
                    break
    return path


def stepwise_chains_right(cfg: TrainConf, model_dir: Path) -> float:
    """The share of 200 development problems (the built-in task drawn with data seed + 1: other problems than
    the training and held-out ones, up to chance repeats) whose stepwise chain the model writes right in full,
    teacher-forced and greedy (warm_start_eval.teacher_forced_report): what ends the stepwise rounds, so that
    the held-out measurement stays untouched by it."""
    import torch  # heavy: torch and transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestration.data.warm_start_eval import teacher_forced_report

    d = cfg.data
    seed = (cfg.seed if d.synthetic_seed is None else d.synthetic_seed) + 1
    dev = make_rows(0, 200, seed=seed, min_steps=d.synthetic_min_steps, max_steps=d.synthetic_max_steps,
                    max_value=d.synthetic_max_value, task="chain")[1]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return teacher_forced_report(model, AutoTokenizer.from_pretrained(model_dir), dev)["chain_exact"]


def warm_start_stages(cfg: TrainConf) -> list[tuple[list[tuple[list[dict], str]], WarmStartConfig]]:
    """The warm-start's stages, in order, each (prompt messages, target) pairs and a recipe (model.warm_start_*):
    with model.warm_start_stepwise_steps > 0 first that many steps on the training problems' stepwise chains
    (the built-in task only; no shortcuts; peak lr model.warm_start_stepwise_lr), then model.warm_start_steps on
    the training rows' solutions, shortcuts included. Each stage has its own lr warm-up and decay."""
    m, seed = cfg.model, init_seed(cfg)
    examples = with_shortcuts(warm_start_examples(cfg), m.warm_start_shortcut_frac, seed)
    recipe = WarmStartConfig(
        steps=m.warm_start_steps,
        lr=m.warm_start_lr,
        batch_rows=m.warm_start_batch_prompts,
        warmup_steps=m.warm_start_warmup_steps,
        seed=seed,
        num_threads=m.warm_start_threads,
    )
    if m.warm_start_stepwise_steps == 0:
        return [(examples, recipe)]
    if cfg.data.train_files:
        raise ConfigError(
            "model.warm_start_stepwise_steps: the stepwise stage needs the built-in task (data.train_files is set); "
            "set it to 0"
        )
    stepwise = [(r["prompt"], r["extra_info"]["solution"]) for r in synthetic_rows(cfg, task="chain")[0]]
    lr = m.warm_start_lr if m.warm_start_stepwise_lr is None else m.warm_start_stepwise_lr
    return [(stepwise, dataclasses.replace(recipe, steps=m.warm_start_stepwise_steps, lr=lr)), (examples, recipe)]


def synthetic_rows(cfg: TrainConf, task: str | None = None) -> tuple[list[dict], list[dict]]:
    """The built-in task's (train, val) rows in the verl schema, as data.synthetic_* and the seed define them;
    `task` overrides data.synthetic_task (the problems are the same, their solutions written as that task's)."""
    d = cfg.data
    return make_rows(
        d.synthetic_train_prompts,
        d.synthetic_val_prompts,
        seed=cfg.seed if d.synthetic_seed is None else d.synthetic_seed,
        min_steps=d.synthetic_min_steps,
        max_steps=d.synthetic_max_steps,
        max_value=d.synthetic_max_value,
        task=task or d.synthetic_task,
        habit_mix=d.synthetic_habit_mix,
    )


def warm_start_examples(cfg: TrainConf) -> list[tuple[list[dict], str]]:
    """(prompt messages, worked solution) of every training row; a row without `extra_info.solution` is an
    error (the warm-start needs one for every row)."""
    if cfg.data.train_files:
        rows = [(list(r.messages), r.extra.get("solution"), r.source) for r in load_datasets(cfg.data.train_files)]
    else:
        rows = [(r["prompt"], r["extra_info"]["solution"], "synthetic") for r in synthetic_rows(cfg)[0]]
    missing = [source for _, solution, source in rows if not isinstance(solution, str)]
    if missing:
        raise ValueError(
            f"model.warm_start_steps > 0 needs extra_info.solution in every training row; {len(missing)} rows lack "
            f"it (first: {missing[0]}). Set model.warm_start_steps=0 for this dataset."
        )
    return [(messages, solution) for messages, solution, _ in rows]


def _load_files(key: str, paths: list[str]) -> list[PromptRow]:
    """Rows of the files under config key `key`: a missing file or a directory is a ConfigError naming the key
    and the path, a bad file (an empty one included) a DataError naming the key, the file and the row."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ConfigError(f"{key}: file(s) not found: {missing} (relative paths are from {Path.cwd()})")
    folders = [p for p in paths if Path(p).is_dir()]
    if folders:
        raise ConfigError(f"{key}: {folders} is a directory, not a file: list the .jsonl / .parquet files in it")
    rows = []
    for path in paths:
        try:
            rows += load_rows(path)
        except DataError as err:
            raise DataError(f"{key}: {err}") from err
    return rows


def report_duplicates(name: str, rows: list[PromptRow]) -> list[tuple[str, str]]:
    """Print how many of `rows` repeat an earlier row's prompt and ground truth (they stay in the dataset, so a
    repeated problem is drawn as often as its copies), naming the first few; returns `find_duplicates(rows)`."""
    duplicates = find_duplicates(rows)
    if duplicates:
        shown = ", ".join(f"{source} (= {first})" for source, first in duplicates[:3])
        more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
        print(f"data: {len(duplicates)} {name} row(s) repeat an earlier row's prompt and ground truth (kept, so "
              f"drawn as often as their copies): {shown}{more}", flush=True)  # fmt: skip
    return duplicates


def load_prompt_rows(cfg: TrainConf) -> tuple[list[PromptRow], list[PromptRow]]:
    """Train and validation rows: the files parsed and checked (DataError naming file and row), or the synthetic
    task written under output_dir. Needs no model: bad data fails before the model is built or warm-started.
    Duplicate rows are printed (and kept); with data files but no data.val_files, a line says that there is no
    evaluation."""
    d, t = cfg.data, cfg.trainer
    if d.train_files:
        train, val = _load_files("data.train_files", d.train_files), _load_files("data.val_files", d.val_files)
        report_duplicates("train", train)
        report_duplicates("validation", val)
        if not val and (t.eval_every or t.eval_before_train):
            print("data: no data.val_files, so no evaluation (trainer.eval_every / trainer.eval_before_train have "
                  "nothing to evaluate)", flush=True)  # fmt: skip
        return train, val
    train_rows, val_rows = synthetic_rows(cfg)
    data_dir = Path(cfg.trainer.output_dir) / "data"
    train = load_rows(write_jsonl(train_rows, data_dir / "synthetic_train.jsonl"))
    return train, load_rows(write_jsonl(val_rows, data_dir / "synthetic_val.jsonl"))


def drop_long_rows(
    cfg: TrainConf, tokenizer: Any, train: list[PromptRow], val: list[PromptRow]
) -> tuple[list[PromptRow], list[PromptRow], dict[str, Any]]:
    """The rows whose rendered prompt fits data.max_prompt_tokens, and a report of the dropped ones: their counts
    (logged with every step's metrics as data/dropped_long_*_prompts) and sources (run_info.json), printed."""
    limit = cfg.data.max_prompt_tokens
    train, dropped_train = drop_long_prompts(train, tokenizer, limit)
    val, dropped_val = drop_long_prompts(val, tokenizer, limit)
    for name, dropped in (("train", dropped_train), ("validation", dropped_val)):
        if dropped:
            shown = ", ".join(f"{source} ({n} tokens)" for source, n in dropped[:5])
            more = f" and {len(dropped) - 5} more (run_info.json lists them)" if len(dropped) > 5 else ""
            print(f"data: dropped {len(dropped)} {name} prompt(s) longer than data.max_prompt_tokens={limit}: "
                  f"{shown}{more}", flush=True)  # fmt: skip
    report = {
        "train_prompts": len(train),
        "val_prompts": len(val),
        "dropped_long_train_prompts": [f"{source} ({n} tokens)" for source, n in dropped_train],
        "dropped_long_val_prompts": [f"{source} ({n} tokens)" for source, n in dropped_val],
    }
    return train, val, report
