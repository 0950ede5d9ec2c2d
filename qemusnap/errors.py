"""The one error tree of qemusnap.

Every error qemusnap raises derives from :class:`QemuSnapError`. Foreign errors (``qemu.qmp``,
``OSError`` from subprocesses, ``sqlite3``) are translated at the boundary with ``raise ... from``.
Cancellation (``asyncio.CancelledError``) is never wrapped.

::

    QemuSnapError
    ├── UsageError                  bad usage or bad input; nothing was changed   (CLI exit 2)
    │   ├── InvalidNameError        snapshot name breaks the naming rules
    │   ├── SnapshotNotFoundError   no snapshot of that name
    │   ├── SnapshotExistsError     a snapshot of that name exists already
    │   ├── TargetExistsError       a file qemusnap would create exists already
    │   ├── DiskNotFoundError       no disk of that name / no such image file
    │   ├── VMNotFoundError         the state directory does not know which VM is meant
    │   └── UnsupportedError        not possible on this VM/image, or not built yet
    └── OperationError              an operation failed                           (CLI exit 1)
        ├── MonitorError            QMP: connection lost, protocol trouble
        │   ├── MonitorConnectError could not connect / not a QMP server
        │   ├── CommandError        QEMU answered a command with an error
        │   └── JobError            a QMP job or block job ended with an error
        ├── GuestAgentError         qemu-guest-agent failed or is unreachable
        ├── MemoryFileError         writing or loading a memory file failed
        ├── QemuImgError            a qemu-img (or qemu-io) run failed
        │   └── ImageInUseError     the image is locked by a running QEMU
        ├── ProgramNotFoundError    qemu-img / qemu-system-* / ... is not installed
        ├── LaunchError             qemu-system-* did not start
        ├── BusyError               another qemusnap operation holds this VM
        ├── StoreError              the state directory is unusable
        └── OperationTimeout        a deadline passed (also a builtin TimeoutError)
"""

from __future__ import annotations


class QemuSnapError(Exception):
    """Root of every qemusnap error."""

    #: Exit status the command line uses for this error.
    exit_code = 1


# --- bad input (exit 2) -------------------------------------------------------------------


class UsageError(QemuSnapError):
    """Bad usage or bad input; nothing was changed."""

    exit_code = 2


class InvalidNameError(UsageError):
    """A snapshot name breaks the naming rules."""


class SnapshotNotFoundError(UsageError):
    """No snapshot of that name."""


class SnapshotExistsError(UsageError):
    """A snapshot of that name exists already."""


class TargetExistsError(UsageError):
    """A file qemusnap would have to create exists already (it is never overwritten)."""


class DiskNotFoundError(UsageError):
    """No disk of that name, or no such image file."""


class VMNotFoundError(UsageError):
    """The state directory cannot tell which VM is meant."""


class UnsupportedError(UsageError):
    """The request is not possible for this VM or image (or is not built yet)."""


# --- failures (exit 1) --------------------------------------------------------------------


class OperationError(QemuSnapError):
    """An operation failed."""


class MonitorError(OperationError):
    """Trouble talking QMP to QEMU."""


class MonitorConnectError(MonitorError):
    """Could not connect to a QMP socket, or the peer is not a QMP server."""


class CommandError(MonitorError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QMP {command} failed: {description} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.description = description


class JobError(MonitorError):
    """A QMP job (``snapshot-save`` ...) or block job ended with an error."""


class GuestAgentError(OperationError):
    """qemu-guest-agent failed or did not answer."""


class MemoryFileError(OperationError):
    """Writing or loading a memory file (a migration stream) failed."""


class QemuImgError(OperationError):
    """A ``qemu-img``/``qemu-io`` run failed."""

    def __init__(self, message: str, *, argv: list[str] | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.argv = argv or []
        self.stderr = stderr


class ImageInUseError(QemuImgError):
    """The image is locked (opened for writing) by a running QEMU."""


class ProgramNotFoundError(OperationError):
    """A program qemusnap needs is not installed (or its override does not point at one)."""

    def __init__(self, message: str, *, program: str = "") -> None:
        super().__init__(message)
        self.program = program


class LaunchError(OperationError):
    """qemu-system-* did not start."""


class BusyError(OperationError):
    """Another qemusnap operation holds this VM."""


class StoreError(OperationError):
    """The state directory is unusable (permissions, corrupt database)."""


class OperationTimeout(OperationError, TimeoutError):
    """A deadline passed."""
