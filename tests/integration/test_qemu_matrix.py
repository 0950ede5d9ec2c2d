"""The version matrix runs the QEMU it claims to run (scripts/qemu-chroot, docs/versions-matrix.md).

A matrix run whose PATH reached the machine's QEMU 7.2, or that mixed binaries of two versions,
would pass every test and prove nothing about 10.0 or 11.1. scripts/qemu-chroot sets
QEMUSNAP_CHROOT_VERSION to the label of the chroot (10.0, 10.0-bpo, 11.1, 7.2); outside a chroot
the binaries must still agree with each other.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

pytestmark = [pytest.mark.qemu_img, pytest.mark.qemu_system]


def _version_of(binary: str) -> str:
    """`BINARY --version`'s first line, e.g. "QEMU emulator version 10.0.13 (Debian ...)" ->
    "10.0.13"."""
    out = subprocess.run(
        [binary, "--version"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    match = re.search(r"version (\d+\.\d+\.\d+)", out)
    assert match, f"no version in {binary} --version: {out!r}"
    return match.group(1)


def test_qemu_binaries_are_one_version() -> None:
    versions = {b: _version_of(b) for b in ("qemu-system-x86_64", "qemu-img", "qemu-io")}
    assert len(set(versions.values())) == 1, versions


def test_matrix_runs_the_chroots_qemu() -> None:
    label = os.environ.get("QEMUSNAP_CHROOT_VERSION", "")
    # Outside a chroot the label is empty and there is no claim to check: the machine's QEMU is
    # whatever its distribution ships. In a chroot, "10.0-bpo" claims 10.0.x, "11.1" 11.1.x.
    expected = label.removesuffix("-bpo")
    version = _version_of("qemu-system-x86_64")
    if expected:
        assert version.startswith(expected + "."), (label, version)


def test_qmp_reports_the_binarys_version() -> None:
    """The QEMU the tests launch (qemusnap finds it on PATH like the tests) is that binary: QMP's
    query-version, through a QEMU with no guest, matches `--version`."""
    binary_version = _version_of("qemu-system-x86_64")
    proc = subprocess.run(
        [
            "qemu-system-x86_64",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "none",
            "-accel",
            "tcg",
            "-qmp",
            "stdio",
        ],
        input='{"execute": "qmp_capabilities"}\n{"execute": "query-version"}\n'
        '{"execute": "quit"}\n',
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    replies = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    qemu = next(r["return"]["qemu"] for r in replies if "qemu" in r.get("return", {}))
    assert f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}" == binary_version
