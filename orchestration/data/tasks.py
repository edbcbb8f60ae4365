"""The built-in synthetic reasoning task: multi-step arithmetic, evaluated left to right, with a worked chain
and an "Answer:" line.

A problem starts from a number and applies a few operations (+, -, * by a single digit), one after the other;
the worked solution writes one step per line and ends with DAPO's answer line, e.g.

    prompt:   "Compute left to right: 7 +3 -2 *3 -9"
    solution: "7+3=10\n10-2=8\n8*3=24\n24-9=15\nAnswer: 15"

Every intermediate value stays in 0..max_value, so each line is an easy fact (a small table), while the answer
alone is a composition of several non-commuting steps that a small model cannot do in one forward pass: the
task rewards reasoning before the answer. Measured on the demo's warm-started ~1M-parameter model (`make
demo`, seed 0, summary.json before RL; 800 samples at temperature 1, top-p 0.7): responses that write the
chain first are right 47% of the time, responses that answer at once 8%. (A plain sum of 3-4 digits, this
task's first version, taught the opposite: a small model adds a few digits at once more reliably than it
chains partial sums, and RL learned to skip the chain.)

Rows use the verl / DAPO-Math schema (the reward is DAPO's: the answer after the last "Answer:"), so the
trainer handles them exactly like a public math dataset. `extra_info.solution` holds the worked chain (used by
the demo's supervised warm-start). Train and test problems are disjoint.

Two task families (`data.synthetic_task`), on the same problems (the same seed gives the same prompts):

* `chain`: the solution above, one operation per line.
* `free_chain`: the response length is the policy's choice. A solution writes the chain's first L operations
  one per line, then the remaining ones in a single line, then the answer (always the last line's value). Three
  habits, the same prompt and answer, different amounts of written work:

      at_once   "7+3-2*3-9=15\nAnswer: 15"                         (L = 0: every operation in one line)
      partial   "7+3=10\n10-2=8\n8*3-9=15\nAnswer: 15"             (0 < L < n-1: the rest in one line)
      stepwise  "7+3=10\n10-2=8\n8*3=24\n24-9=15\nAnswer: 15"     (one operation per line: the longest)

  A one-operation line is an easy fact (as in `chain`); a line of several operations is a composition that a
  small model cannot do in one pass, so the design means the more of the chain is written out, the more often
  the answer is right. Whether a warm-started model shows it is measured before RL (eval/initial_habit/*): an
  SFT on the mixed habits alone did not (stepwise chains right 7-19%: it had not learned to find the k-th
  operation in the prompt); conf/experiment/study_length.yaml's recipe trains on the stepwise chains first
  (model.warm_start_stepwise_steps, docs/warm_start.md). Each training
  row's solution (`extra_info.solution`, the warm-start's target) has its habit drawn with
  the data seed from `data.synthetic_habit_mix` and, when partial, L uniform in 1..n-2
  (`extra_info.lines_written`), so the warm-started policy starts with a mix of lengths and RL decides how much
  written work pays. `habit_of` reads the habit back from a response (for both families; "direct" is an answer
  with nothing before it, as `chain`'s warm-start shortcut writes).
"""

from __future__ import annotations

import json
import operator
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from reward.extract import answers_at_once, last_answer

PROMPT_TEMPLATE = "Compute left to right: {start} {steps}"
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
OPERANDS = range(2, 10)  # the single digit each operation applies
Problem = tuple[int, list[tuple[str, int]]]  # (start value, [(operation, operand), ...])
TASKS = ("chain", "free_chain")  # data.synthetic_task
HABITS = ("direct", "at_once", "partial", "stepwise")  # ways to write a solution, shortest first
SOURCES = {"chain": "synthetic-arithmetic", "free_chain": "synthetic-free-chain"}  # each row's data_source
_WORK_LINE_RE = re.compile(r"\d+(?:[-+*]\d+)+=-?\d+")  # a line of one or more operations
_OP_RE = re.compile(r"[-+*]")


def chain_values(problem: Problem) -> list[int]:
    """The start value and the value after each operation; the last one is the answer."""
    start, steps = problem
    values = [start]
    for op, operand in steps:
        values.append(OPERATIONS[op](values[-1], operand))
    return values


def worked_solution(problem: Problem, lines: int | None = None) -> str:
    """The worked chain: one "a<op>b=c" line per operation; with `lines`, only the first `lines` operations
    one per line and the remaining ones in a single line "a<op>b<op>c...=value"; then "Answer: <final value>"."""
    values, steps = chain_values(problem), problem[1]
    written = len(steps) if lines is None else min(lines, len(steps))
    work = [f"{a}{op}{operand}={b}" for a, (op, operand), b in zip(values, steps[:written], values[1:])]
    if written < len(steps):
        work.append(f"{values[written]}{''.join(f'{op}{operand}' for op, operand in steps[written:])}={values[-1]}")
    return "\n".join([*work, f"Answer: {values[-1]}"])


def habit_of(response: str) -> str:
    """The habit a response is written in, from the lines before its last "Answer:" (each must read
    "a<op>b...=c"): "direct" (no line: the answer with nothing before it), "at_once" (one line of several
    operations), "partial" (lines of one operation, then one of several), "stepwise" (only lines of one
    operation), else "other" (any other text, or no answer line). It reads the format only, not whether the
    arithmetic is right or every operation was written."""
    if answers_at_once(response):
        return "direct"
    answer = last_answer(response)
    if answer is None:
        return "other"
    lines = [line.strip() for line in response[: answer.start()].splitlines() if line.strip()]
    if not lines or not all(_WORK_LINE_RE.fullmatch(line) for line in lines):
        return "other"
    ops = [len(_OP_RE.findall(line.split("=", 1)[0])) for line in lines]
    if all(n == 1 for n in ops):
        return "stepwise"
    if all(n == 1 for n in ops[:-1]):
        return "at_once" if len(ops) == 1 else "partial"
    return "other"


def habit_stats(records: Iterable[tuple[str, bool, int]]) -> dict[str, float]:
    """Share, accuracy and mean length (tokens) of each habit over (habit, correct, response tokens) records:
    keys "<habit>_frac" for every habit of HABITS and "other", "<habit>_accuracy" and "<habit>_length" for
    those that occur. Empty records give {}."""
    records = list(records)
    out: dict[str, float] = {}
    for name in (*HABITS, "other") if records else ():
        mine = [(correct, length) for habit, correct, length in records if habit == name]
        out[f"{name}_frac"] = len(mine) / len(records)
        if mine:
            out[f"{name}_accuracy"] = sum(c for c, _ in mine) / len(mine)
            out[f"{name}_length"] = sum(n for _, n in mine) / len(mine)
    return out


def prompt_text(problem: Problem) -> str:
    start, steps = problem
    return PROMPT_TEMPLATE.format(start=start, steps=" ".join(f"{op}{operand}" for op, operand in steps))


def make_problem(rng: random.Random, min_steps: int, max_steps: int, max_value: int) -> Problem:
    """A start in 1..9, then min_steps..max_steps operations, each drawn uniformly among those keeping the
    value in 0..max_value (there is always one when max_value >= 9: +2 from 0 or 1, -2 from anything above)."""
    value = start = rng.randint(1, 9)
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        allowed = [(op, d) for op, f in OPERATIONS.items() for d in OPERANDS if 0 <= f(value, d) <= max_value]
        op, operand = rng.choice(allowed)
        steps.append((op, operand))
        value = OPERATIONS[op](value, operand)
    return start, steps


def make_rows(
    num_train: int,
    num_test: int,
    *,
    seed: int = 0,
    min_steps: int = 3,
    max_steps: int = 4,
    max_value: int = 30,
    task: str = "chain",
    habit_mix: Mapping[str, float] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test rows in the verl schema (deterministic in `seed`; the problems do not depend on
    `task`). free_chain needs `habit_mix` ({habit: weight}, HABITS, weights >= 0 summing to 1): each training
    row's solution is written in the habit drawn from it, a partial one with 1..n-2 single-operation lines
    drawn uniformly (a stream seeded apart from the problems'); test rows carry the stepwise one."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
    if max_value < 9:
        raise ValueError(f"max_value must be >= 9 (the start values are 1..9), got {max_value}")
    if task == "free_chain":
        check_habit_mix(habit_mix)
        if min_steps < 3:
            raise ValueError(f"free_chain needs min_steps >= 3 (a partial chain writes 1..n-2 lines), got {min_steps}")
    rng, habit_rng = random.Random(seed), random.Random(f"free-chain-habits:{seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < num_train + num_test:
        attempts += 1
        if attempts > 100 * (num_train + num_test) + 1000:
            raise ValueError("not enough distinct problems for these settings; raise max_value or max_steps")
        problem = make_problem(rng, min_steps, max_steps, max_value)
        prompt = prompt_text(problem)
        if prompt in seen:
            continue
        seen.add(prompt)
        split = "train" if len(rows) < num_train else "test"
        extra = {"split": split, "index": len(rows), "solution": worked_solution(problem)}
        if task == "free_chain":
            habit, n = "stepwise", len(problem[1])
            if split == "train":
                habit = habit_rng.choices(list(habit_mix), weights=list(habit_mix.values()))[0]
            lines = habit_rng.randint(1, n - 2) if habit == "partial" else {"stepwise": n}.get(habit, 0)
            solution = f"Answer: {chain_values(problem)[-1]}" if habit == "direct" else worked_solution(problem, lines)
            extra |= {"solution": solution, "habit": habit, "lines_written": lines}
        rows.append(
            {
                "data_source": SOURCES[task],
                "prompt": [{"role": "user", "content": prompt}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(chain_values(problem)[-1])},
                "extra_info": extra,
            }
        )
    return rows[:num_train], rows[num_train:]


def check_habit_mix(habit_mix: Mapping[str, float] | None) -> None:
    """ValueError unless `habit_mix` maps habits of HABITS to weights >= 0 that sum to 1."""
    if not habit_mix:
        raise ValueError(f"free_chain needs a habit mix over {HABITS}, got {habit_mix!r}")
    unknown = sorted(set(habit_mix) - set(HABITS))
    if unknown:
        raise ValueError(f"unknown habit(s) {unknown}; the habits are {HABITS}")
    if any(not w >= 0 for w in habit_mix.values()) or abs(sum(habit_mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"habit weights must be >= 0 and sum to 1, got {dict(habit_mix)}")


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
