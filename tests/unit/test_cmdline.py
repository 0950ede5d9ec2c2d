"""The argv rewrite of a restart, one test per command-line style (qemusnap.cmdline).

Every rewritten image is a qcow2 overlay: whatever format the original option gave, the new one
must open it as qcow2, and keep every option that faces the guest or the host.
"""

from __future__ import annotations

import json

import pytest

from qemusnap.cmdline import (
    image_paths,
    join_opts,
    opts_dict,
    replace_images,
    split_opts,
    throwaway_overlays,
)
from qemusnap.errors import UnsupportedError

NEW = {"/vm/a.img": "/vm/a.e1.qcow2", "/vm/VARS.fd": "/vm/VARS.e1.qcow2"}


def rewrite(*args: str) -> list[str]:
    return replace_images(["qemu", *args], NEW, "/vm")[1:]


def test_option_syntax_escapes_commas() -> None:
    assert split_opts("file=/a,,b.img,if=none") == ["file=/a,b.img", "if=none"]
    assert join_opts(["file=/a,b.img", "if=none"]) == "file=/a,,b.img,if=none"
    assert opts_dict("socket,id=x,,y,fd=3") == {"": "socket", "id": "x,y", "fd": "3"}


def test_drive_format_raw_becomes_qcow2() -> None:
    """Yocto's runqemu: the guest must read the overlay through qcow2, not its raw bytes."""
    assert rewrite("-drive", "file=a.img,if=virtio,format=raw") == [
        "-drive",
        "file=/vm/a.e1.qcow2,if=virtio,format=qcow2",
    ]


def test_drive_keeps_device_facing_options() -> None:
    opts = "if=none,id=drive0,file=/vm/a.img,format=raw,cache=writeback,aio=threads,"
    opts += "discard=unmap,detect-zeroes=unmap,serial=XYZ,file.locking=off"
    out = opts_dict(rewrite("-drive", opts)[1])
    assert out == {
        "if": "none",
        "id": "drive0",
        "file": "/vm/a.e1.qcow2",
        "format": "qcow2",
        "cache": "writeback",
        "aio": "threads",
        "discard": "unmap",
        "detect-zeroes": "unmap",
        "serial": "XYZ",
        "file.locking": "off",
    }


def test_drive_without_format_gets_one() -> None:
    """QEMU would probe; qemusnap says what it made."""
    assert rewrite("-drive", "file=a.img,if=virtio") == [
        "-drive",
        "file=/vm/a.e1.qcow2,if=virtio,format=qcow2",
    ]


def test_drive_nested_file_options() -> None:
    out = rewrite("-drive", "driver=raw,file.driver=file,file.filename=/vm/a.img,if=virtio")
    assert out == ["-drive", "driver=qcow2,file.driver=file,file.filename=/vm/a.e1.qcow2,if=virtio"]


def test_drive_path_with_comma() -> None:
    out = replace_images(
        ["q", "-drive", "file=/vm/x,,y.img,format=raw"], {"/vm/x,y.img": "/n,m"}, "/"
    )
    assert out[2] == "file=/n,,m,format=qcow2"


def test_pflash_drives() -> None:
    """UEFI: the read-only code stays as it is; the writable NVRAM is opened as qcow2."""
    out = rewrite(
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive",
        "if=pflash,format=raw,unit=1,file=VARS.fd",
    )
    assert out == [
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
        "-drive",
        "if=pflash,format=qcow2,unit=1,file=/vm/VARS.e1.qcow2",
    ]


def test_blockdev_dotted_raw() -> None:
    out = rewrite(
        "-blockdev",
        "driver=raw,node-name=disk0,discard=unmap,file.driver=file,file.filename=a.img,"
        "file.aio=threads,file.locking=off",
    )
    assert out == [
        "-blockdev",
        "driver=qcow2,node-name=disk0,discard=unmap,file.driver=file,"
        "file.filename=/vm/a.e1.qcow2,file.aio=threads,file.locking=off",
    ]


def test_blockdev_json_raw() -> None:
    node = {
        "driver": "raw",
        "node-name": "disk0",
        "read-only": False,
        "cache": {"direct": False, "no-flush": False},
        "file": {"driver": "file", "filename": "/vm/a.img", "locking": "off"},
    }
    (option, arg) = rewrite("-blockdev", json.dumps(node))
    assert option == "-blockdev"
    assert json.loads(arg) == {
        **node,
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/vm/a.e1.qcow2", "locking": "off"},
    }


def test_blockdev_protocol_node_referenced_by_name() -> None:
    """libvirt style: the protocol node is a -blockdev of its own, the format node names it."""
    out = rewrite(
        "-blockdev",
        '{"driver":"file","filename":"/vm/a.img","node-name":"proto0","discard":"unmap"}',
        "-blockdev",
        '{"node-name":"fmt0","read-only":false,"driver":"raw","file":"proto0"}',
        "-blockdev",
        "driver=raw,node-name=other,file=unrelated",
    )
    assert json.loads(out[1])["filename"] == "/vm/a.e1.qcow2"
    assert json.loads(out[3]) == {
        "node-name": "fmt0",
        "read-only": False,
        "driver": "qcow2",
        "file": "proto0",
    }
    assert out[5] == "driver=raw,node-name=other,file=unrelated"


def test_blockdev_bare_protocol_node_gets_a_format_node() -> None:
    """A device (or -machine pflash1=) attached to a file node reads the file's bytes: the
    node becomes a qcow2 node of the same name over the new file."""
    out = rewrite(
        "-blockdev",
        "node-name=pflash1,driver=file,filename=VARS.fd,read-only=off",
        "-machine",
        "q35,pflash1=pflash1",
    )
    assert out == [
        "-blockdev",
        "driver=qcow2,node-name=pflash1,read-only=off,file.driver=file,"
        "file.filename=/vm/VARS.e1.qcow2,file.read-only=off",
        "-machine",
        "q35,pflash1=pflash1",
    ]


def test_machine_pflash_with_format_nodes() -> None:
    out = rewrite(
        "-blockdev",
        "node-name=code,driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,read-only=on",
        "-blockdev",
        "node-name=code-fmt,driver=raw,file=code,read-only=on",
        "-blockdev",
        "node-name=vars,driver=file,filename=/vm/VARS.fd",
        "-blockdev",
        "node-name=vars-fmt,driver=raw,file=vars",
        "-machine",
        "q35,pflash0=code-fmt,pflash1=vars-fmt",
    )
    assert (
        out[1] == "node-name=code,driver=file,filename=/usr/share/OVMF/OVMF_CODE_4M.fd,read-only=on"
    )
    assert out[3] == "node-name=code-fmt,driver=raw,file=code,read-only=on"
    assert out[5] == "node-name=vars,driver=file,filename=/vm/VARS.e1.qcow2"
    assert out[7] == "node-name=vars-fmt,driver=qcow2,file=vars"


@pytest.mark.parametrize(
    ("option", "drive"),
    [
        ("-hda", "file=/vm/a.e1.qcow2,index=0,media=disk,format=qcow2"),
        ("-hdb", "file=/vm/a.e1.qcow2,index=1,media=disk,format=qcow2"),
        ("-sd", "file=/vm/a.e1.qcow2,if=sd,format=qcow2"),
        ("-pflash", "file=/vm/a.e1.qcow2,if=pflash,format=qcow2"),
        ("-fda", "file=/vm/a.e1.qcow2,if=floppy,index=0,format=qcow2"),
    ],
)
def test_short_drive_options_become_drives(option: str, drive: str) -> None:
    """-hda & co. cannot carry a format: they become the -drive QEMU makes of them."""
    assert rewrite(option, "a.img", "-cdrom", "seed.iso") == ["-drive", drive, "-cdrom", "seed.iso"]


def test_unchanged_images_keep_their_options() -> None:
    argv = ["q", "-drive", "file=/vm/a.img,format=raw", "-hda", "/vm/a.img"]
    assert replace_images(argv, {"/vm/a.img": "/vm/a.img"}, "/") == argv


def test_raw_window_is_refused() -> None:
    with pytest.raises(UnsupportedError, match="offset/size"):
        rewrite("-drive", "file=a.img,format=raw,offset=1048576")


def test_image_paths() -> None:
    argv = ["q", "-drive", "file=rel.img,format=raw", "-hdb", "/x/b.img", "-blockdev"]
    argv += ['{"driver":"qcow2","file":{"driver":"file","filename":"/x/c"}}', "-m", "128"]
    assert image_paths(argv, "/vm") == ["/vm/rel.img", "/x/b.img", "/x/c"]


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["q", "-snapshot", "-drive", "file=a"], True),
        (["q", "-drive", "file=a,snapshot=on"], True),
        (["q", "-drive", "file=a,snapshot=off"], False),
        (["q", "-loadvm", "snapshot"], False),
    ],
)
def test_throwaway_overlays(argv: list[str], refused: bool) -> None:
    assert throwaway_overlays(argv) is refused
