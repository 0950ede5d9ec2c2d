"""A pytest plugin: one QEMU VM per session, reset to a golden snapshot before each test.

Registered through the ``pytest11`` entry point, so it is there once qemusnap is installed, and
off unless used: it only adds options and fixtures, and nothing starts until a test requests a
``qemusnap_*`` fixture.  (With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set: ``-p qemusnap``.)

What to boot, in the ini file (paths relative to it; ``$VARS`` and ``~`` are expanded)::

    [pytest]
    qemusnap_kernel = guest/vmlinuz         # a kernel (-kernel), and/or a disk to boot:
    qemusnap_initrd = guest/initrd.img
    qemusnap_append = console=ttyS0 quiet panic=-1          # (the default)
    qemusnap_disk = images/base.img         # never written: QEMU writes to a qcow2 overlay
    qemusnap_memory = 512                   # MiB, default 256      (--qemusnap-memory)
    qemusnap_accel = auto                   # auto, kvm or tcg      (--qemusnap-accel)
    qemusnap_qemu_args = -smp 2             # extra QEMU arguments  (--qemusnap-qemu-arg)
    qemusnap_ready = serial:login:          # ready when the serial console printed "login:";
                                            # default "agent": when the guest agent answers
    qemusnap_boot_timeout = 120             # seconds, for ready
    qemusnap_snapshot = golden              # the golden snapshot's name

or, overriding all of that, a session fixture ``qemusnap_config`` returning a
:class:`~qemusnap.MachineConfig` (its ``serial_log`` and ``qga_socket`` are filled in when
None).  ``--qemusnap-state DIR`` keeps qemusnap's state there (default: a temporary directory).

Fixtures (``qemusnap_vm`` is a :class:`~qemusnap.harness.SyncVM`)::

    qemusnap_vm       session   the running VM, booted once, guest ready
    qemusnap_prepare  session   override it to set the guest up before the golden snapshot
                                (request qemusnap_vm in it, or return a callable(vm))
    qemusnap_golden   session   the golden snapshot (a Snapshot), taken once after prepare
    qemusnap_fresh    function  the VM, reset to the golden snapshot before the test
    qemusnap_run_dir  session   a short directory for the session's disks, sockets, serial log

    def test_upgrade(qemusnap_fresh):
        assert qemusnap_fresh.shell("apk upgrade").exitcode == 0   # undone for the next test

The disks the plugin builds are qcow2 (a scratch disk, or an overlay on ``qemusnap_disk``), so
the reset is an in-place ``snapshot-load`` of an internal checkpoint, the fastest there is; the
report header says so, and the summary gives the reset count and latency.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest

from . import fanout
from .engine import VM
from .errors import QemuSnapError
from .harness import EXTERNAL_RESTART, IN_PLACE, AsyncVM, ResetReport, SyncVM, _LoopThread
from .machine import Drive, MachineConfig, qemu_binary
from .models import Snapshot
from .qemu_img import QemuImg

__all__ = [
    "qemusnap_afresh",
    "qemusnap_avm",
    "qemusnap_config",
    "qemusnap_fresh",
    "qemusnap_golden",
    "qemusnap_prepare",
    "qemusnap_run_dir",
    "qemusnap_vm",
]

DEFAULT_APPEND = "console=ttyS0 quiet panic=-1"
SCRATCH_SIZE = 16 * 1024 * 1024  # the scratch disk holds the golden RAM (vmstate) mostly
_FIXTURES = frozenset(
    {"qemusnap_vm", "qemusnap_golden", "qemusnap_fresh", "qemusnap_avm", "qemusnap_afresh"}
)
_DESCRIPTION = {
    IN_PLACE: "in-place snapshot-load (internal checkpoint)",
    EXTERNAL_RESTART: "restart from external checkpoint",
}

_announced = pytest.StashKey[bool]()
_resets = pytest.StashKey[list[ResetReport]]()
# pytest-xdist: whether this worker boots the guest; what it reports to the controller; the
# controller's shared directory and the workers' reports.
_booter = pytest.StashKey[bool]()
_worker_report = pytest.StashKey[dict[str, Any]]()
_shared = pytest.StashKey[str]()
_worker_reports = pytest.StashKey[list[dict[str, Any]]]()
_SHARED_KEY = "qemusnap_shared"

Prepare = Callable[[SyncVM], object]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qemusnap", "qemusnap: a QEMU VM reset to a golden snapshot per test")
    group.addoption(
        "--qemusnap-qemu-arg",
        action="append",
        default=[],
        dest="qemusnap_qemu_args",
        metavar="ARGS",
        help="extra qemu-system arguments, split like a shell does (repeatable)",
    )
    group.addoption(
        "--qemusnap-accel",
        choices=("auto", "kvm", "tcg"),
        dest="qemusnap_accel",
        help="accelerator (default: ini qemusnap_accel, else auto: kvm where it works, else tcg)",
    )
    group.addoption(
        "--qemusnap-state",
        dest="qemusnap_state",
        metavar="DIR",
        help="qemusnap state directory (default: a temporary directory per session)",
    )
    group.addoption(
        "--qemusnap-memory",
        type=int,
        dest="qemusnap_memory",
        metavar="MIB",
        help="guest RAM in MiB (default: ini qemusnap_memory, else 256)",
    )
    parser.addini("qemusnap_kernel", "qemusnap: kernel to boot (-kernel)", default="")
    parser.addini("qemusnap_initrd", "qemusnap: initrd (-initrd)", default="")
    parser.addini("qemusnap_append", "qemusnap: kernel command line", default=DEFAULT_APPEND)
    parser.addini(
        "qemusnap_disk",
        "qemusnap: disk image to boot (never written: the VM runs on a qcow2 overlay)",
        default="",
    )
    parser.addini("qemusnap_memory", "qemusnap: guest RAM in MiB", default="256")
    parser.addini("qemusnap_accel", "qemusnap: auto, kvm or tcg", default="auto")
    parser.addini("qemusnap_qemu_args", "qemusnap: extra qemu-system arguments", type="args")
    parser.addini(
        "qemusnap_ready",
        "qemusnap: when the booted guest is ready: agent (its guest agent answers), "
        "serial:TEXT (its serial console printed TEXT) or none",
        default="agent",
    )
    parser.addini("qemusnap_boot_timeout", "qemusnap: seconds to wait for ready", default="120")
    parser.addini("qemusnap_snapshot", "qemusnap: name of the golden snapshot", default="golden")


# --- report lines -------------------------------------------------------------------------------


def _configured_by_ini(config: pytest.Config) -> bool:
    return bool(config.getini("qemusnap_kernel") or config.getini("qemusnap_disk"))


def _reset_line(config: pytest.Config) -> str:
    if _configured_by_ini(config):
        # The plugin's own disks are all qcow2 (scratch disk or overlay): always in place.
        return f"qemusnap: per-test reset by {_DESCRIPTION[IN_PLACE]}"
    # A qemusnap_config fixture: its disks decide, once the VM runs (see the summary line).
    return (
        f"qemusnap: per-test reset by {_DESCRIPTION[IN_PLACE]} if every writable disk is qcow2,"
        f" else by {_DESCRIPTION[EXTERNAL_RESTART]}"
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not _configured_by_ini(config):
        return []
    config.stash[_announced] = True
    return [_reset_line(config)]


def pytest_report_collectionfinish(
    config: pytest.Config, start_path: Path, items: Sequence[pytest.Item]
) -> list[str]:
    # Also reached with -q, which hides the header.
    if config.stash.get(_announced, False):
        return []
    if not any(_FIXTURES.intersection(getattr(item, "fixturenames", ())) for item in items):
        return []
    config.stash[_announced] = True
    return [_reset_line(config)]


# --- pytest-xdist -------------------------------------------------------------------------------


def _shared_dir(config: pytest.Config) -> Path | None:
    """The run's shared directory, in an xdist worker (None otherwise)."""
    value = getattr(config, "workerinput", {}).get(_SHARED_KEY)
    return Path(value) if value else None


def _worker_id(config: pytest.Config) -> str:
    return str(getattr(config, "workerinput", {}).get("workerid", "main"))


def _report(config: pytest.Config) -> dict[str, Any]:
    return config.stash.setdefault(_worker_report, {})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Under xdist, the worker that boots publishes the golden checkpoint as soon as its first
    test has the VM, also when that test asks for ``qemusnap_vm`` alone: the other workers
    wait for it (their ``qemusnap_vm`` is a clone of it)."""
    result = yield
    config = item.config
    if (
        config.stash.get(_booter, False)
        and "qemusnap_vm" in getattr(item, "fixturenames", ())
        and _shared_dir(config) is not None
        and not fanout.Shared(_shared_dir(config) or "").published()
    ):
        request = getattr(item, "_request", None)  # the test's fixture request
        if request is not None:
            request.getfixturevalue("qemusnap_golden")
    return result


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: one shared directory for the run, given to every worker."""
    config = node.config
    if _shared not in config.stash:
        config.stash[_shared] = tempfile.mkdtemp(prefix="qemusnap-x-", dir="/tmp")
    node.workerinput[_SHARED_KEY] = config.stash[_shared]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    report = getattr(node, "workeroutput", {}).get("qemusnap")
    if report:
        node.config.stash.setdefault(_worker_reports, []).append(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    if hasattr(config, "workeroutput") and _shared_dir(config) is not None:
        report = dict(_report(config))
        report["resets"] = [[r.method, r.seconds] for r in config.stash.get(_resets, [])]
        if report.get("booted") or report.get("clone_seconds") is not None:
            config.workeroutput["qemusnap"] = report


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(_shared, None)
    if shared is not None:
        fanout.kill_leftovers(shared)  # clones of a worker that crashed
        shutil.rmtree(shared, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    config = terminalreporter.config
    workers = config.stash.get(_worker_reports, [])
    mine: list[ResetReport] = config.stash.get(_resets, [])
    resets = list(mine)
    if workers:
        boots = sum(1 for w in workers if w.get("booted"))
        clones = [w["clone_seconds"] for w in workers if w.get("clone_seconds") is not None]
        line = f"qemusnap: guest booted {boots} time{'s' * (boots != 1)} for {len(workers)}"
        line += f" xdist worker{'s' * (len(workers) != 1)}; {len(clones)} clone"
        line += f"{'s' * (len(clones) != 1)} of the golden checkpoint"
        if clones:
            line += f", started in mean {sum(clones) / len(clones):.2f} s, max {max(clones):.2f} s"
        terminalreporter.write_line(line)
        resets += [ResetReport(m, s) for w in workers for m, s in w.get("resets", [])]
    if not resets:
        return
    methods = sorted({r.method for r in resets})
    seconds = [r.seconds for r in resets]
    terminalreporter.write_line(
        f"qemusnap: {len(resets)} per-test resets by"
        f" {', '.join(_DESCRIPTION.get(m, m) for m in methods)}:"
        f" mean {1000 * sum(seconds) / len(seconds):.0f} ms, max {1000 * max(seconds):.0f} ms"
    )


# --- configuration ------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    """Fail the fixture with just ``message`` (no traceback)."""
    pytest.fail(f"qemusnap: {message}", pytrace=False)


def _ini_path(config: pytest.Config, name: str) -> Path | None:
    value = str(config.getini(name)).strip()
    if not value:
        return None
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    base = config.inipath.parent if config.inipath else config.rootpath
    path = base / path
    if not path.exists():
        hint = " (an environment variable is not set?)" if "$" in str(path) else ""
        what = name.removeprefix("qemusnap_")
        where = f" in {config.inipath}" if config.inipath else ""
        _fail(f"{what} file {path} does not exist{hint} (ini option {name}{where})")
    return path


def _check_qemu(binary: str | None) -> None:
    program = binary or qemu_binary()
    if shutil.which(program) is None:
        override = os.environ.get("QEMUSNAP_QEMU")
        _fail(
            f"{program} not found"
            + (" (QEMUSNAP_QEMU is set)" if override and not binary else "")
            + ": install QEMU (Debian/Ubuntu: apt-get install qemu-system-x86;"
            " Fedora: dnf install qemu-system-x86-core), or set QEMUSNAP_QEMU"
        )


def _build_config(config: pytest.Config, run_dir: Path) -> MachineConfig:
    """The VM the ini file and the command line describe (disks made in ``run_dir``)."""
    kernel = _ini_path(config, "qemusnap_kernel")
    initrd = _ini_path(config, "qemusnap_initrd")
    disk = _ini_path(config, "qemusnap_disk")
    if kernel is None and disk is None:
        _fail(
            "nothing to boot: set the ini option qemusnap_kernel (and qemusnap_initrd) or"
            " qemusnap_disk, or define a session fixture qemusnap_config returning a"
            " qemusnap.MachineConfig"
        )
    _check_qemu(None)
    try:
        memory = config.getoption("qemusnap_memory") or int(config.getini("qemusnap_memory"))
    except ValueError:
        _fail("ini option qemusnap_memory must be a number of MiB")
    accel = config.getoption("qemusnap_accel") or str(config.getini("qemusnap_accel"))
    extra = list(config.getini("qemusnap_qemu_args"))
    for value in config.getoption("qemusnap_qemu_args"):
        extra += shlex.split(value)
    drive = run_dir / "vda.qcow2"
    try:
        asyncio.run(_make_disk(drive, disk))
    except QemuSnapError as exc:
        _fail(f"cannot create {drive}: {exc}")
    return MachineConfig(
        drives=(Drive(str(drive), "vda"),),
        memory_mib=memory,
        accel=accel,
        kernel=str(kernel) if kernel else None,
        initrd=str(initrd) if initrd else None,
        append=(str(config.getini("qemusnap_append")) or None) if kernel else None,
        extra_args=tuple(extra),
    )


async def _make_disk(path: Path, base: Path | None) -> None:
    """A qcow2 overlay on ``base`` (so the base is never written), or an empty scratch disk:
    either way qcow2, which an internal checkpoint needs (the RAM goes into it)."""
    qemu_img = QemuImg()
    if base is None:
        await qemu_img.create(path, size=SCRATCH_SIZE)
        return
    (info,) = await qemu_img.info(base, backing_chain=False)
    await qemu_img.create(path, backing=str(base.absolute()), backing_fmt=info.format)


def _with_plumbing(config: MachineConfig, run_dir: Path) -> MachineConfig:
    """``config`` with a serial log and a guest agent socket where it has none."""
    return attrs.evolve(
        config,
        serial_log=config.serial_log or str(run_dir / "serial.log"),
        qga_socket=config.qga_socket or str(run_dir / "qga.sock"),
    )


def _check_files(config: MachineConfig) -> None:
    for what, path in [("kernel", config.kernel), ("initrd", config.initrd)] + [
        (f"disk {d.id}", d.file) for d in config.drives
    ]:
        if path and not Path(path).exists():
            _fail(f"{what} file {path} does not exist (from the qemusnap_config fixture)")


def _serial_tail(config: MachineConfig, lines: int = 15) -> str:
    try:
        text = Path(config.serial_log or "").read_text(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\nserial console ({config.serial_log}), last lines:\n{tail}" if tail else ""


def _wait_ready(vm: SyncVM, config: MachineConfig, ready: str, timeout: float) -> None:
    if ready == "none":
        return
    if ready == "agent":
        try:
            vm.wait_for_agent(timeout=timeout)
        except QemuSnapError as exc:
            _fail(
                f"the guest agent did not answer ({exc}); is qemu-guest-agent running in the"
                " guest? (or set the ini option qemusnap_ready)" + _serial_tail(config)
            )
        return
    if not ready.startswith("serial:"):
        _fail(f"ini option qemusnap_ready: {ready!r} is not agent, none or serial:TEXT")
    needle = ready.removeprefix("serial:").encode()
    deadline = time.monotonic() + timeout
    path = Path(config.serial_log or "")
    while not (path.exists() and needle in path.read_bytes()):
        if time.monotonic() > deadline:
            _fail(
                f"the guest did not print {needle.decode()!r} within {timeout:g} s"
                + _serial_tail(config)
            )
        time.sleep(0.1)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qemusnap_run_dir(pytestconfig: pytest.Config) -> Iterator[Path]:
    """A short directory under /tmp for the session's disks, sockets and serial log (UNIX socket
    paths must stay below 108 bytes); removed at the end of the session.

    Under pytest-xdist, one in the run's shared directory (the clones of every worker read the
    booted source's disks from it: the xdist controller removes it at the very end)."""
    shared = _shared_dir(pytestconfig)
    if shared is not None:
        yield fanout.Shared(shared).run_dir(_worker_id(pytestconfig))
        return
    path = Path(tempfile.mkdtemp(prefix="qemusnap-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def qemusnap_config(pytestconfig: pytest.Config, qemusnap_run_dir: Path) -> MachineConfig:
    """The VM to launch, from the ini file and the command line.  Override it (session scope)
    to describe the VM yourself."""
    return _build_config(pytestconfig, qemusnap_run_dir)


@pytest.fixture(scope="session")
def qemusnap_vm(
    pytestconfig: pytest.Config,
    qemusnap_config: MachineConfig,
    qemusnap_run_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SyncVM]:
    """The VM, launched once per session, its guest ready; shut down at the end.

    Under pytest-xdist, the guest is booted once for all workers (see :mod:`qemusnap.fanout`):
    this is the worker's own clone of the golden checkpoint (in the worker that boots, the
    booted VM until ``qemusnap_golden`` has been taken)."""
    config = _with_plumbing(qemusnap_config, qemusnap_run_dir)
    _check_qemu(config.binary)
    _check_files(config)
    try:
        timeout = float(pytestconfig.getini("qemusnap_boot_timeout"))
    except ValueError:
        _fail("ini option qemusnap_boot_timeout must be a number of seconds")
    shared = _shared_dir(pytestconfig)
    if shared is not None:
        yield from _worker_vm(pytestconfig, config, shared, timeout)
        return
    state = pytestconfig.getoption("qemusnap_state") or tmp_path_factory.mktemp("qemusnap-state")
    try:
        vm = SyncVM.launch(config, state_dir=state)
    except QemuSnapError as exc:
        _fail(f"cannot launch the VM: {exc}")
    try:
        _wait_ready(vm, config, str(pytestconfig.getini("qemusnap_ready")), timeout)
        yield vm
    finally:
        vm.close()


def _worker_vm(
    pytestconfig: pytest.Config, config: MachineConfig, shared: Path, timeout: float
) -> Iterator[SyncVM]:
    """An xdist worker's VM: a clone of the golden checkpoint, or (the first worker to take
    the shared lock) the booted source, which ``qemusnap_golden`` turns into a clone."""
    fan = fanout.Shared(shared)
    try:
        booter = fan.acquire(deadline=2 * timeout + 120)
    except QemuSnapError as exc:
        _fail(str(exc))
    pytestconfig.stash[_booter] = booter
    if booter:
        try:
            vm = SyncVM.launch(config, state_dir=fan.state_dir)
        except QemuSnapError as exc:
            fan.give_up(f"cannot launch the VM: {exc}")
            _fail(f"cannot launch the VM: {exc}")
        try:
            _wait_ready(vm, config, str(pytestconfig.getini("qemusnap_ready")), timeout)
        except BaseException:
            vm.close()
            fan.give_up("the guest did not become ready (see the first worker's error)")
            raise
        _report(pytestconfig)["booted"] = True
    else:
        vm = _clone_into(pytestconfig, fan, config)
    try:
        yield vm
    finally:
        if pytestconfig.stash.get(_booter, False) and not fan.published():
            fan.give_up("the golden snapshot was not taken (see the first worker's error)")
        vm.stop()


def _clone_into(
    pytestconfig: pytest.Config,
    fan: fanout.Shared,
    config: MachineConfig,
    loop: _LoopThread | None = None,
) -> SyncVM:
    worker = _worker_id(pytestconfig)
    try:
        start = time.perf_counter()
        vm = fanout.clone_for_worker(fan, config, worker, loop=loop)
        _report(pytestconfig)["clone_seconds"] = time.perf_counter() - start
    except QemuSnapError as exc:
        _fail(f"cannot clone the golden checkpoint for worker {worker}: {exc}")
    return vm


@pytest.fixture(scope="session")
def qemusnap_prepare() -> Prepare | None:
    """Set the guest up before the golden snapshot: override this fixture and request
    ``qemusnap_vm`` in it (or return a callable that gets the VM).  Default: nothing.

    Under pytest-xdist it runs once, in the worker that boots the guest."""
    return None


@pytest.fixture(scope="session")
def qemusnap_golden(
    pytestconfig: pytest.Config, qemusnap_vm: SyncVM, request: pytest.FixtureRequest
) -> Snapshot:
    """The golden snapshot, taken once after ``qemusnap_prepare`` (one of an earlier session
    of the same name, in a reused state directory, is replaced)."""
    name = str(pytestconfig.getini("qemusnap_snapshot"))
    shared = _shared_dir(pytestconfig)
    if shared is None or pytestconfig.stash.get(_booter, False):
        prepare = request.getfixturevalue("qemusnap_prepare")
        if callable(prepare):
            prepare(qemusnap_vm)
    if shared is not None and pytestconfig.stash.get(_booter, False):
        fan = fanout.Shared(shared)
        try:
            fan.publish(qemusnap_vm, name)
        except QemuSnapError as exc:
            fan.give_up(f"cannot take the golden checkpoint {name!r}: {exc}")
            _fail(f"cannot take the golden checkpoint {name!r}: {exc}")
        assert qemusnap_vm.config is not None
        clone = _clone_into(pytestconfig, fan, qemusnap_vm.config, qemusnap_vm._loop)
        # The booted source is no longer needed (its checkpoint is on disk): the worker's
        # own clone takes its place behind the same handle, and the CPU is free for clones.
        source = qemusnap_vm._retarget(clone._vm, clone.config)
        qemusnap_vm.call(_close_vm(source))
    try:
        if any(s.name == name for s in qemusnap_vm.snapshots()):
            qemusnap_vm.delete(name)
        # In a clone: an internal checkpoint of the clone's qcow2 overlays, so the per-test
        # reset is an in-place snapshot-load there as well.
        return qemusnap_vm.golden(name)
    except QemuSnapError as exc:
        _fail(f"cannot take the golden snapshot {name!r}: {exc}")


def _close_vm(vm: VM) -> Callable[[VM], Awaitable[None]]:
    async def close(_current: VM) -> None:
        await vm.close()

    return close


@pytest.fixture
def qemusnap_fresh(
    pytestconfig: pytest.Config, qemusnap_vm: SyncVM, qemusnap_golden: Snapshot
) -> SyncVM:
    """The VM, reset to the golden snapshot before the test (``last_reset`` says how)."""
    try:
        report = qemusnap_vm.reset(qemusnap_golden.name)
    except QemuSnapError as exc:
        _fail(f"cannot reset to {qemusnap_golden.name!r}: {exc}")
    pytestconfig.stash.setdefault(_resets, []).append(report)
    return qemusnap_vm


# --- pytest-asyncio -----------------------------------------------------------------------------

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixtures need pytest-asyncio
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True

if _HAVE_PYTEST_ASYNCIO:
    # No loop_scope here: the fixtures follow the project's asyncio_default_fixture_loop_scope.
    # They work in any loop: the VM lives in its own loop thread (see AsyncVM).

    @pytest_asyncio.fixture
    async def qemusnap_avm(qemusnap_vm: SyncVM) -> AsyncIterator[AsyncVM]:
        """The session's VM (``qemusnap_vm``) for ``async def`` tests: an
        :class:`~qemusnap.harness.AsyncVM` (``await vm.shell(...)``, ``await vm.call(fn)``)."""
        yield AsyncVM(qemusnap_vm)

    @pytest_asyncio.fixture
    async def qemusnap_afresh(
        pytestconfig: pytest.Config, qemusnap_vm: SyncVM, qemusnap_golden: Snapshot
    ) -> AsyncIterator[AsyncVM]:
        """``qemusnap_fresh`` for ``async def`` tests: reset to the golden snapshot (awaited:
        the test's event loop runs on meanwhile), then the :class:`~qemusnap.harness.AsyncVM`."""
        vm = AsyncVM(qemusnap_vm)
        try:
            report = await vm.reset(qemusnap_golden.name)
        except QemuSnapError as exc:
            _fail(f"cannot reset to {qemusnap_golden.name!r}: {exc}")
        pytestconfig.stash.setdefault(_resets, []).append(report)
        yield vm
