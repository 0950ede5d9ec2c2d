from __future__ import annotations

import json

import pytest

from qemusnap import hostmem
from qemusnap.errors import LaunchError, UnsupportedError
from qemusnap.machine import Drive, Machine, MachineConfig, replace_disk_paths, restart_argv


def test_replace_disk_paths_in_every_syntax() -> None:
    argv = [
        "qemu-system-x86_64",
        "-drive",
        "file=rel.qcow2,if=virtio,format=qcow2",
        "-blockdev",
        "driver=file,filename=/img/a,,b.qcow2,node-name=f1",
        "-blockdev",
        json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": "/img/c.qcow2"}}),
        "-hda",
        "/img/d.qcow2",
        "-qmp",
        "unix:/run/q.sock,server=on,wait=off",
    ]
    replace = {
        "/vm/rel.qcow2": "/vm/new1.qcow2",
        "/img/a,b.qcow2": "/img/new,2.qcow2",
        "/img/c.qcow2": "/img/new3.qcow2",
        "/img/d.qcow2": "/img/new4.qcow2",
    }
    out = replace_disk_paths(argv, replace, "/vm")
    assert out[2] == "file=/vm/new1.qcow2,if=virtio,format=qcow2"
    # A bare protocol node nobody else opens: a device reads it, so it becomes a qcow2 node.
    assert out[4] == "driver=qcow2,node-name=f1,file.driver=file,file.filename=/img/new,,2.qcow2"
    assert json.loads(out[6])["file"]["filename"] == "/img/new3.qcow2"
    assert out[7:9] == ["-drive", "file=/img/new4.qcow2,index=0,media=disk,format=qcow2"]
    assert out[10] == "unix:/run/q.sock,server=on,wait=off"  # sockets stay where they were


def test_restart_argv_controls_start_state() -> None:
    argv = ["qemu", "-S", "-incoming", "tcp:0:4444", "-loadvm", "x", "-m", "256"]
    assert restart_argv(argv, incoming=False) == ["qemu", "-m", "256", "-S"]
    assert restart_argv(argv, incoming=True) == ["qemu", "-m", "256", "-S", "-incoming", "defer"]


def test_machine_argv_has_stable_names() -> None:
    config = MachineConfig(drives=(Drive("/d/a.qcow2", "vda"),), accel="tcg", qmp_socket="/q")
    argv = config.argv(paused=True)
    assert "-S" in argv and "tcg" in argv
    node = json.loads(argv[argv.index("-blockdev") + 1])
    assert node["node-name"] == "vda-fmt" and node["file"]["filename"] == "/d/a.qcow2"
    assert "virtio-blk-pci,drive=vda-fmt,id=vda" in argv


def test_restart_argv_appends_to_console_logs() -> None:
    argv = ["qemu", "-serial", "file:/logs/a,b.log", "-chardev", "file,id=c,path=/l/c.log"]
    argv += ["-chardev", "file,id=d,path=/l/d.log,append=off", "-chardev", "socket,id=e,path=/s"]
    assert restart_argv(argv, incoming=False) == [
        "qemu",
        "-chardev",
        "file,id=qs-restart-serial1,path=/logs/a,,b.log,append=on",
        "-serial",
        "chardev:qs-restart-serial1",
        "-chardev",
        "file,id=c,path=/l/c.log,append=on",
        "-chardev",
        "file,id=d,path=/l/d.log,append=off",  # what the user chose explicitly stays
        "-chardev",
        "socket,id=e,path=/s",
        "-S",
    ]


def test_huge_page_guest_ram() -> None:
    argv = MachineConfig(memory_mib=512, accel="tcg", hugepages=True).argv()
    assert argv[argv.index("-machine") + 1] == "q35,memory-backend=qs-ram"
    backend = argv[argv.index("-object") + 1]
    assert backend.startswith("memory-backend-memfd,id=qs-ram,size=512M,hugetlb=on,")
    assert "prealloc=on" in backend  # allocated at start: a shortage fails the launch, not later
    assert "-object" not in MachineConfig(memory_mib=512).argv()
    with pytest.raises(UnsupportedError, match="multiple of 2 MiB"):
        MachineConfig(memory_mib=255, hugepages=True)


@pytest.mark.asyncio
async def test_huge_page_shortage_is_refused_before_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hostmem, "free_huge_pages", lambda: 3)
    machine = Machine(MachineConfig(memory_mib=512, hugepages=True, binary="/nonexistent"))
    with pytest.raises(LaunchError, match="needs 256 free 2 MiB huge pages, 3 are free"):
        await machine.launch()


def test_restart_argv_drops_monitors_on_inherited_fds() -> None:
    argv = [
        "qemu",
        "-chardev",
        "socket,id=qs-qmp,fd=7",
        "-mon",
        "chardev=qs-qmp,mode=control",
        "-qmp",
        "unix:/q.sock,server=on,wait=off",
        "-chardev",
        "socket,id=c1,path=/x",
    ]
    assert restart_argv(argv, incoming=False) == [
        "qemu",
        "-qmp",
        "unix:/q.sock,server=on,wait=off",
        "-chardev",
        "socket,id=c1,path=/x",
        "-S",
    ]
