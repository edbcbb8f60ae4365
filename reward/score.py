"""Batch scoring command: `python -m reward.score IN.jsonl --output OUT.jsonl [--workers N] [--timeout S]
[--reward-fn package.module:function] [--reward-kwargs JSON]`.

Input: one JSON object per line with a string `response` and the ground truth under `ground_truth` or, in
verl rows, `reward_model.ground_truth` (a string, or a number that is turned into its string). Blank lines
are skipped. The reward fn's `extra` is the row's `extra_info` object plus its `data_source` when present.
Output: each input object plus `correct`, `score`, `status`, `extracted`, `latency_s` (and `error` when the
status is not "ok"), one line per input line, in input order.

Failure policy: the whole input is validated first; a malformed line (invalid UTF-8 or JSON, not an object,
missing or non-string fields) stops the command before anything is scored or written, with
"IN.jsonl:LINE: problem" and exit code 2. Scoring then streams: results are written and flushed block by
block, so an interrupted run keeps every block already scored. Progress goes to stderr.

Scoring runs in this process through `ScorerPool` (no Ray): `--workers` child processes, each sample under a
hard `--timeout`. Samples that time out or crash are written with status "timeout"/"error", score 0.0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reward.loader import DEFAULT_REWARD_FN, load_reward_fn
from reward.pool import ChildStartError, ScorerPool

BLOCK_SAMPLES = 512
"""Samples scored (and written) per block."""


class InputError(ValueError):
    """A malformed input line; the message names the file and line."""


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any], str, str, dict[str, Any]]]:
    """Yield (line_number, row, response, ground_truth, extra) for each non-blank line of a jsonl file.

    Raises InputError naming the file and line for the first malformed line.
    """
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit integer, deep nesting
                raise InputError(f"{where}: invalid JSON ({str(e)[:200]})") from e
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
            response, ground_truth, extra = parse_row(row, where)
            yield line_number, row, response, ground_truth, extra


def parse_row(row: dict[str, Any], where: str) -> tuple[str, str, dict[str, Any]]:
    """(response, ground_truth, extra) of one input row; InputError naming `where` if a field is bad."""
    if "response" not in row:
        raise InputError(f"{where}: missing field 'response'")
    response = row["response"]
    if not isinstance(response, str):
        raise InputError(f"{where}: 'response' must be a string, got {type(response).__name__}")
    if "ground_truth" in row:
        ground_truth, field = row["ground_truth"], "ground_truth"
    elif isinstance(row.get("reward_model"), dict) and "ground_truth" in row["reward_model"]:
        ground_truth, field = row["reward_model"]["ground_truth"], "reward_model.ground_truth"
    else:
        raise InputError(f"{where}: missing field 'ground_truth' (or 'reward_model.ground_truth')")
    if isinstance(ground_truth, int | float) and not isinstance(ground_truth, bool):
        ground_truth = str(ground_truth)
    if not isinstance(ground_truth, str):
        kind = type(ground_truth).__name__
        raise InputError(f"{where}: '{field}' must be a string or a number, got {kind}")
    extra_info = row.get("extra_info")
    extra = dict(extra_info) if isinstance(extra_info, dict) else {}
    if "data_source" in row:
        extra.setdefault("data_source", row["data_source"])
    return response, ground_truth, extra


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 2 bad arguments or input)."""
    parser = argparse.ArgumentParser(prog="python -m reward.score", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="jsonl file with response and ground_truth per line")
    parser.add_argument("--output", type=Path, required=True, help="jsonl file to write")
    parser.add_argument("--workers", type=int, default=2, help="scorer child processes (default 2)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per sample (default 5)")
    parser.add_argument(
        "--reward-fn",
        default=DEFAULT_REWARD_FN,
        help=f"package.module:function (default {DEFAULT_REWARD_FN})",
    )
    parser.add_argument(
        "--reward-kwargs", default="{}", help="JSON object of keyword arguments, e.g. '{\"wrong_score\": 0}'"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"reward.score: error: {message}", file=sys.stderr)
        return 2

    if args.workers < 1:
        return fail(f"--workers must be >= 1, got {args.workers}")
    if not args.timeout > 0:
        return fail(f"--timeout must be > 0, got {args.timeout}")
    try:
        fn_kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as e:
        return fail(f"--reward-kwargs is not valid JSON: {e}")
    if not isinstance(fn_kwargs, dict):
        return fail("--reward-kwargs must be a JSON object")
    if not args.input.is_file():
        return fail(f"input file {args.input} does not exist")
    if args.output.resolve() == args.input.resolve():
        return fail("--output must differ from the input file")
    try:
        load_reward_fn(args.reward_fn)
        total = sum(1 for _ in read_rows(args.input))  # validate everything before scoring anything
    except (ValueError, OSError) as e:
        return fail(str(e))

    progress = _Progress(total, quiet=args.quiet)
    statuses: Counter[str] = Counter()
    num_correct = 0
    try:
        pool = ScorerPool(args.workers, args.reward_fn, timeout_s=args.timeout, fn_kwargs=fn_kwargs)
    except ChildStartError as e:
        return fail(str(e))
    with pool:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            out = args.output.open("w", encoding="utf-8")
        except OSError as e:
            return fail(f"cannot write --output {args.output}: {e}")
        with out:
            rows = read_rows(args.input)
            while block := list(itertools.islice(rows, BLOCK_SAMPLES)):
                results = pool.score_batch(
                    [response for _, _, response, _, _ in block],
                    [ground_truth for _, _, _, ground_truth, _ in block],
                    [extra for _, _, _, _, extra in block],
                    on_progress=lambda done, _total, base=progress.done: progress.update(base + done),
                )
                for (_, row, *_), result in zip(block, results):
                    out.write(json.dumps({**row, **result.to_dict()}, ensure_ascii=True) + "\n")
                    statuses[result.status] += 1
                    num_correct += result.correct
                out.flush()  # already-scored rows survive an interruption
                progress.done += len(block)
    scored = sum(statuses.values())
    ok = statuses["ok"]
    accuracy = f"{num_correct / ok:.4f}" if ok else "n/a"
    summary = ", ".join(f"{k}={v}" for k, v in sorted(statuses.items()))
    print(
        f"reward.score: {scored} samples scored in {progress.elapsed():.1f} s ({summary}); "
        f"accuracy among ok {accuracy}; wrote {args.output}",
        file=sys.stderr,
    )
    return 0


class _Progress:
    """Progress lines on stderr, at most one per second."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.done = total, quiet, 0
        self._start = self._last = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.quiet or (now - self._last < 1.0 and done < self.total):
            return
        self._last = now
        rate = done / max(now - self._start, 1e-9)
        print(f"reward.score: {done}/{self.total} scored ({rate:.0f} samples/s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
