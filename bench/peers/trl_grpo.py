"""Peer benchmark (issue 15): TRL's GRPOTrainer on the job of our `make demo` (DAPO loss), CPU, HF generation.

Runs in a THROWAWAY environment that has TRL (never the project's .venv); the project itself is only imported
(pure Python over torch/transformers) for the task rows and the scorer:

    python3.11 -m venv /tmp/trl_env      # outside the repo; TRL is not a dependency of the project
    /tmp/trl_env/bin/pip install trl==1.16.0 "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu \
        math-verify                       # measured with trl 1.16.0, torch 2.13.0+cpu, transformers 5.19.0
    cd /tmp && /tmp/trl_env/bin/python <repo>/bench/peers/trl_grpo.py \
        --model <repo>/outputs/models/warm_start/<hash> [--steps 60] [--threads 2] [--eval]

The job (settings of conf/config.yaml + conf/algorithm/dapo.yaml + conf/model/tiny.yaml):
  * model:   the warm-started tiny Qwen2 of the demo (orchestration.inputs.prepare_model), fp32, CPU
  * data:    orchestration.data.tasks.make_rows(2000, 200, seed=0, min_steps=3, max_steps=4, max_value=30), the rows'
             chat "prompt" field (TRL applies the model's chat template with add_generation_prompt=True)
  * reward:  reward.math.score_math(completion, ground_truth).score  (+1 / -1, DAPO's "Answer:" extraction),
             plus DAPO's soft overlong punishment (buffer 16 tokens, factor 1), as our DAPO config adds
             (--no-overlong turns it off)
  * loss:    loss_type="dapo" (token-mean over the optimizer step's tokens), epsilon=0.2, epsilon_high=0.28,
             delta=10 (= our dual-clip c=10), beta=0 (no KL, no reference model), GRPO advantages
             (group mean / group std)
  * batch:   one RL step = one generation batch of 16 prompts x 8 samples = 128 samples, used by 2 optimizer
             steps of 64 samples each (per_device_train_batch_size=64, gradient_accumulation_steps=1,
             steps_per_generation=2, num_iterations=1): TRL's max_steps counts OPTIMIZER steps = 2 x --steps
  * sampling: max_completion_length=64, temperature 1.0, top_p 1.0, top_k 0
  * optimizer: AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.1, grad clip 1.0, no warm-up,
             cosine to 10% of the peak over the run's optimizer steps (--lr-schedule constant for constant)
  * no dynamic sampling (TRL has none): every generated group is trained on, including groups whose samples
    are all right or all wrong (zero advantage, no gradient); the "informative" share is reported.

Prints one line per RL step and, last, one JSON line with the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="warm-started model directory (read only)")
    p.add_argument(
        "--project", default=str(Path(__file__).resolve().parents[2]), help="the project's root (rows and scorer)"
    )
    p.add_argument("--steps", type=int, default=60, help="RL steps (generation batches); 2 optimizer steps each")
    p.add_argument("--warmup", type=int, default=2, help="RL steps left out of the median step time")
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    p.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per RL step")
    p.add_argument("--max-tokens", type=int, default=64, help="max response tokens")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--no-overlong", action="store_true", help="score only, no soft overlong punishment")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", action="store_true", help="held-out avg@4 (200 problems, T=1, top-p 0.7) before/after")
    p.add_argument("--eval-k", type=int, default=4)
    p.add_argument("--output-dir", default="/tmp/trl_grpo_bench", help="TRL's output_dir (nothing is saved)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(args.project).resolve()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.rewards import get_soft_overlong_punishment

    from orchestration.data.tasks import make_rows
    from reward.math import score_math

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_rows, val_rows = make_rows(2000, 200, seed=0, min_steps=3, max_steps=4, max_value=30)
    train_ds = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "ground_truth": r["reward_model"]["ground_truth"]} for r in train_rows]
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    # ---------------------------------------------------------------- reward: our scorer (+ overlong shaping)
    stats: dict[str, list] = {"correct_frac": [], "mixed_frac": []}
    group = args.group_size

    def _text(completion) -> str:
        if isinstance(completion, str):
            return completion
        return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")

    def math_score(completions, ground_truth, **_) -> list[float]:
        results = [score_math(_text(c), str(gt)) for c, gt in zip(completions, ground_truth)]
        correct = [r.correct for r in results]
        # TRL's sampler puts a prompt's `group` samples next to each other (shuffled only after scoring)
        groups = [correct[i : i + group] for i in range(0, len(correct), group)]
        stats["correct_frac"].append(sum(correct) / max(len(correct), 1))
        stats["mixed_frac"].append(sum(0 < sum(g) < len(g) for g in groups) / max(len(groups), 1))
        return [r.score for r in results]

    reward_funcs = [math_score]
    if not args.no_overlong:
        reward_funcs.append(get_soft_overlong_punishment(max_completion_len=args.max_tokens, soft_punish_cache=16))

    # ---------------------------------------------------------------- held-out avg@k (our evaluation's sampling)
    def evaluate(m) -> dict:
        m.eval()
        torch.manual_seed(1234)
        correct, lengths, batch = [], [], 50
        cfg = transformers.GenerationConfig(
            max_new_tokens=args.max_tokens,
            do_sample=True,
            temperature=1.0,
            top_p=0.7,
            top_k=0,
            num_return_sequences=args.eval_k,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        start = time.perf_counter()
        for i in range(0, len(val_rows), batch):
            rows = val_rows[i : i + batch]
            texts = [
                tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = m.generate(**enc, generation_config=cfg)
            new = out[:, enc["input_ids"].shape[1] :]
            for j, ids in enumerate(new):
                row = rows[j // args.eval_k]
                ids = ids[ids != tokenizer.pad_token_id]
                lengths.append(int(ids.numel()))
                text = tokenizer.decode(ids, skip_special_tokens=True)
                correct.append(score_math(text, row["reward_model"]["ground_truth"]).correct)
        return {
            "avg_at_k": sum(correct) / len(correct),
            "k": args.eval_k,
            "problems": len(val_rows),
            "response_length_mean": sum(lengths) / len(lengths),
            "seconds": round(time.perf_counter() - start, 2),
        }

    eval_before = evaluate(model) if args.eval else None

    # ---------------------------------------------------------------- the trainer
    per_step = args.prompts * args.group_size
    if per_step % args.mini_batches:
        raise SystemExit("prompts x group size must divide into the mini-batches")
    mini = per_step // args.mini_batches
    opt_steps = args.steps * args.mini_batches
    config = GRPOConfig(
        output_dir=args.output_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        # batch: one generation batch of `per_step` samples per RL step, `mini_batches` optimizer steps on it
        num_generations=args.group_size,
        per_device_train_batch_size=mini,
        gradient_accumulation_steps=1,
        steps_per_generation=args.mini_batches,
        num_iterations=1,
        max_steps=opt_steps,
        # sampling (HF generate; no vLLM)
        use_vllm=False,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        # loss: DAPO
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        delta=10.0,
        beta=0.0,
        scale_rewards="group",
        mask_truncated_completions=False,
        # optimizer
        learning_rate=args.lr,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.1,
        max_grad_norm=1.0,
        warmup_steps=0,
        lr_scheduler_type="cosine_with_min_lr" if args.lr_schedule == "cosine" else "constant",
        lr_scheduler_kwargs={"min_lr_rate": 0.1} if args.lr_schedule == "cosine" else None,
        # no overheads that ours does not have
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=args.mini_batches,
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )

    class Timed(GRPOTrainer):
        """Times each rollout phase (generate + score + π_old log-probs) and HF generate alone."""

        rollout_s: list[float] = []
        generate_s: list[float] = []

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self.rollout_s.append(time.perf_counter() - t)
            return out

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.generate_s.append(time.perf_counter() - t)
            return out

    class StepClock(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.ends: list[float] = []
            self.last_log: dict = {}

        def on_step_begin(self, a, state, control, **kw):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **kw):
            self.last_log = dict(logs or {})

        def on_step_end(self, a, state, control, **kw):
            if state.global_step % args.mini_batches:
                return
            now = time.perf_counter()
            prev = self.ends[-1] if self.ends else self.t0
            self.ends.append(now)
            k = len(self.ends)
            gen = Timed.generate_s[-1] if Timed.generate_s else float("nan")
            roll = Timed.rollout_s[-1] if Timed.rollout_s else float("nan")
            acc = stats["correct_frac"][-1] if stats["correct_frac"] else float("nan")
            mixed = stats["mixed_frac"][-1] if stats["mixed_frac"] else float("nan")
            print(
                f"step {k}/{args.steps}: {now - prev:.2f} s (generate {gen:.2f} s, rollout {roll:.2f} s), "
                f"acc {acc:.3f}, mixed groups {mixed:.3f}",
                flush=True,
            )

    clock = StepClock()
    trainer = Timed(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    durations = [b - a for a, b in zip([clock.t0, *clock.ends[:-1]], clock.ends)]
    timed = durations[args.warmup :] or durations
    med = statistics.median(timed)
    med_gen = statistics.median(Timed.generate_s[args.warmup :] or Timed.generate_s)
    med_roll = statistics.median(Timed.rollout_s[args.warmup :] or Timed.rollout_s)
    mixed = stats["mixed_frac"][args.warmup :] or stats["mixed_frac"]
    mixed_mean = sum(mixed) / len(mixed)

    eval_after = evaluate(trainer.model) if args.eval else None
    summary = {
        "bench": "trl_grpo",
        "steps": len(durations),
        "warmup_steps_excluded": min(args.warmup, len(durations) - len(timed)),
        "samples_per_step": per_step,
        "optimizer_steps_per_step": args.mini_batches,
        "optimizer_steps": trainer.state.global_step,
        "generation_batches": len(Timed.generate_s),
        "seconds_per_step_median": round(med, 4),
        "seconds_per_step_mean": round(sum(timed) / len(timed), 4),
        "trained_samples_per_s": round(per_step / med, 2),
        "generated_samples_per_s": round(per_step / med, 2),
        "generate_only_samples_per_s": round(per_step / med_gen, 2),
        "generate_s_median": round(med_gen, 4),
        "rollout_s_median": round(med_roll, 4),
        "update_s_median": round(med - med_roll, 4),
        "mixed_group_frac_mean": round(mixed_mean, 4),
        "informative_samples_per_s": round(per_step * mixed_mean / med, 2),
        "train_wall_s": round(wall, 2),
        "threads": torch.get_num_threads(),
        "overlong_shaping": not args.no_overlong,
        "lr_schedule": args.lr_schedule,
        "eval_before": eval_before,
        "eval_after": eval_after,
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "python": sys.version.split()[0],
        },
        "model": str(Path(args.model).resolve()),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
