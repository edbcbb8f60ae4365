"""The built-in synthetic reasoning task: multi-step addition with a worked chain and an "Answer:" line.

A problem asks for the sum of a few small numbers; the worked solution adds them one at a time, one line per
step, and ends with DAPO's answer line, e.g.

    prompt:   "Add the numbers: 17 5 38"
    solution: "17+5=22\n22+38=60\nAnswer: 60"

Rows use the verl / DAPO-Math schema (the reward is DAPO's: the answer after the last "Answer:"), so the
trainer handles them exactly like a public math dataset. `extra_info.solution` holds the worked chain (used by
the demo's supervised warm-start). Train and test problems are disjoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROMPT_TEMPLATE = "Add the numbers: {numbers}"


def worked_solution(numbers: list[int]) -> str:
    """The step-by-step chain for `numbers`: one partial sum per line, then "Answer: <sum>"."""
    lines, total = [], numbers[0]
    for x in numbers[1:]:
        lines.append(f"{total}+{x}={total + x}")
        total += x
    lines.append(f"Answer: {total}")
    return "\n".join(lines)


def make_problem(rng: random.Random, min_terms: int, max_terms: int, max_value: int) -> list[int]:
    return [rng.randint(1, max_value) for _ in range(rng.randint(min_terms, max_terms))]


def make_rows(
    num_train: int,
    num_test: int,
    *,
    seed: int = 0,
    min_terms: int = 2,
    max_terms: int = 4,
    max_value: int = 50,
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test rows in the verl schema (deterministic in `seed`)."""
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}, {max_terms}")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < num_train + num_test:
        attempts += 1
        if attempts > 100 * (num_train + num_test) + 1000:
            raise ValueError("not enough distinct problems for these settings; raise max_value or max_terms")
        numbers = make_problem(rng, min_terms, max_terms, max_value)
        if tuple(numbers) in seen:
            continue
        seen.add(tuple(numbers))
        split = "train" if len(rows) < num_train else "test"
        rows.append(
            {
                "data_source": "synthetic-addition",
                "prompt": [{"role": "user", "content": PROMPT_TEMPLATE.format(numbers=" ".join(map(str, numbers)))}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(sum(numbers))},
                "extra_info": {"split": split, "index": len(rows), "solution": worked_solution(numbers)},
            }
        )
    return rows[:num_train], rows[num_train:]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
