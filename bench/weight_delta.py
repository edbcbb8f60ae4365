"""How many of the engine's weights change per optimizer step? (issue 36: measure deltas before building them)

    python -m bench.weight_delta [--shape Qwen--Qwen2.5-0.5B] [--steps 6] [--lr 1e-6 1e-4] [--tokens 256]

A model of the given shape (conf/model/shapes/<shape>.json; random weights, as transformers initialises them),
float32 master weights and AdamW (betas 0.9/0.999, weight decay 0.1: conf/learner/fsdp.yaml), trained `--steps`
steps on random tokens (a language-modelling loss; one sequence of `--tokens` tokens per step) at each learning
rate: 1e-6 is the official recipes' (conf/learner/fsdp.yaml), 1e-4 the demo's (conf/model/tiny.yaml). After every
step the weights are rounded to bfloat16 (what a GPU engine holds) and compared with the previous step's: the
share of the engine's values that changed is what a delta push would send instead of all of them (values, plus an
index each). Also the share that differs from the weights before the first step (a delta against an older
version), and the same in float32 (a CPU engine's dtype here). One JSON line last.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import device_info, git_commit, print_result

SHAPES = Path(__file__).resolve().parents[1] / "conf" / "model" / "shapes"


def build(shape: str, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(SHAPES / f"{shape}.json")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def changed(now: list[torch.Tensor], before: list[torch.Tensor]) -> tuple[int, int]:
    """(values that differ, values) over the parameters."""
    diff = sum(int((a != b).sum()) for a, b in zip(now, before))
    return diff, sum(a.numel() for a in now)


def measure(shape: str, lr: float, steps: int, tokens: int, seed: int) -> dict:
    model = build(shape, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.1, foreach=False)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    first_bf16 = [p.detach().to(torch.bfloat16) for p in params]
    prev_bf16, prev_fp32 = first_bf16, [p.detach().clone() for p in params]
    rows = []
    for step in range(steps):
        ids = torch.randint(0, vocab, (1, tokens), generator=generator)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now_bf16 = [p.detach().to(torch.bfloat16) for p in params]
        step_bf16, total = changed(now_bf16, prev_bf16)
        since_first, _ = changed(now_bf16, first_bf16)
        step_fp32, _ = changed([p.detach() for p in params], prev_fp32)
        rows.append(
            {
                "step": step + 1,
                "bf16_changed_frac": step_bf16 / total,
                "bf16_changed_since_first_frac": since_first / total,
                "fp32_changed_frac": step_fp32 / total,
                "loss": float(loss),
                "seconds": time.perf_counter() - start,
            }
        )
        print(
            f"{shape} lr={lr:g} step {step + 1}: bf16 values changed {100 * step_bf16 / total:.2f}% "
            f"(since the first: {100 * since_first / total:.2f}%), fp32 {100 * step_fp32 / total:.2f}%",
            flush=True,
        )
        prev_bf16, prev_fp32 = now_bf16, [p.detach().clone() for p in params]
    return {"shape": shape, "lr": lr, "parameters": total, "steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="Qwen--Qwen2.5-0.5B", help="a file of conf/model/shapes, without .json")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-6, 1e-4])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = [measure(args.shape, lr, args.steps, args.tokens, args.seed) for lr in args.lr]
    print("\n| lr | step | bf16 changed | bf16 changed since step 0 | fp32 changed |\n|---|---|---|---|---|")
    for result in results:
        for row in result["steps"]:
            print(
                f"| {result['lr']:g} | {row['step']} | {100 * row['bf16_changed_frac']:.2f}% | "
                f"{100 * row['bf16_changed_since_first_frac']:.2f}% | {100 * row['fp32_changed_frac']:.2f}% |"
            )
    print_result(
        {
            "bench": "weight_delta",
            "commit": git_commit(),
            **device_info(),
            "shape": args.shape,
            "tokens": args.tokens,
            "results": results,
        }
    )


if __name__ == "__main__":
    main()
