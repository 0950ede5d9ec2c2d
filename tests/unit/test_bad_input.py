"""Bad input without QEMU (issue 6, item 7; SPEC section 3 and safety rule 8): usage errors and
QMP sockets that are not QEMU, through the command line's ``main()`` in this process; names that
would escape the directories qemusnap writes into.

Every case must exit 1 or 2 (2: bad usage or input) with exactly one line on stderr, no
traceback, and change nothing on disk (the state directory may appear, with no snapshot).
The cases that need images or a running QEMU are in tests/integration/test_bad_input_cli.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import string
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from foreignvm import assert_one_line, tree_digest

from qemusnap import cli
from qemusnap.errors import InvalidNameError, UsageError
from qemusnap.plan import overlay_path
from qemusnap.store import Store
from qemusnap.tree import MAX_NAME_LENGTH, validate_name


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


# --- usage errors (argparse) ---------------------------------------------------------------------

USAGE = [
    pytest.param(["revert", "x", "--running", "--paused"], "--paused", id="running-and-paused"),
    pytest.param(
        ["delete", "x", "--children", "--children-only"], "--children-only", id="children-both"
    ),
    pytest.param(["check", "--repair", "bogus"], "bogus", id="repair-bogus"),
    pytest.param(["create", "x", "--internal", "--external"], "--external", id="int-and-ext"),
    pytest.param(["list", "--roots", "--leaves"], "--leaves", id="roots-and-leaves"),
    pytest.param(["create"], "name", id="create-without-name"),
    pytest.param(["frobnicate"], "frobnicate", id="unknown-command"),
    pytest.param(["list", "--bogus"], "--bogus", id="unknown-option"),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A directory with one image-like file; the test asserts nothing in it changed."""
    (tmp_path / "vda.qcow2").write_bytes(b"QFI\xfb" + bytes(508))
    before = tree_digest(tmp_path, skip=[tmp_path / "state"])
    yield tmp_path
    assert tree_digest(tmp_path, skip=[tmp_path / "state"]) == before
    if (tmp_path / "state" / "qemusnap.db").exists():
        with Store(tmp_path / "state") as store:
            assert all(store.snapshots(v.id) == [] for v in store.vms())


@pytest.mark.parametrize(("argv", "named"), USAGE)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], named: str, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(["--state", str(workdir / "state"), *argv], capsys)
    assert code == 2, err
    assert_one_line(err)
    assert named in err, err


# --- a --qmp socket that is not QEMU ------------------------------------------------------------


class Server:
    """A UNIX socket server (a thread) that plays ``behave(conn)`` to each client."""

    def __init__(self, path: Path, behave: Callable[[socket.socket], None]) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._behave = behave
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._behave(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=10)


def _drain(conn: socket.socket) -> None:
    conn.settimeout(10)
    while conn.recv(4096):
        pass


def _garbage(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
    _drain(conn)


def _json_not_qmp(conn: socket.socket) -> None:
    conn.sendall(b'{"hello": "world"}\r\n')
    _drain(conn)


def _hang_up(conn: socket.socket) -> None:
    pass  # accept, say nothing, close


GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}  # fmt: skip


def _refuses_capabilities(conn: socket.socket) -> None:
    conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
    conn.settimeout(10)
    if conn.recv(4096):
        error = {"error": {"class": "GenericError", "desc": "go away"}}
        conn.sendall(json.dumps(error).encode() + b"\r\n")
    _drain(conn)


SERVERS = {
    "garbage": _garbage,
    "json-not-qmp": _json_not_qmp,
    "hangs-up": _hang_up,
    "refuses-capabilities": _refuses_capabilities,
}


@pytest.mark.parametrize("kind", [*SERVERS, "regular-file", "directory", "missing"])
def test_qmp_socket_that_is_not_qemu(
    kind: str, short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = short_tmp / "qmp.sock"
    server = Server(sock, SERVERS[kind]) if kind in SERVERS else None
    if kind == "regular-file":
        sock.write_text("not a socket\n")
    elif kind == "directory":
        sock.mkdir()
    try:
        before = tree_digest(short_tmp, skip=[short_tmp / "state"])
        code, err = run_main(
            ["--state", str(short_tmp / "state"), "--qmp", str(sock), "create", "s1"], capsys
        )
    finally:
        if server is not None:
            server.close()
    assert code in (1, 2), err
    assert_one_line(err)
    assert str(sock) in err, err
    assert tree_digest(short_tmp, skip=[short_tmp / "state"]) == before


# --- names --------------------------------------------------------------------------------------

ESCAPING = ["..", "../x", "../../etc/passwd", "x/../../y", "/abs/x", "/", "./x", ".", "a/b",
            ".hidden", "x\x00y", "\n", "a\rb", "\x1b[31mred"]  # fmt: skip


@pytest.mark.parametrize("name", ESCAPING, ids=repr)
def test_names_that_could_leave_a_directory_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name(name)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    assert "\n" not in str(info.value) and "\r" not in str(info.value)  # a one-line message


def _random_names(count: int) -> Iterator[str]:
    rng = random.Random(6)
    alphabet = string.printable + "äöü€漢字🙂\x7f\x00\x01" + "/." * 8
    for _ in range(count):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    yield "x" * MAX_NAME_LENGTH


def test_every_valid_name_stays_inside_its_directory(tmp_path: Path) -> None:
    """A name that passes validation, used as a file name part (overlay ``disk.NAME.qcow2``,
    memory file ``NAME.mem``), names a file directly in the intended directory."""
    checked = 0
    for name in _random_names(2000):
        try:
            validate_name(name)
        except InvalidNameError:
            continue
        checked += 1
        overlay = overlay_path(str(tmp_path / "vda.qcow2"), str(tmp_path / "vda.qcow2"), name)
        memory = os.path.join(tmp_path, f"{name}.mem")
        for path in (overlay, memory):
            assert os.path.dirname(path) == str(tmp_path), (name, path)
            assert os.path.normpath(path) == path, (name, path)
    assert checked > 500


@pytest.mark.parametrize(
    "name",
    ["é" * MAX_NAME_LENGTH, "🙂" * 100, "x" * MAX_NAME_LENGTH],
    ids=["200-two-byte-chars", "100-emoji", "200-ascii-long-disk-name"],
)
def test_every_valid_name_gives_file_names_the_filesystem_takes(name: str, tmp_path: Path) -> None:
    validate_name(name)
    disk = tmp_path / ("d" * 60 + ".qcow2")  # a plausible, longish disk name
    overlay = overlay_path(str(disk), str(disk), name)
    assert len(os.path.basename(overlay).encode()) <= 255, overlay
    assert os.path.dirname(overlay) == str(tmp_path)
