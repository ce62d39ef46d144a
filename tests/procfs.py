"""What Linux's /proc says of processes: the tests' one reader of it."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def parent_of(pid: int) -> int:
    """``pid``'s parent; OSError once ``pid`` is gone."""
    return int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    """Running, not a zombie left for its parent to reap."""
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cmdlines() -> dict[int, bytes]:
    """Every process's command line, NUL-separated as the kernel keeps it."""
    found = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
    return found


def descendants(pid: int) -> set[int]:
    """``pid``'s children, theirs, and so on."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                parent = parent_of(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
