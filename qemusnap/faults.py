"""Crash points: a test-only way to kill qemusnap dead (SIGKILL) at a named step.

Each multi-step operation calls :func:`crashpoint` right after each irreversible step.  With
``QEMUSNAP_CRASH_AT`` set to one of :data:`CRASH_POINTS`, the process dies there, as if the
machine had lost power or the user had sent ``kill -9``: the reliability tests then check that
the next command (or ``qemusnap recover``) repairs everything.  Unset, it costs a dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "QEMUSNAP_CRASH_AT"

#: Every crash point, by operation, in the order they are passed.
CRASH_POINTS: dict[str, tuple[str, ...]] = {
    "create-internal": ("journaled", "taken"),
    "create-external": (
        "journaled",
        "overlays-made",
        "nodes-added",
        "paused",
        "cut",
        "memory-written",
    ),
    "revert": ("journaled", "overlays-made", "stopped", "spawned", "started", "loaded"),
    "delete-internal": ("journaled", "tags-deleted"),
    "delete-external": ("journaled", "step-done"),
    "save": ("journaled", "written", "stopped"),
    "restore": ("journaled", "spawned", "started"),
    "rebuild": ("journaled", "scanned", "half-recorded", "committed"),
}


def crashpoint(operation: str, step: str) -> None:
    """Die here (SIGKILL) if ``$QEMUSNAP_CRASH_AT`` is ``operation:step``."""
    if os.environ.get(ENV) == f"{operation}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
