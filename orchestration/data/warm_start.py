"""Supervised warm-start: a short SFT of a model on worked solutions, so that RL starts with some signal.

A random tiny model never answers right, and RL with outcome rewards learns nothing from groups that are
all wrong (dynamic sampling drops them). The demo therefore first fine-tunes the model on the task's worked
chains (`extra_info.solution` of each training row, e.g. "7+3=10\\n10*2=20\\nAnswer: 20"): plain
transformers + torch on the CPU, next-token cross-entropy on the assistant tokens only, i.e. on

    chat_template(prompt, add_generation_prompt=True) + solution + <eos>
    └──────────── labels -100 (no loss) ────────────┘ └─── loss ────┘

`with_shortcuts` optionally replaces a seeded fraction of the targets by their answer line alone ("Answer: 20"),
so that the warm-started model sometimes answers without reasoning (the demo's starting point: two habits,
and RL learns which one pays; on the built-in task it is, measured, the worked chain).
AdamW with linear warm-up and cosine decay; batches drawn with a seeded generator, so the result is
deterministic from (base model, rows, config) on a given machine and thread count (not across CPUs: see
WarmStartConfig.num_threads).

Cached: the output directory is `<cache_dir>/<key>`, where key is a hash of the base model's files, the
training texts and the config; `warm_start_args.json` is written last and marks a complete directory, so a
second call with the same arguments returns at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARGS_FILE = "warm_start_args.json"
TINY_ARGS_FILE = "tiny_model_args.json"  # rollout.tiny's marker: not copied (this is no longer that model)
_FORMAT_VERSION = 1  # bump when the training recipe below changes, so that cached directories are rebuilt
_HASHED_FILE_BYTES = 64 * 2**20  # files up to this size are hashed by content; bigger ones by name and size


class WarmStartError(RuntimeError):
    """A warm-started model that failed its check before RL; the message says what it can and cannot do."""


@dataclass(frozen=True)
class WarmStartConfig:
    """The SFT recipe.

    steps:          optimizer steps (0 = no warm-start).
    lr:             peak learning rate of AdamW.
    batch_rows:     (prompt, solution) pairs per optimizer step.
    warmup_steps:   linear lr warm-up, optimizer steps; cosine decay to 10% of the peak afterwards.
    weight_decay:   AdamW decoupled weight decay.
    seed:           seeds the batch order and torch's RNG.
    num_threads:    torch CPU threads while training (1: fastest for a tiny model on a shared 2-core machine,
                    where more threads oversubscribe the cores). The result is bit-for-bit the same for the same
                    machine and thread count only: another thread count or CPU rounds differently (measured: the
                    losses part after 5 steps) and hundreds of steps amplify it into a different model.
    """

    steps: int
    lr: float = 3e-3
    batch_rows: int = 32
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"warm-start steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"warm-start lr must be > 0, got {self.lr}")
        if self.batch_rows < 1:
            raise ValueError(f"warm-start batch_rows must be >= 1, got {self.batch_rows}")
        if self.warmup_steps < 0:
            raise ValueError(f"warm-start warmup_steps must be >= 0, got {self.warmup_steps}")


def _model_fingerprint(model_dir: Path) -> str:
    """Hash of a model directory: content of files up to 64 MiB, name and size of bigger ones."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != ARGS_FILE):
        digest.update(str(path.relative_to(model_dir)).encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        if size <= _HASHED_FILE_BYTES:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def with_shortcuts(
    examples: Sequence[tuple[Sequence[dict], str]], fraction: float, seed: int
) -> list[tuple[Sequence[dict], str]]:
    """Replace the worked solution of a seeded `fraction` of the examples by its last line alone (the answer
    line, e.g. "Answer: 20"): a warm-started model then sometimes answers without reasoning first. Which habit
    is more often right depends on the model and task; RL finds out (on the built-in task: the worked chain)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"shortcut fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"warm-start-shortcuts:{seed}")
    return [(m, s.strip().splitlines()[-1] if rng.random() < fraction else s) for m, s in examples]


def cache_key(base_model: str | Path, examples: Sequence[tuple[Sequence[dict], str]], config: WarmStartConfig) -> str:
    """The cache key: sha256 of the base model's files, the (prompt messages, solution) pairs and the config."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format_version": _FORMAT_VERSION, "config": asdict(config)}, sort_keys=True).encode())
    digest.update(_model_fingerprint(Path(base_model)).encode())
    digest.update(json.dumps([[list(m), s] for m, s in examples], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def encode_examples(tokenizer, examples: Sequence[tuple[Sequence[dict], str]]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + solution + eos for each example, and where the response starts (its prompt length)."""
    from rollout.types import chat_prompt_ids  # torch, imported where it is used (as below)

    out = []
    for messages, solution in examples:
        prompt_ids = chat_prompt_ids(tokenizer, messages)
        response_ids = tokenizer.encode(solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append((prompt_ids + response_ids, len(prompt_ids)))
    return out


def collate(encoded: Sequence[tuple[list[int], int]], pad_token_id: int):
    """Right-padded (input_ids [B, L] int64, attention_mask [B, L] int64, labels [B, L] int64 with -100 on the
    prompt and on padding)."""
    import torch

    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.int64)
    labels = torch.full((len(encoded), length), -100, dtype=torch.int64)
    for row, (ids, prompt_len) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention_mask, labels


def _lr_at(step: int, config: WarmStartConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def train_sft(
    model,
    tokenizer,
    examples: Sequence[tuple[Sequence[dict], str]],
    config: WarmStartConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fine-tune `model` in place; returns the loss of every optimizer step (mean over assistant tokens).
    `on_step(steps_done, loss)`, when given, is called after every optimizer step (the model is in train mode
    then: a callback that evaluates sets eval and back)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _train_sft(model, tokenizer, examples, config, on_step)
    finally:
        torch.set_num_threads(threads)


def _train_sft(
    model,
    tokenizer,
    examples: Sequence[tuple[Sequence[dict], str]],
    config: WarmStartConfig,
    on_step: Callable[[int, float], None] | None,
) -> list[float]:
    import torch

    encoded = encode_examples(tokenizer, examples)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    losses, order, cursor = [], torch.randperm(len(encoded), generator=generator).tolist(), 0
    start = last_print = time.monotonic()
    for step in range(config.steps):
        batch = []
        while len(batch) < config.batch_rows:  # walk seeded permutations, a fresh one every epoch
            if cursor == len(order):
                order, cursor = torch.randperm(len(encoded), generator=generator).tolist(), 0
            batch.append(encoded[order[cursor]])
            cursor += 1
        input_ids, attention_mask, labels = collate(batch, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if time.monotonic() - last_print > 10 or step + 1 == config.steps:
            last_print = time.monotonic()
            print(
                f"warm-start step {step + 1}/{config.steps}: loss {losses[-1]:.4f} ({last_print - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


def sft_seconds(model_dir: str | Path) -> float:
    """The seconds of SFT recorded in a cached warm-start and in the warm-starts it started from (its stages and
    rounds), however many of them were found cached by the run that asked for it."""
    total, path = 0.0, Path(model_dir)
    while (path / ARGS_FILE).is_file():
        record = json.loads((path / ARGS_FILE).read_text())
        total, path = total + record.get("seconds", 0.0), Path(record["base_model"])
    return total


def warm_start(
    base_model: str | Path,
    examples: Sequence[tuple[Sequence[dict], str]],
    config: WarmStartConfig,
    cache_dir: str | Path,
    on_step: Callable[[int, float, Any], None] | None = None,
) -> Path:
    """The warm-started model's HF directory, `<cache_dir>/<key>` (trained once, then reused).

    base_model: Hugging Face model directory to start from (weights and tokenizer).
    examples:   (prompt chat messages, worked solution text) pairs.
    config:     the SFT recipe.
    cache_dir:  where warm-started models are kept, one sub-directory per cache key.
    on_step:    called as on_step(steps_done, loss, model) after every SFT step when the model is trained here
                (not when it is found cached), e.g. to measure it (tools.warm_start_check); it must leave the
                model and torch's RNG as they were (the cached model must not depend on it).
    """
    if not examples:
        raise ValueError("warm-start needs at least one (prompt, solution) example")
    key = cache_key(base_model, examples, config)
    out = Path(cache_dir) / key
    record = {"format_version": _FORMAT_VERSION, "base_model": str(base_model), "config": asdict(config)}
    if (out / ARGS_FILE).is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"warm-start: {config.steps} SFT steps on {len(examples)} worked solutions → {out}", flush=True)
    if out.exists():  # an interrupted build
        shutil.rmtree(out)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    start = time.monotonic()
    hook = None if on_step is None else lambda step, loss: on_step(step, loss, model)
    losses = train_sft(model, tokenizer, examples, config, hook)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # this process's own: two runs may train one key at once
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for path in Path(base_model).iterdir():  # the tokenizer files as they are (vLLM rebuilds from vocab/merges)
        skip = path.suffix == ".safetensors" or path.name == TINY_ARGS_FILE or (tmp / path.name).exists()
        if path.is_file() and not skip:
            shutil.copy2(path, tmp / path.name)
    record |= {"first_loss": losses[0], "final_loss": losses[-1], "seconds": time.monotonic() - start}
    (tmp / ARGS_FILE).write_text(json.dumps(record, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # the same warm-start, trained by another run at the same time, is in place already
        shutil.rmtree(tmp)
        if not (out / ARGS_FILE).is_file():
            raise
    return out
