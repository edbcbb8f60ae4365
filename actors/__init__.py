"""The ground floor every Ray-hosting group of the project shares: where an actor runs (`location`), a task on a
given node (`on_node`), and one call
to a group of actors that replaces the ones it loses (`supervise`).

No project package is imported here, so rollout/, reward/, advantage/ and learner/ can all depend on it.
"""

from actors.location import location, on_node
from actors.supervise import Loss, supervise

__all__ = ["Loss", "location", "on_node", "supervise"]
