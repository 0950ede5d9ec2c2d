"""Launching raw ``qemu-system-x86_64``: for harnesses, and for restarting a VM after a revert.

Two ways a QEMU comes to life here:

* :class:`Machine` launches one from a :class:`MachineConfig`, with QMP over a socketpair (no
  race with the creation of a socket file), its console captured in a log file, disks attached
  with stable node names and device ids, and a shutdown ladder (``quit`` -> wait -> SIGTERM ->
  SIGKILL) on exit.
* :func:`relaunch` starts QEMU again from a recorded command line (``/proc/PID/cmdline`` of the
  QEMU behind a QMP socket) with the disk images swapped, detached from our stdio, and connects
  to its QMP socket path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import cmdline, hostmem
from .capabilities import pin_machine
from .errors import LaunchError, OperationTimeout, UnsupportedError
from .monitor import Monitor

log = logging.getLogger("qemusnap.machine")

DEFAULT_BINARY = "qemu-system-x86_64"


def qemu_binary() -> str:
    return os.environ.get("QEMUSNAP_QEMU", DEFAULT_BINARY)


def choose_accel(requested: str | None = None) -> str:
    """``kvm`` where it really runs guests, ``tcg`` otherwise; ``requested`` or
    ``$QEMUSNAP_ACCEL`` override ("auto" means decide here).

    A nested KVM built on PVM (module ``kvm_pvm``) opens ``/dev/kvm`` and runs firmware, but a
    stock Linux kernel hangs in its decompressor there: treat it as no KVM.
    """
    choice = requested or os.environ.get("QEMUSNAP_ACCEL") or "auto"
    if choice != "auto":
        return choice
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    if Path("/sys/module/kvm_pvm").exists():
        return "tcg"
    if Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists():
        return "kvm"
    return "tcg"


@attrs.frozen
class Drive:
    """A disk for :class:`Machine`: ``id`` becomes the guest device id (and the disk's name)."""

    file: str
    id: str
    format: str = "qcow2"
    device: str = "virtio-blk-pci"

    @property
    def node_name(self) -> str:
        return f"{self.id}-fmt"

    def args(self) -> list[str]:
        # JSON syntax: file names need no comma escaping.
        node = {
            "driver": self.format,
            "node-name": self.node_name,
            "file": {"driver": "file", "filename": str(Path(self.file).absolute())},
        }
        return [
            "-blockdev",
            json.dumps(node, separators=(",", ":")),
            "-device",
            f"{self.device},drive={self.node_name},id={self.id}",
        ]


@attrs.frozen
class MachineConfig:
    """What to launch.  ``argv()`` is pure, so a config can be recorded and relaunched."""

    drives: tuple[Drive, ...] = ()
    memory_mib: int = 256
    cpus: int = 1
    accel: str = "auto"
    machine_type: str = "q35"
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    serial_log: str | None = None  # the guest's serial console goes here (None: discarded)
    qmp_socket: str | None = None  # an extra QMP server socket for other clients (the CLI)
    qga_socket: str | None = None  # qemu-guest-agent channel (virtio-serial), server socket
    extra_args: tuple[str, ...] = ()
    binary: str | None = None
    #: Guest RAM on 2 MiB huge pages (hugetlbfs memfd, allocated at start: ``vm.nr_hugepages``
    #: must leave enough free).  A live checkpoint then pauses the guest for the same time
    #: whatever its RAM size; see :mod:`qemusnap.hostmem` for why.
    hugepages: bool = attrs.field(default=False)

    @hugepages.validator
    def _check_hugepages(self, _attribute: object, value: bool) -> None:
        if value and self.memory_mib % hostmem.HUGE_PAGE_MIB:
            raise UnsupportedError(
                f"memory_mib={self.memory_mib}: huge-page guest RAM must be a multiple of"
                f" {hostmem.HUGE_PAGE_MIB} MiB"
            )

    def with_machine(self, resolved: str) -> MachineConfig:
        """This config with its machine type pinned (see :meth:`RecordedLaunch.with_machine`)."""
        pinned = pin_machine(self.machine_type, resolved)
        return self if pinned is None else attrs.evolve(self, machine_type=pinned)

    def argv(self, *, paused: bool = False, incoming: bool = False) -> list[str]:
        machine = self.machine_type
        if self.hugepages:
            machine += ",memory-backend=qs-ram"
        argv = [
            self.binary or qemu_binary(),
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            machine,
            "-accel",
            choose_accel(self.accel),
            "-m",
            str(self.memory_mib),
            "-smp",
            str(self.cpus),
        ]
        if self.hugepages:
            argv += [
                "-object",
                f"memory-backend-memfd,id=qs-ram,size={self.memory_mib}M,hugetlb=on,"
                f"hugetlbsize={hostmem.HUGE_PAGE_MIB}M,prealloc=on",
            ]
        if self.kernel:
            argv += ["-kernel", self.kernel]
        if self.initrd:
            argv += ["-initrd", self.initrd]
        if self.append:
            argv += ["-append", self.append]
        if self.serial_log:
            # append=on: a restart (revert, restore) must not truncate the console log.
            argv += [
                "-chardev",
                f"file,id=qs-serial,path={self.serial_log},append=on",
                "-serial",
                "chardev:qs-serial",
            ]
        else:
            argv += ["-serial", "null"]
        for drive in self.drives:
            argv += drive.args()
        if self.qga_socket:
            argv += [
                "-device",
                "virtio-serial-pci,id=qs-serial0",
                "-chardev",
                f"socket,id=qs-qga0,path={self.qga_socket},server=on,wait=off",
                "-device",
                "virtserialport,chardev=qs-qga0,name=org.qemu.guest_agent.0",
            ]
        if self.qmp_socket:
            argv += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        argv += list(self.extra_args)
        if paused:
            argv.append("-S")
        if incoming:
            argv += ["-incoming", "defer"]
        return argv


class Machine:
    """A QEMU process launched and owned by qemusnap (an async context manager).

    ::

        async with Machine(MachineConfig(drives=(Drive("disk.qcow2", "vda"),))) as machine:
            status = await machine.monitor.query_status()
    """

    def __init__(
        self,
        config: MachineConfig,
        *,
        paused: bool = False,
        incoming: bool = False,
        log_dir: str | None = None,
        launch_timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.paused = paused
        self.incoming = incoming
        self.launch_timeout = launch_timeout
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="qemusnap-"))
        self.log_file = self.log_dir / "qemu.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._monitor: Monitor | None = None

    @property
    def monitor(self) -> Monitor:
        if self._monitor is None:
            raise LaunchError("the machine is not running")
        return self._monitor

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def argv(self) -> list[str]:
        return self.config.argv(paused=self.paused, incoming=self.incoming)

    def exitcode(self) -> int | None:
        return self._process.poll() if self._process else None

    async def launch(self) -> Machine:
        if self.config.hugepages:
            needed = self.config.memory_mib // hostmem.HUGE_PAGE_MIB
            free = hostmem.free_huge_pages()
            if free < needed:
                self._remove_log_dir()
                raise LaunchError(
                    f"guest RAM on huge pages needs {needed} free {hostmem.HUGE_PAGE_MIB} MiB"
                    f" huge pages, {free} are free (raise vm.nr_hugepages)"
                )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            *self.argv,
            "-chardev",
            f"socket,id=qs-qmp,fd={theirs.fileno()}",
            "-mon",
            "chardev=qs-qmp,mode=control",
        ]
        log.debug("launching %s", shlex.join(argv))
        try:
            self._process = spawn(argv, log_file=self.log_file, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        try:
            self._monitor = await Monitor.connect(
                ours, timeout=self.launch_timeout, name=f"qemu-{self._process.pid}"
            )
        except BaseException as exc:
            ours.close()
            await self._kill()
            message = self._launch_failure(argv, exc)
            self._remove_log_dir()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise LaunchError(message) from exc
        return self

    def _remove_log_dir(self) -> None:
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _launch_failure(self, argv: Sequence[str], exc: BaseException) -> str:
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-1]
        code = self.exitcode()
        why = f"exited with status {code}" if code is not None else f"did not answer QMP ({exc})"
        return f"QEMU {why}: {tail or 'no output'} (command: {shlex.join(argv)})"

    async def shutdown(self, *, timeout: float = 10.0) -> None:
        """``quit`` over QMP, wait; then SIGTERM, wait; then SIGKILL."""
        if self._process is None:
            return
        if self._monitor is not None and self._process.poll() is None:
            with contextlib.suppress(Exception):
                await self._monitor.quit()
        if not await wait_exit(self._process, timeout):
            await self._kill()
        if self._monitor is not None:
            await self._monitor.close()
            self._monitor = None
        self._remove_log_dir()

    async def _kill(self) -> None:
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            if not await wait_exit(self._process, 5.0):
                self._process.kill()
                await wait_exit(self._process, 5.0)

    async def __aenter__(self) -> Machine:
        return await self.launch()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.shutdown())

    def serial_text(self) -> str:
        if not self.config.serial_log:
            return ""
        try:
            return Path(self.config.serial_log).read_text(errors="replace")
        except FileNotFoundError:
            return ""


def spawn(
    argv: Sequence[str],
    *,
    log_file: Path | None,
    pass_fds: Sequence[int] = (),
    cwd: str | None = None,
    user: tuple[int, int, tuple[int, ...]] | None = None,
) -> subprocess.Popen[bytes]:
    """Start QEMU detached from our stdio and terminal (own session), output to ``log_file``.

    A caller capturing qemusnap's output must not hang on a QEMU that inherited the pipe; and a
    Ctrl-C at the terminal must not reach QEMU.  ``user`` (uid, gid, groups): run as them.
    """
    as_user: dict[str, Any] = {}
    if user is not None:
        as_user = {"user": user[0], "group": user[1], "extra_groups": list(user[2])}
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            cwd=cwd,
            **as_user,
        )
    except OSError as exc:
        raise LaunchError(
            f"cannot start {argv[0]}: {exc.strerror} (install qemu-system-x86)"
        ) from exc
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]
    # Reap it whenever it ends, so it never lingers as a zombie while we live.
    threading.Thread(target=process.wait, daemon=True, name=f"reap-{process.pid}").start()
    return process


async def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child (e.g. a QEMU someone else launched)."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- recorded command lines -----------------------------------------------------------------


@attrs.frozen
class RecordedLaunch:
    """The command line, working directory and user of a QEMU process, to start it again."""

    argv: tuple[str, ...]
    cwd: str
    qmp_socket: str
    #: The QEMU's user and groups: a restart runs as them, never as whoever runs qemusnap.
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()

    @classmethod
    def of_pid(cls, pid: int, qmp_socket: str) -> RecordedLaunch:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError as exc:
            raise UnsupportedError(
                f"cannot read the command line of QEMU pid {pid}: {exc}"
            ) from exc
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid, gid = int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0])
        groups = tuple(int(g) for g in fields.get("Groups", "").split())
        argv = tuple(a.decode() for a in raw.split(b"\0")[:-1])
        return cls(argv, cwd, qmp_socket, uid, gid, groups)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecordedLaunch:
        return cls(
            tuple(data["argv"]),
            data["cwd"],
            data["qmp_socket"],
            data.get("uid"),
            data.get("gid"),
            tuple(data.get("groups", ())),
        )

    def with_disks(self, replace: Mapping[str, str]) -> RecordedLaunch:
        return attrs.evolve(self, argv=tuple(replace_disk_paths(self.argv, replace, self.cwd)))

    def with_machine(self, resolved: str) -> RecordedLaunch:
        """Pin the machine type to ``resolved`` (e.g. ``pc-q35-7.2``) where the command line
        names an alias (``-machine q35``/``pc``) or none: a memory file restores only into
        the type it was taken on, and after a QEMU upgrade the alias means a newer type."""
        return attrs.evolve(self, argv=tuple(pin_machine_in_argv(self.argv, resolved)))

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) when QEMU ran as another user than us: new files must be theirs."""
        if self.uid is None or self.gid is None or self.uid == os.getuid():
            return None
        return self.uid, self.gid


_MACHINE_FLAGS = ("-machine", "--machine", "-M")


def pin_machine_in_argv(argv: Sequence[str], resolved: str) -> list[str]:
    """``argv`` with its machine type pinned to ``resolved`` (see
    :meth:`RecordedLaunch.with_machine`); a versioned type given explicitly is kept."""
    out = list(argv)
    typed = False
    for i in range(1, len(out) - 1):
        if out[i] not in _MACHINE_FLAGS:
            continue
        head = out[i + 1].partition(",")[0]
        if "=" in head and not head.startswith("type="):
            continue  # "-machine accel=tcg": options only, the type comes from elsewhere
        typed = True
        pinned = pin_machine(out[i + 1], resolved)
        if pinned is not None:
            out[i + 1] = pinned
    if not typed:
        out[1:1] = ["-machine", resolved]  # no type given: QEMU's default alias "pc"
    return out


# Options a restart must not inherit: qemusnap chooses the start state itself.
_DROP_FLAGS = {"-S"}
_DROP_WITH_VALUE = {"-incoming", "-loadvm"}


def _split_opts(value: str) -> list[str]:
    """Split QEMU option syntax on single commas, each part kept escaped (",," stays): for
    callers that put the parts back together as they were (clone_argv).  The parsing proper
    is :mod:`qemusnap.cmdline`."""
    parts, current, i = [], "", 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current += ",,"
                i += 2
                continue
            parts.append(current)
            current = ""
        else:
            current += value[i]
        i += 1
    parts.append(current)
    return parts


def _opts_dict(value: str) -> dict[str, str]:
    """``socket,id=x,fd=3`` -> {"": "socket", "id": "x", "fd": "3"} (values kept escaped)."""
    out: dict[str, str] = {}
    for part in _split_opts(value):
        key, sep, val = part.partition("=")
        if sep:
            out[key] = val
        else:
            out[""] = key
    return out


def replace_disk_paths(argv: Sequence[str], replace: Mapping[str, str], cwd: str) -> list[str]:
    """Point every image argument of ``argv`` found in ``replace`` (absolute paths) elsewhere,
    opened as the qcow2 image qemusnap made there (see :mod:`qemusnap.cmdline`).  Relative
    paths are resolved against the process's ``cwd``."""
    return cmdline.replace_images(argv, replace, cwd)


def image_paths_in_argv(argv: Sequence[str], cwd: str) -> list[str]:
    """The absolute paths of every image file ``argv`` names (see :func:`replace_disk_paths`)."""
    return cmdline.image_paths(argv, cwd)


def restart_argv(argv: Sequence[str], *, incoming: bool) -> list[str]:
    """``argv`` for a restart: always ``-S`` (qemusnap sends ``cont`` itself), ``-incoming
    defer`` when memory state will be loaded, without monitors on inherited file descriptors
    (``-chardev socket,fd=N``: that descriptor does not exist in a new process), and with
    console logs appended to instead of truncated (``-serial file:PATH`` and ``file`` chardevs
    open their file with O_TRUNC unless ``append=on``)."""
    fd_chardevs = {
        opts.get("id")
        for option, value in itertools.pairwise(argv)
        if option == "-chardev"
        for opts in [cmdline.opts_dict(value)]
        if "fd" in opts
    }
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if skip:
            skip = False
        elif arg in _DROP_FLAGS:
            pass
        elif arg == "-serial" and value.startswith("file:"):
            chardev = f"qs-restart-serial{i}"
            path = value.removeprefix("file:").replace(",", ",,")
            out += ["-chardev", f"file,id={chardev},path={path},append=on"]
            out += ["-serial", f"chardev:{chardev}"]
            skip = True
        elif arg == "-chardev" and cmdline.opts_dict(value).get("") == "file":
            out += [arg, value if "append" in cmdline.opts_dict(value) else f"{value},append=on"]
            skip = True
        elif (
            arg in _DROP_WITH_VALUE
            or (arg == "-chardev" and cmdline.opts_dict(value).get("id") in fd_chardevs)
            or (arg == "-mon" and cmdline.opts_dict(value).get("chardev") in fd_chardevs)
        ):
            skip = True
        else:
            out.append(arg)
    out.append("-S")
    if incoming:
        out += ["-incoming", "defer"]
    return out


async def relaunch(
    launch: RecordedLaunch,
    *,
    incoming: bool = False,
    log_file: Path | None = None,
    timeout: float = 30.0,
    spawned: Callable[[int], None] | None = None,
) -> tuple[subprocess.Popen[bytes], Monitor]:
    """Start QEMU from a recorded command line (paused) and connect to its QMP socket path.

    QEMU creates its ``-qmp unix:PATH,server=on`` socket some time after exec: poll for it
    while the process lives, instead of racing it once.
    """
    argv = restart_argv(launch.argv, incoming=incoming)
    log.debug("relaunching %s", shlex.join(argv))
    user = None
    if launch.owner is not None:
        user = (launch.owner[0], launch.owner[1], launch.groups)
    process = spawn(argv, log_file=log_file, cwd=launch.cwd, user=user)
    if spawned is not None:
        spawned(process.pid)
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = ""
            if log_file:
                with contextlib.suppress(OSError, IndexError):
                    tail = log_file.read_text(errors="replace").strip().splitlines()[-1]
            raise LaunchError(
                f"restarted QEMU exited with status {process.returncode}: {tail or 'no output'}"
            )
        try:
            monitor = await Monitor.connect(launch.qmp_socket, timeout=2.0)
        except Exception as exc:  # the socket is not there yet: try again
            last_error = exc
            await asyncio.sleep(0.05)
            continue
        return process, monitor
    process.kill()
    raise OperationTimeout(f"restarted QEMU did not open {launch.qmp_socket}: {last_error}")
