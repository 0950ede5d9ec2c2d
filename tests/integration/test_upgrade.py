"""Upgrades keep checkpoints usable: a checkpoint taken by this machine's QEMU (7.2 on Debian 12)
is reverted to by each newer QEMU of the version matrix (10.0, 11.1: Debian chroots made by
``scripts/qemu-chroot``), and the guest's counter goes on from the snapshot.

The VM is started with ``-machine q35``, an alias that means ``pc-q35-7.2`` on 7.2 and
``pc-q35-11.1`` on 11.1: qemusnap records the resolved type with the checkpoint and pins it
when it restarts QEMU from the recorded command line, or the memory state would not load.

Needs the chroots (built by ``scripts/qemu-chroot`` into ``.cache/qemu/VERSION``); without any
it is skipped, unless ``QEMUSNAP_UPGRADE_VERSIONS`` names the versions that must be checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import attrs
import pytest
from conftest import ROOT
from foreignvm import ForeignVM, cli, cli_json
from guest import Serial, guest_config
from livevm import make_disks
from test_memory import guest_sh

pytestmark = [pytest.mark.qemu_system, pytest.mark.guest]

CHROOT_TOOL = ROOT / "scripts" / "qemu-chroot"


def newer_versions() -> list[str]:
    wanted = os.environ.get("QEMUSNAP_UPGRADE_VERSIONS")
    if os.environ.get("QEMUSNAP_CHROOT_VERSION"):
        pytest.skip("inside a version-matrix chroot: the upgrade check runs from the host")
    versions = (wanted or "10.0 11.1").split()
    built = [
        v
        for v in versions
        if CHROOT_TOOL.exists()
        and (ROOT / ".cache" / "qemu" / v / "root" / "usr" / "bin" / "qemu-system-x86_64").exists()
    ]
    if wanted and built != versions:
        pytest.fail(f"QEMUSNAP_UPGRADE_VERSIONS={wanted}: chroots built only for {built}")
    if not built:
        pytest.skip("no newer QEMU to upgrade to (build one: scripts/qemu-chroot build 11.1)")
    return built


def host_qemu() -> str:
    out = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"version (\d+\.\d+\.\d+)", out)
    assert found, out
    return found.group(1)


@pytest.mark.asyncio
async def test_checkpoint_restores_after_qemu_upgrade() -> None:
    versions = newer_versions()
    made_on = host_qemu()
    versions = [v for v in versions if not made_on.startswith(v + ".")]
    # Under the repository's .cache: the chroots see it at the same path (not /tmp).
    directory = Path(tempfile.mkdtemp(prefix="qs-up-", dir=ROOT / ".cache"))
    try:
        await run(directory, made_on, versions)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def run(directory: Path, made_on: str, versions: list[str]) -> None:
    disks = make_disks(directory, ["vda"])
    config = attrs.evolve(guest_config(directory, disks), qmp_socket=str(directory / "qmp.sock"))
    assert config.machine_type == "q35"  # the alias: the point of this test
    state = directory / "state"
    memory = directory / "c1.mem"
    serial = Serial(directory / "serial.log")
    with ForeignVM(config, directory / "qemu.log") as vm:
        await serial.wait_for(b"qemusnap-guest ready")
        await serial.wait_counter_at_least(2)
        await guest_sh(directory, "echo before > /mnt/vda/f; sync")
        before = serial.last_counter()
        cli("--qmp", vm.qmp, "create", "c1", "--memory-file", memory, state=state)
        after = serial.last_counter()
        info = cli_json("--qmp", vm.qmp, "info", "c1", state=state)
        await guest_sh(directory, "echo after > /mnt/vda/f; sync")
    major_minor = ".".join(made_on.split(".")[:2])
    assert info["machine_type"] == f"pc-q35-{major_minor}", info
    assert info["memory_format"] in ("stream", "mapped-ram"), info
    for version in versions:
        done = subprocess.run(
            [CHROOT_TOOL, "run", version, "--", "python", "tests/upgrade_check.py", directory],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, f"QEMU {version}:\n{done.stdout}\n{done.stderr}"
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"made on QEMU {made_on}, restored: {result}")
        assert result["qemu"].startswith(version + "."), result
        # Restored on the pinned type, not on the newer QEMU's "q35".
        assert result["machine"] == f"pc-q35-{major_minor}-machine", result
        assert result["state"] == "running", result
        assert before <= result["resumed"] <= after + 1, (before, after, result)
        assert result["file"] == "before\n", result
