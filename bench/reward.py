"""Benchmark of the reward service: 4096 typical responses through `RewardService` (Ray, 2 workers).

Responses are synthetic but shaped like real ones: a few hundred to a few thousand characters of reasoning
text, ending with "Answer: N", "Answer: $N$" or "\\boxed{N}"; 75% AIME-style integer answers (ground truths
from shared/data/aime-2024.jsonl where available), 25% symbolic answers that need math-verify (radicals,
fractions, pi); half of them correct. One warm-up batch runs first. Per-sample latency is what the scorer
measures for each sample (from the previous result, or from sending the batch, to its result).
Also measured, for comparison: the same batch through the in-process `ScorerPool` (no Ray).

Prints progress, then LAST one JSON line: samples_per_s, p50_s, p99_s, device, workers, num_samples, commit.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from bench.common import device_info, git_commit, print_result

NUM_SAMPLES = 4096
NUM_WORKERS = 2
TIMEOUT_S = 5.0
AIME_PATH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "aime-2024.jsonl"

SENTENCES = [
    "Let us set up the equations carefully.",
    "Substituting the first relation into the second gives a quadratic in $s$.",
    "We compute $\\frac{9}{s} + \\frac{t}{60} = 4$ and simplify.",
    "By the power of a point, $DB^2 = DP \\cdot DA$.",
    "Wait, let me double-check this step, since the sign matters here.",
    "Therefore the two cases give the same count, and we sum over them.",
    "Now we use the identity $\\sin^2 x + \\cos^2 x = 1$ to eliminate $x$.",
    "Hence the remainder modulo $1000$ follows from the Chinese remainder theorem.",
]
# (ground truth, equivalent prediction, wrong prediction): symbolic answers that go through math-verify
SYMBOLIC = [
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", "\\sqrt{2}"),
    ("2\\pi", "\\pi \\cdot 2", "\\pi"),
    ("3\\sqrt{2}", "\\sqrt{18}", "\\sqrt{17}"),
    ("\\frac{7}{3}", "2\\frac{1}{3}", "\\frac{7}{4}"),
    ("x^2+2x+1", "(x+1)^2", "(x-1)^2"),
]


def make_batch(num_samples: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Synthetic responses and ground truths (half correct)."""
    rng = random.Random(seed)
    truths_aime = [json.loads(line)["reward_model"]["ground_truth"] for line in AIME_PATH.read_text().splitlines()]
    responses, ground_truths = [], []
    for i in range(num_samples):
        correct = i % 2 == 0
        if rng.random() < 0.75:
            truth = rng.choice(truths_aime)
            pred = truth if correct else str(int(truth) + rng.randint(1, 50))
        else:
            truth, right, wrong = rng.choice(SYMBOLIC)
            pred = right if correct else wrong
        body = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(5, 45)))
        ending = rng.choice([f"Answer: {pred}", f"Answer: ${pred}$", f"So the answer is $\\boxed{{{pred}}}$."])
        responses.append(f"{body}\n\n{ending}")
        ground_truths.append(truth)
    return responses, ground_truths


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    import ray

    from reward import RewardService, ScorerPool

    responses, truths = make_batch(NUM_SAMPLES)
    chars = [len(r) for r in responses]
    print(f"batch: {NUM_SAMPLES} responses, {min(chars)}-{max(chars)} chars (mean {sum(chars) / len(chars):.0f})")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        service = RewardService(num_workers=NUM_WORKERS, timeout_s=TIMEOUT_S)
        service.score_batch(responses[:64], truths[:64])  # warm-up: actors and children started
        print(f"ray + service ready in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        results = service.score_batch(responses, truths)
        wall = time.perf_counter() - start
        service.shutdown()
    finally:
        ray.shutdown()
    statuses = {s: sum(r.status == s for r in results) for s in ("ok", "timeout", "error")}
    accuracy = sum(r.correct for r in results) / len(results)
    latencies = [r.latency_s for r in results if r.latency_s is not None]
    print(f"RewardService: {wall:.2f} s, statuses {statuses}, accuracy {accuracy:.3f} (expected 0.500)")

    with ScorerPool(NUM_WORKERS, timeout_s=TIMEOUT_S) as pool:
        pool.score_batch(responses[:64], truths[:64])
        start = time.perf_counter()
        pool_results = pool.score_batch(responses, truths)
        pool_wall = time.perf_counter() - start
    assert [r.correct for r in pool_results] == [r.correct for r in results]
    print(f"ScorerPool (in-process, no Ray): {pool_wall:.2f} s")

    print_result(
        {
            "bench": "reward",
            "samples_per_s": round(len(results) / wall, 1),
            "p50_s": round(percentile(latencies, 0.50), 6),
            "p99_s": round(percentile(latencies, 0.99), 6),
            "accuracy": round(accuracy, 4),
            "statuses": statuses,
            "pool_samples_per_s": round(len(results) / pool_wall, 1),
            "device": f"{device_info()['device']} ({os.cpu_count()} cores)",
            "workers": NUM_WORKERS,
            "num_samples": len(results),
            "timeout_s": TIMEOUT_S,
            "commit": git_commit(),
        }
    )


if __name__ == "__main__":
    main()
