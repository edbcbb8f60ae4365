"""Prompt datasets in the schema verl uses for DAPO-Math-17k, and a resumable sampler.

A row (jsonl line or parquet row):
    {"data_source": str, "prompt": [{"role": "user", "content": str}, ...], "ability": str,
     "reward_model": {"ground_truth": str | number, "style": str}, "extra_info": {...}}
Only `prompt` and `reward_model.ground_truth` are required; everything else is carried along (`data_source`,
`extra_info`, and any other field or parquet column in `PromptRow.other`). Public RL datasets in this schema
(DAPO-Math-17k, BytedTsinghua-SIA/AIME-2024, ...) load unchanged.

What a bad file does (each a DataError naming the file and the line (jsonl, from 1) or row (parquet, from 0)):
a row that is not an object, a missing or empty prompt, a message that is not {role, content} strings or has
an unknown role, a user message with no text, a missing or empty ground truth or one that is not a string or
a number (a list of answers is refused, not joined: write it as one string), extra_info that is not an
object, a line that is not JSON (the last one: "cut short?"), bytes that are not UTF-8, a parquet file that
cannot be read or lacks a column, a file with no rows, a directory, a suffix other than .jsonl / .parquet.
Duplicate rows are kept; `find_duplicates` names them (the trainer prints how many at start-up).
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
    source: "<file>:<line>" (jsonl, 1-based) or "<file>:row <row>" (parquet, 0-based): where the row came from.
    data_source, extra: the row's `data_source` and `extra_info`, passed to reward functions.
    other: the row's remaining top-level fields (e.g. `ability`, extra parquet columns), unchanged.
    """

    messages: tuple[dict[str, str], ...]
    ground_truth: str
    source: str
    data_source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)


KNOWN_FIELDS = ("prompt", "reward_model", "data_source", "extra_info")
"""Top-level fields PromptRow reads; every other field goes to `PromptRow.other`."""


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
        if role == "user" and not message["content"].strip():
            raise DataError(f"{where}: prompt[{i}] is a user message with no text (content {message['content']!r})")
        messages.append({"role": role, "content": message["content"]})
    reward_model = raw.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if isinstance(truth, (int, float)) and not isinstance(truth, bool):
        truth = str(truth)
    if isinstance(truth, (list, tuple)):
        raise DataError(
            f"{where}: 'reward_model.ground_truth' is a list, {truth!r:.80}: the scorer compares one answer; write "
            'it as one string (e.g. "1, 2" for several values)'
        )
    if not isinstance(truth, str) or not truth.strip():
        raise DataError(f"{where}: 'reward_model.ground_truth' must be a non-empty string, got {truth!r:.80}")
    extra = raw.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{where}: 'extra_info' must be an object, got {type(extra).__name__}")
    other = {key: value for key, value in raw.items() if key not in KNOWN_FIELDS}
    return PromptRow(tuple(messages), truth, where, str(raw.get("data_source", "")), dict(extra), other)


def _jsonl_rows(path: Path) -> list[PromptRow]:
    """The rows of a .jsonl file, one JSON object per line (blank lines skipped); lines are numbered from 1."""
    lines = path.read_bytes().splitlines(keepends=True)
    rows = []
    for line_no, line in enumerate(lines, start=1):
        cut_short = line_no == len(lines) and not line.endswith((b"\n", b"\r"))
        hint = " (the file's last line has no newline: was the file cut short?)" if cut_short else ""
        try:
            text = line.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")  # a BOM is fine
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{line_no}: not UTF-8 text (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line){hint}"
            ) from None
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
        rows.append(_parse_row(raw, f"{path}:{line_no}"))
    return rows


def load_rows(path: str | Path) -> list[PromptRow]:
    """Load a .jsonl or .parquet file of verl-schema rows; a malformed row raises DataError naming it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a dataset file: give its .jsonl / .parquet files one by one")
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    if path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable parquet file (cut short?): {e}") from None
        missing = {"prompt", "reward_model"} - set(table.column_names)
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; columns are {table.column_names}")
        rows = [_parse_row(raw, f"{path}:row {i}") for i, raw in enumerate(table.to_pylist())]
    else:
        raise DataError(
            f"{path}: unsupported dataset format {path.suffix!r} (use .jsonl, one JSON object per line, or .parquet)"
        )
    if not rows:
        raise DataError(f"{path}: the dataset has no rows (the file is empty or holds only blank lines)")
    return rows


def load_datasets(paths: Sequence[str | Path]) -> list[PromptRow]:
    """Concatenate several files (in order)."""
    if not paths:
        raise DataError("no dataset files given")
    return [row for path in paths for row in load_rows(path)]


def find_duplicates(rows: Sequence[PromptRow]) -> list[tuple[str, str]]:
    """(source, source of the first row like it) for every row whose prompt and ground truth equal an earlier
    row's, in order. The rows stay in the dataset (a duplicate is drawn as often as its copies)."""
    first: dict[tuple, str] = {}
    duplicates = []
    for row in rows:
        key = (tuple(tuple(sorted(m.items())) for m in row.messages), row.ground_truth)
        if key in first:
            duplicates.append((row.source, first[key]))
        else:
            first[key] = row.source
    return duplicates


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
