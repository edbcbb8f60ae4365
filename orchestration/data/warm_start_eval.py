"""How good a warm-start is, measured on the built-in task's held-out problems with plain transformers (no vLLM,
no Ray): used by the warm-start's check before RL (`orchestration.inputs.prepare_model`) and by
`tools.warm_start_check`, which follows a warm-start's SFT step by step.

Two measurements:

* `teacher_forced_report`: one forward pass over each held-out problem's worked chain (the stepwise solution,
  "7+3=10\\n10-2=8\\n...Answer: 15"), and whether the model's most likely next token is the chain's, position by
  position (one byte = one token with the tiny tokenizer). Each position of a chain line "a<op>b=c" has a role:

      copy        a       the previous line's value (or the start value): copied from just above
      operation   <op>b=  the prompt's k-th operation on line k: found in the prompt by counting lines
      result      c\\n     the arithmetic: an easy fact given a, <op> and b
      answer      the answer line's value (a copy of the last line's value)

  A model that computes well but does not follow the prompt is right on `result` and wrong on `operation`: the
  failed warm-starts' pattern (issue 37). `operation_by_line[k]` is the share of lines k (1-based) whose
  operation is right in full.
* `sampled_report`: responses sampled at the evaluation's temperature and top-p, scored by the task's reward,
  with the share and accuracy of each habit (tasks.habit_stats): what RL starts from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from orchestration.data.tasks import habit_of, habit_stats
from reward.math import score_math

ROLES = ("copy", "operation", "result", "answer")
_LINE_RE = re.compile(r"(\d+)([-+*]\d+=)(-?\d+)")


def chain_roles(solution: str) -> list[tuple[str, int]] | None:
    """(role, 1-based line number) of every character of a stepwise worked chain and of its answer line's value
    (the "Answer: " prefix and the final newline get role "format"); None when `solution` is not a stepwise chain."""
    lines = solution.split("\n")
    if len(lines) < 2 or not lines[-1].startswith("Answer: "):
        return None
    roles: list[tuple[str, int]] = []
    for k, line in enumerate(lines[:-1], start=1):
        match = _LINE_RE.fullmatch(line)
        if match is None:
            return None
        a, op, c = match.groups()
        roles += [("copy", k)] * len(a) + [("operation", k)] * len(op) + [("result", k)] * (len(c) + 1)
    roles += [("format", 0)] * len("Answer: ") + [("answer", 0)] * (len(lines[-1]) - len("Answer: "))
    return roles


def teacher_forced_report(model, tokenizer, rows: Sequence[dict], batch_size: int = 64) -> dict[str, Any]:
    """Next-token accuracy by role on the held-out rows' stepwise chains (`extra_info.solution`, the test rows'
    form in both task families), the chain's first character left out (whether to write a chain at all is the
    habit, not the skill). Returns {"<role>_accuracy": float, "operation_by_line": [float, ...] (line k's
    operation right in full, k = 1, 2, ...), "operation_lines": the same over all lines, "chain_exact": share of
    chains predicted right at every position, i.e. written right in full by greedy decoding,
    "operation_after_unique" / "operation_after_repeated": lines 2, 3, ... right in full when the previous line's
    operation (e.g. "+3") occurs once / more than once in the problem (a model that finds the next operation by
    looking up the previous one in the prompt, an induction head, is right on the first and guesses on the
    second)}. Needs the byte-level tiny tokenizer (one token per character)."""
    import torch

    from orchestration.data.warm_start import collate, encode_examples

    items = []
    for row in rows:
        solution = row["extra_info"]["solution"]
        roles = chain_roles(solution)
        if roles is None:
            raise ValueError(f"held-out row {row['extra_info'].get('index')}: not a stepwise chain: {solution!r}")
        if len(tokenizer.encode(solution, add_special_tokens=False)) != len(solution):
            raise ValueError("teacher_forced_report needs a one-token-per-character tokenizer (the tiny model's)")
        items.append(((row["prompt"], solution), roles))
    hits = {role: [0, 0] for role in ROLES}
    by_line: dict[int, list[int]] = {}
    after = {"unique": [0, 0], "repeated": [0, 0]}
    exact = 0
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        encoded = encode_examples(tokenizer, [example for example, _ in chunk])
        input_ids, attention_mask, _ = collate(encoded, tokenizer.pad_token_id)
        with torch.no_grad():
            predicted = model(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
        for row, ((ids, prompt_len), ((_, solution), roles)) in enumerate(zip(encoded, chunk)):
            # the token at position p is predicted at p - 1; the solution's characters are ids[prompt_len:][:len]
            right = [predicted[row, prompt_len + i - 1].item() == ids[prompt_len + i] for i in range(len(roles))]
            exact += all(right[1:])
            line_ok: dict[int, bool] = {}
            for i, ((role, line), ok) in enumerate(zip(roles, right)):
                if i == 0 or role == "format":
                    continue
                hits[role][0] += ok
                hits[role][1] += 1
                if role == "operation":
                    line_ok[line] = line_ok.get(line, True) and ok
            for line, ok in line_ok.items():
                by_line.setdefault(line, [0, 0])
                by_line[line][0] += ok
                by_line[line][1] += 1
            ops = [m.group(2) for m in _LINE_RE.finditer(solution)]
            for line in range(2, len(ops) + 1):  # is the previous line's operation a unique key into the prompt?
                kind = "repeated" if ops.count(ops[line - 2]) > 1 else "unique"
                after[kind][0] += line_ok[line]
                after[kind][1] += 1
    report: dict[str, Any] = {f"{role}_accuracy": n / total for role, (n, total) in hits.items() if total}
    report["operation_by_line"] = [by_line[k][0] / by_line[k][1] for k in sorted(by_line)]
    lines = sum(total for _, total in by_line.values())
    report["operation_lines"] = sum(n for n, _ in by_line.values()) / lines if lines else 0.0
    report["chain_exact"] = exact / len(items) if items else 0.0
    for kind, (n, total) in after.items():
        if total:
            report[f"operation_after_{kind}"] = n / total
    return report


def sampled_report(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int,
    batch_size: int = 100,
) -> dict[str, Any]:
    """Held-out accuracy of `samples` responses per row (the reward's verdict on the answer), sampled with
    transformers' generate at `temperature` / `top_p`, and the share, accuracy and length of each habit
    ("<habit>_frac", "<habit>_accuracy", "<habit>_length" from tasks.habit_stats). Seeded with `seed`; torch's
    global RNG is left as it was (the measurement must not change a training it runs inside)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _sampled_report(model, tokenizer, rows, samples, temperature, top_p, max_tokens, batch_size)


def _sampled_report(model, tokenizer, rows, samples, temperature, top_p, max_tokens, batch_size) -> dict[str, Any]:
    import torch

    from rollout.types import chat_prompt_ids

    model.eval()
    records = []
    prompts = [(chat_prompt_ids(tokenizer, row["prompt"]), row["reward_model"]["ground_truth"]) for row in rows]
    prompts = [p for p in prompts for _ in range(samples)]
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        length = max(len(ids) for ids, _ in chunk)  # left-padded, as generation needs
        input_ids = torch.full((len(chunk), length), tokenizer.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.int64)
        for i, (ids, _) in enumerate(chunk):
            input_ids[i, length - len(ids) :] = torch.tensor(ids)
            attention_mask[i, length - len(ids) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        for (_, truth), tokens in zip(chunk, out[:, length:].tolist()):
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            tokens = [t for t in tokens if t != tokenizer.pad_token_id]
            text = tokenizer.decode(tokens)
            records.append((habit_of(text), score_math(text, truth).correct, len(tokens)))
    report: dict[str, Any] = {"accuracy": sum(c for _, c, _ in records) / len(records)}
    return report | habit_stats(records)
