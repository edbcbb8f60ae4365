"""The ground floor every Ray-hosting group of the project shares: where an actor runs (`location`).

No project package is imported here, so rollout/, reward/, advantage/ and learner/ can all depend on it.
"""

from actors.location import location

__all__ = ["location"]
