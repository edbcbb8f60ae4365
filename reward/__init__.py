"""Outcome rewards: answer extraction and verification for math, and process-isolated scoring services.

* `score_math` (reward.math): DAPO's math reward, the default reward fn "reward.math:score_math".
* `RewardResult` (reward.result): the verdict on one sample (correct, score, status, extracted, latency_s).
* `IsolatedScorer` / `ScorerPool` (reward.pool): per-sample hard time limits through a child process, no Ray.
* `RewardService` (reward.group): a Ray actor pool of IsolatedScorers with a batch API.
* `load_reward_fn` (reward.loader): resolve "package.module:function" once, at build time.
* `python -m reward.score IN.jsonl --output OUT.jsonl`: the batch command.
"""

from reward.group import RewardService, RewardWorkerError
from reward.loader import DEFAULT_REWARD_FN, load_reward_fn
from reward.math import score_math, score_math_binary
from reward.pool import IsolatedScorer, ScorerPool
from reward.result import STATUS_ERROR, STATUS_OK, STATUS_TIMEOUT, RewardResult, as_reward_result

__all__ = [
    "DEFAULT_REWARD_FN",
    "STATUS_ERROR",
    "STATUS_OK",
    "STATUS_TIMEOUT",
    "IsolatedScorer",
    "RewardResult",
    "RewardService",
    "RewardWorkerError",
    "ScorerPool",
    "as_reward_result",
    "load_reward_fn",
    "score_math",
    "score_math_binary",
]
