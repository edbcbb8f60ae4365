"""What the component processes share to keep a run's console readable: transformers' progress bars off around a
call whose bar, forwarded out of a Ray actor, would be an empty line and two bars between the lines a reader needs
(rank 0's checkpoint read, the tiny model's save)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def without_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for the block (its documented switch, `transformers.utils.logging.
    disable_progress_bar`), back as they were after it."""
    from transformers.utils import logging as hf_logging  # heavy: transformers, only where a model is read or saved

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def add_filter_once(logger_name: str, filter_type: type[logging.Filter], make: Callable[[], logging.Filter]) -> None:
    """Add `make()` to the logger `logger_name` unless it already has a filter of `filter_type` (once per
    process; `make` is only called when the filter is added)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, filter_type) for f in logger.filters):
        logger.addFilter(make())
