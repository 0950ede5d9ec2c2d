"""The golden state of the example: the booted test guest, plus what ``qemusnap_prepare`` adds.

The VM itself is described in pytest.ini (the ``qemusnap_*`` options); the qemusnap pytest
plugin boots it once, takes the golden snapshot after ``qemusnap_prepare`` and resets the guest
to it before every test that requests ``qemusnap_fresh``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qemusnap.harness import SyncVM

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("QEMUSNAP_GUEST_DIR", str(REPO / ".cache" / "test-guest"))


@pytest.fixture(scope="session")
def qemusnap_prepare(qemusnap_vm: SyncVM) -> None:
    """Runs once, before the golden snapshot: what it does, every test starts from."""
    done = qemusnap_vm.shell(
        "echo configured > /tmp/app.conf && mkdir -p /mnt/vda/data && echo 1 > /mnt/vda/data/v"
    )
    assert done.exitcode == 0, done.stderr
