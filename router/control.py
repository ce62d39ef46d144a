"""What the router needs from a control plane (the Ray controller implements it; a static router has none)."""

from __future__ import annotations

from typing import Protocol


class ControlPlaneUnavailable(Exception):
    """The control plane cannot answer (its process died, or its call failed on the way): a 503, not a 500."""


class ControlPlane(Protocol):
    async def status(self) -> dict:
        """Pools (desired, bounds), workers (id, role, node, address, state, load), planner decisions; raises
        ControlPlaneUnavailable when it cannot answer (as scale and drain do)."""

    async def scale(self, role: str, replicas: int) -> dict:
        """Set a pool's size; raises ValueError outside its bounds."""

    async def drain(self, worker_id: str) -> dict:
        """The worker takes no new work, finishes what it has, then exits; raises ValueError if unknown."""
