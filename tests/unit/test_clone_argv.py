"""The command line of a clone: every colliding path moved into its directory, unshareable
network backends refused unless mapped (qemusnap.clone_argv, pure)."""

from __future__ import annotations

import json

import pytest

from qemusnap.clone_argv import clone_argv
from qemusnap.errors import UnsupportedError
from qemusnap.machine import Drive, MachineConfig, restart_argv

DISKS = {"/vm/vda.qcow2": "/c/vda.qcow2"}


def _value(argv: tuple[str, ...] | list[str], option: str, n: int = 0) -> str:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option][n]


def test_foreign_command_line_gets_its_own_sockets_logs_and_disks() -> None:
    argv = [
        "qemu-system-x86_64",
        "-drive",
        "file=vda.qcow2,if=virtio",
        "-qmp",
        "unix:/run/vm/qmp.sock,server=on,wait=off",
        "-monitor",
        "unix:/run/vm/hmp.sock,server=on,wait=off",
        "-chardev",
        "socket,id=qga0,path=/run/vm/qga.sock,server=on,wait=off",
        "-chardev",
        "file,id=con,path=/var/log/vm/console.log",
        "-serial",
        "file:/var/log/vm/serial.log",
        "-pidfile",
        "/run/vm/qemu.pid",
        "-D",
        "/var/log/vm/debug.log",
        "-netdev",
        "user,id=n0",
        "-vnc",
        "none",
    ]
    out = clone_argv(argv, "/vm", directory="/c", disks=DISKS)
    # The clone's overlay is qcow2: the rewrite says so (qemusnap.cmdline), QEMU need not probe.
    assert _value(out.argv, "-drive") == "file=/c/vda.qcow2,if=virtio,format=qcow2"
    assert _value(out.argv, "-qmp") == "unix:/c/qmp.sock,server=on,wait=off"
    assert out.qmp_socket == "/c/qmp.sock"
    assert _value(out.argv, "-monitor") == "unix:/c/monitor.sock,server=on,wait=off"
    assert _value(out.argv, "-chardev", 0) == "socket,id=qga0,path=/c/qga0.sock,server=on,wait=off"
    assert _value(out.argv, "-chardev", 1) == "file,id=con,path=/c/con.log"
    assert _value(out.argv, "-serial") == "file:/c/serial.log"
    assert _value(out.argv, "-pidfile") == "/c/qemu.pid"
    assert _value(out.argv, "-D") == "/c/qemu-debug.log"
    assert _value(out.argv, "-netdev") == "user,id=n0"  # its own slirp: shareable as is
    assert _value(out.argv, "-vnc") == "none"
    # Nothing of the source's is named any more, and the clone's files are all listed.
    assert not any("/run/vm" in a or "/var/log/vm" in a for a in out.argv)
    assert set(out.files) >= {"/c/qmp.sock", "/c/qga0.sock", "/c/con.log", "/c/qemu.pid"}
    assert len(out.files) == len(set(out.files))


def test_machine_launched_command_line_gets_a_qmp_socket() -> None:
    config = MachineConfig(
        drives=(Drive("/vm/vda.qcow2", "vda"),),
        accel="tcg",
        serial_log="/run/x/serial.log",
        qga_socket="/run/x/qga.sock",
    )
    out = clone_argv(config.argv(), "/", directory="/c", disks=DISKS)
    assert _value(out.argv, "-qmp") == "unix:/c/qmp.sock,server=on,wait=off"
    assert json.loads(_value(out.argv, "-blockdev"))["file"]["filename"] == "/c/vda.qcow2"
    assert "path=/c/qs-serial.log" in _value(out.argv, "-chardev", 0)
    assert "path=/c/qs-qga0.sock" in _value(out.argv, "-chardev", 1)
    started = restart_argv(out.argv, incoming=True)
    assert started[-3:] == ["-S", "-incoming", "defer"]


def test_a_chardev_called_qmp_does_not_take_the_qmp_socket() -> None:
    argv = ["qemu", "-chardev", "socket,id=qmp,path=/r/x.sock,server=on,wait=off",
            "-mon", "chardev=qmp,mode=control"]  # fmt: skip
    out = clone_argv(argv, "/", directory="/c", disks={})
    assert "path=/c/qmp-2.sock" in _value(out.argv, "-chardev")
    assert out.qmp_socket == "/c/qmp.sock"
    assert _value(out.argv, "-qmp") == "unix:/c/qmp.sock,server=on,wait=off"


@pytest.mark.parametrize(
    ("option", "value", "key", "why"),
    [
        ("-netdev", "tap,id=t0,ifname=tap0,script=no", "t0", "tap backend"),
        ("-netdev", "bridge,id=b0,br=br0", "b0", "bridge backend"),
        ("-netdev", "socket,id=s0,listen=:1234", "s0", "socket backend"),
        ("-netdev", "user,id=u0,hostfwd=tcp::2222-:22", "u0", "hostfwd=tcp::2222-:22"),
        ("-netdev", "user,id=u0,hostfwd=tcp:127.0.0.1:2222-:22", "u0", "fixed host port"),
        ("-nic", "tap,ifname=tap0", "nic0", "tap backend"),
        ("-net", "tap,ifname=tap0", "net0", "tap backend"),
    ],
)
def test_unshareable_network_is_refused_in_one_line_naming_it(
    option: str, value: str, key: str, why: str
) -> None:
    argv = ["qemu", option, value]
    with pytest.raises(UnsupportedError) as info:
        clone_argv(argv, "/", directory="/c", disks={})
    message = str(info.value)
    assert "\n" not in message and why in message and f"--net {key}=" in message


def test_unshareable_network_is_replaced_when_mapped() -> None:
    argv = ["qemu", "-netdev", "user,id=u0,hostfwd=tcp::2222-:22", "-nic", "tap,ifname=t"]
    out = clone_argv(
        argv,
        "/",
        directory="/c",
        disks={},
        netdevs={"u0": "user,id=u0,hostfwd=tcp::2223-:22", "nic0": "user"},
    )
    assert _value(out.argv, "-netdev") == "user,id=u0,hostfwd=tcp::2223-:22"
    assert _value(out.argv, "-nic") == "user"


def test_shareable_network_as_is() -> None:
    argv = ["qemu", "-netdev", "user,id=u0,hostfwd=tcp::0-:22", "-nic", "user,model=virtio"]
    out = clone_argv(argv, "/", directory="/c", disks={})
    assert out.argv[1:5] == ("-netdev", "user,id=u0,hostfwd=tcp::0-:22", "-nic",
                             "user,model=virtio")  # fmt: skip


def test_a_mapping_for_no_backend_is_an_error() -> None:
    with pytest.raises(UnsupportedError, match="--net n9"):
        clone_argv(["qemu", "-netdev", "user,id=u0"], "/", directory="/c", disks={},
                   netdevs={"n9": "user"})  # fmt: skip


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"),
        ("-chardev", "socket,id=c,host=127.0.0.1,port=5555,server=on"),
        ("-vnc", ":1"),
        ("-spice", "port=5900"),
    ],
)
def test_fixed_tcp_listeners_are_refused(option: str, value: str) -> None:
    with pytest.raises(UnsupportedError, match="clone cannot"):
        clone_argv(["qemu", option, value], "/", directory="/c", disks={})


def test_an_image_that_is_no_disk_of_the_snapshot_is_refused() -> None:
    argv = ["qemu", "-drive", "file=/vm/vda.qcow2", "-drive", "file=/vm/scratch.raw"]
    with pytest.raises(UnsupportedError, match=r"/vm/scratch\.raw"):
        clone_argv(argv, "/", directory="/c", disks=DISKS)
