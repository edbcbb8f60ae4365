"""What a run starts from: the policy's model directory (the configured one, or the tiny model built and
warm-started) and the prompt rows (data files or the built-in task), checked and filtered, before Ray starts.
"""

from __future__ import annotations

import os
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


def prepare_model(cfg: TrainConf) -> str:
    """The policy's HF directory: the configured path, or the tiny model built (once) from the config; then,
    when model.warm_start_steps > 0, the supervised warm-start of it (trained once, cached by a hash)."""
    m = cfg.model
    seed = init_seed(cfg)
    if m.path:
        path = m.path
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(
                f"model.path: {path!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1): "
                "download the model first and point model.path at it"
            )
    else:
        from rollout.tiny import build_tiny_model  # heavy: torch and transformers

        path = build_tiny_model(m.tiny_dir, **tiny_model_args(cfg))
    if m.warm_start_steps > 0:
        from orchestration.data.warm_start import WarmStartConfig, warm_start, with_shortcuts  # heavy: torch

        examples = with_shortcuts(warm_start_examples(cfg), m.warm_start_shortcut_frac, seed)
        recipe = WarmStartConfig(
            steps=m.warm_start_steps,
            lr=m.warm_start_lr,
            batch_rows=m.warm_start_batch_prompts,
            warmup_steps=m.warm_start_warmup_steps,
            seed=seed,
            num_threads=m.warm_start_threads,
        )
        path = warm_start(path, examples, recipe, m.warm_start_dir)
    return str(path)


def synthetic_rows(cfg: TrainConf) -> tuple[list[dict], list[dict]]:
    """The built-in task's (train, val) rows in the verl schema, as data.synthetic_* and the seed define them."""
    d = cfg.data
    return make_rows(
        d.synthetic_train_prompts,
        d.synthetic_val_prompts,
        seed=cfg.seed if d.synthetic_seed is None else d.synthetic_seed,
        min_steps=d.synthetic_min_steps,
        max_steps=d.synthetic_max_steps,
        max_value=d.synthetic_max_value,
        task=d.synthetic_task,
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
