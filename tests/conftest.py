"""Shared fixtures and the marker rules.

A test marked ``qemu_img``/``qemu_system``/``guest`` needs that binary (or the test guest).
Outside CI a missing one is a skip with a reason; with ``QEMUSNAP_REQUIRE_ALL`` set (CI sets
it through scripts/test) it is a failure: in CI every test runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from crashrig import Rig

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(os.environ.get("QEMUSNAP_GUEST_DIR", ROOT / ".cache" / "test-guest"))

_NEEDS = {
    "qemu_img": lambda: all(shutil.which(b) for b in ("qemu-img", "qemu-io")),
    "qemu_system": lambda: shutil.which("qemu-system-x86_64") is not None,
    "guest": lambda: (GUEST_DIR / "vmlinuz").exists() and (GUEST_DIR / "initrd.img").exists(),
}
_WHY = {
    "qemu_img": "qemu-img/qemu-io not installed (apt-get install qemu-utils)",
    "qemu_system": "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)",
    "guest": "test guest not built (scripts/build-test-guest)",
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, available in _NEEDS.items():
        if item.get_closest_marker(marker) and not available():
            if os.environ.get("QEMUSNAP_REQUIRE_ALL"):
                pytest.fail(f"required in CI: {_WHY[marker]}")
            pytest.skip(_WHY[marker])


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory under /tmp: UNIX socket paths must stay below 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rig(short_tmp: Path) -> Iterator[Rig]:
    """The crash tests' VM of two disks (tests/crashrig.py), its QEMUs killed at the end."""
    from crashrig import Rig

    rig = Rig(short_tmp)
    try:
        yield rig
    finally:
        rig.close()
