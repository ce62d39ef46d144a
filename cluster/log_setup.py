"""How every splitserve process logs: the CLI's commands, and, under `splitserve up`, the controller and the worker
actors in Ray's processes, whose lines Ray forwards to up's output (prefixed with the actor's name and pid). Without
the latter, Python's default in those processes kept WARNING and above: the controller's record of workers started,
registered, restarted and retired, and the planner's decisions, reached no one, whatever --log-level said."""

from __future__ import annotations

import logging
import os

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVEL_ENV = "SPLITSERVE_LOG_LEVEL"  # the driver's level, as Ray's processes read it


def configure(level: str | int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)


def configure_from_env() -> None:
    """Ray's worker_process_setup_hook: a Ray process of this job logs at its driver's level."""
    configure(os.environ.get(LEVEL_ENV, "WARNING"))


def ray_runtime_env() -> dict:
    """The runtime environment of up's Ray job: its actors' processes log as the driver does now."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return {"worker_process_setup_hook": f"{__name__}.configure_from_env", "env_vars": {LEVEL_ENV: level}}
