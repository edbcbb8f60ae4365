"""Prompt datasets in the schema verl uses for DAPO-Math-17k, and a resumable sampler.

A row (jsonl line or parquet row):
    {"data_source": str, "prompt": [{"role": "user", "content": str}, ...], "ability": str,
     "reward_model": {"ground_truth": str | number, "style": str}, "extra_info": {...}}
Only `prompt` and `reward_model.ground_truth` are required; everything else is carried along. Public RL
datasets in this schema (DAPO-Math-17k, BytedTsinghua-SIA/AIME-2024, ...) load unchanged.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.types import chat_prompt_ids


class DataError(ValueError):
    """A dataset problem; the message names the file and row."""


@dataclass(frozen=True)
class PromptRow:
    """One training/evaluation problem.

    messages: the chat messages of the prompt (rendered with the model's chat template by the rollout).
    ground_truth: the reference answer, as a string.
    source: "<file>:<row>" where the row came from (1-based line for jsonl, 0-based row for parquet).
    data_source, extra: the row's other fields, passed to reward functions.
    """

    messages: tuple[dict[str, str], ...]
    ground_truth: str
    source: str
    data_source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _parse_row(raw: Any, where: str) -> PromptRow:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a row must be an object, got {type(raw).__name__}")
    prompt = raw.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a non-empty list of chat messages, got {prompt!r:.80}")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: prompt[{i}] must be {{'role': str, 'content': str}}, got {message!r:.80}")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: prompt[{i}].role must be system/user/assistant, got {role!r}")
        messages.append({"role": role, "content": message["content"]})
    reward_model = raw.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if isinstance(truth, (int, float)) and not isinstance(truth, bool):
        truth = str(truth)
    if not isinstance(truth, str) or not truth.strip():
        raise DataError(f"{where}: 'reward_model.ground_truth' must be a non-empty string, got {truth!r:.80}")
    extra = raw.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{where}: 'extra_info' must be an object, got {type(extra).__name__}")
    return PromptRow(tuple(messages), truth, where, str(raw.get("data_source", "")), dict(extra))


def load_rows(path: str | Path) -> list[PromptRow]:
    """Load a .jsonl or .parquet file of verl-schema rows; a malformed row raises DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                rows.append(_parse_row(raw, f"{path}:{line_no}"))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = {"prompt", "reward_model"} - set(table.column_names)
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; columns are {table.column_names}")
        rows = [_parse_row(raw, f"{path}:row {i}") for i, raw in enumerate(table.to_pylist())]
    else:
        raise DataError(f"{path}: unsupported dataset format {path.suffix!r} (use .jsonl or .parquet)")
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def load_datasets(paths: Sequence[str | Path]) -> list[PromptRow]:
    """Concatenate several files (in order)."""
    if not paths:
        raise DataError("no dataset files given")
    return [row for path in paths for row in load_rows(path)]


def drop_long_prompts(
    rows: Sequence[PromptRow], tokenizer: Any, max_prompt_tokens: int, key: str = "data.max_prompt_tokens"
) -> tuple[list[PromptRow], list[tuple[str, int]]]:
    """Keep rows whose prompt, rendered as the engines render it (`chat_prompt_ids`), has at most
    `max_prompt_tokens` tokens; return (kept, [(source, tokens) of each dropped row]). DataError naming `key`
    when every row is too long."""
    counts = [len(chat_prompt_ids(tokenizer, row.messages)) for row in rows]
    kept = [row for row, n in zip(rows, counts, strict=True) if n <= max_prompt_tokens]
    dropped = [(row.source, n) for row, n in zip(rows, counts, strict=True) if n > max_prompt_tokens]
    if rows and not kept:
        raise DataError(
            f"every one of the {len(rows)} prompts of {rows[0].source.rsplit(':', 1)[0]} is longer than "
            f"{key}={max_prompt_tokens} (the shortest has {min(counts)} tokens, rendered with the chat template)"
        )
    return kept, dropped


class PromptSampler:
    """Endless, resumable sampling of row indices: a fresh seeded permutation every epoch.

    `state_dict()` / `load_state_dict()` capture the exact position, so a resumed run draws the same prompts
    as an uninterrupted one.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool = True) -> None:
        if num_rows <= 0:
            raise DataError("cannot sample from an empty dataset")
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_rows))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_indices(self, count: int) -> list[int]:
        """The next `count` row indices (crossing into new epochs as needed)."""
        out = []
        while len(out) < count:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.num_rows - self.position)
            out.extend(self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_rows") != self.num_rows or state.get("seed") != self.seed:
            raise DataError(
                f"sampler state is for {state.get('num_rows')} rows / seed {state.get('seed')}, but this run has "
                f"{self.num_rows} rows / seed {self.seed}: the dataset or seed changed since the checkpoint"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
