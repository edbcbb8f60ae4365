"""Resolve a reward function from its dotted path ("package.module:function"), once, at build time."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

DEFAULT_REWARD_FN = "reward.math:score_math"

RewardFn = Callable[..., Any]
"""(response: str, ground_truth: str, extra: dict, **kwargs) -> RewardResult | float | bool"""


def load_reward_fn(dotted_path: str) -> RewardFn:
    """Import and return the callable named by `dotted_path`.

    The form is "package.module:function" (the attribute part may be dotted, e.g. "mod:Class.method");
    "package.module.function" without a colon is accepted too. Every failure raises ValueError naming the
    path.
    """
    if not isinstance(dotted_path, str) or not dotted_path.strip():
        raise ValueError(
            f"reward fn path must be a non-empty string like 'package.module:function', got {dotted_path!r}"
        )
    path = dotted_path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"reward fn path {dotted_path!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise ValueError(
            f"reward fn path {dotted_path!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})"
        ) from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"reward fn path {dotted_path!r}: module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward fn path {dotted_path!r} names a {type(obj).__name__}, not a function")
    return obj
