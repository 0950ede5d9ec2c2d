"""Pure: the command line of a clone, made from the recorded command line of its source.

A clone is a second QEMU started from the same command line as the source VM, next to it.  Every
argument that names something two processes cannot share is rewritten into the clone's own
directory, or refused:

* disk images: the caller's map (each disk's new overlay); an image left unmapped would be
  written by two QEMUs, so it is refused;
* QMP and HMP monitors on UNIX sockets, ``-chardev socket`` servers (the guest agent's channel),
  ``-serial``/``-chardev file`` logs, ``-pidfile``, ``-D`` log files, ``-vnc unix:``: moved into
  the clone's directory (QEMU would unlink a socket path another QEMU listens on, and append
  both consoles into one file);
* network backends: user-mode networking without fixed host ports works unchanged (each QEMU
  has its own slirp stack).  ``tap``, ``bridge``, ``vhost-user``, ``socket,listen=`` and
  ``hostfwd`` with a fixed host port cannot be shared: refused in one line that names the
  backend, unless the caller maps it to a replacement (``netdev ID=SPEC`` for ``-netdev id=ID``,
  ``nicN``/``netN`` for the N-th ``-nic``/``-net``);
* TCP servers (``-qmp tcp:``, ``-chardev socket,host=..,server=on``, ``-vnc :N``,
  ``-spice port=``): refused, a fixed port cannot be bound twice.

The result still carries the source's ``-S``/``-incoming``; :func:`qemusnap.machine.restart_argv`
turns it into the argv that is started (``-S -incoming defer``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import attrs

from .errors import UnsupportedError

# Shared with the restart argv rewrite (the issue-11 work moves these into qemusnap.cmdline).
from .machine import _opts_dict, _split_opts, image_paths_in_argv, replace_disk_paths

__all__ = ["QMP_SOCKET", "CloneArgv", "clone_argv"]

#: The clone's QMP socket, in its directory (SPEC section 3: ``DIR/qmp.sock``).
QMP_SOCKET = "qmp.sock"

# Network backends each QEMU can have its own copy of, as is.
_SHAREABLE_NET = {"user", "hubport", "none", "nic"}


@attrs.frozen
class CloneArgv:
    """The clone's command line and the files in its directory it names."""

    argv: tuple[str, ...]
    qmp_socket: str
    #: Every path of the clone's directory the command line names (sockets, logs, pid file).
    files: tuple[str, ...]


def _join(parts: Sequence[str]) -> str:
    return ",".join(parts)


def _esc(path: str) -> str:
    return path.replace(",", ",,")


class _Rewriter:
    def __init__(self, directory: str, netdevs: Mapping[str, str]) -> None:
        self.directory = directory
        self.netdevs = dict(netdevs)
        self.used_maps: set[str] = set()
        self.files: list[str] = []
        self.qmp: str | None = None
        # DIR/qmp.sock is the clone's QMP socket whatever else the command line names.
        self._names: set[str] = {QMP_SOCKET}

    def path(self, stem: str, suffix: str) -> str:
        """A new file name in the clone's directory (unique per command line)."""
        name, n = f"{stem}{suffix}", 1
        while name in self._names:
            n += 1
            name = f"{stem}-{n}{suffix}"
        self._names.add(name)
        path = os.path.join(self.directory, name)
        self.files.append(path)
        return path

    def qmp_path(self) -> str:
        if self.qmp is None:
            self.qmp = os.path.join(self.directory, QMP_SOCKET)
            self.files.append(self.qmp)
            return self.qmp
        return self.path("qmp", ".sock")

    # --- -qmp / -monitor / -serial style "backend:..." values ---------------------------------

    def monitor(self, option: str, value: str) -> str:
        """``unix:PATH[,opts]``, ``tcp:...``, ``stdio``... (``-qmp``, ``-monitor``, ``-serial``)."""
        kind, _, rest = value.partition(":")
        if kind == "unix":
            parts = _split_opts(rest)
            if option in ("-qmp", "-qmp-pretty"):
                parts[0] = _esc(self.qmp_path())
            else:
                parts[0] = _esc(self.path(option.lstrip("-"), ".sock"))
            return "unix:" + _join(parts)
        if kind == "file" and option == "-serial":
            return "file:" + _esc(self.path("serial", ".log"))
        if kind in ("tcp", "telnet", "websocket") and "server" in rest:
            raise UnsupportedError(
                f"{option} {value}: a clone cannot listen on the same TCP port as its source"
            )
        return value

    def chardev(self, value: str) -> str:
        parts = _split_opts(value)
        opts = _opts_dict(value)
        backend, ident = opts.get("", ""), opts.get("id", "chardev")
        server = opts.get("server", "off") in ("on", "yes", "true") or "server" in parts
        out = [parts[0]]
        for part in parts[1:]:
            key, sep, _ = part.partition("=")
            if backend == "socket" and key == "path" and sep:
                part = f"path={_esc(self.path(ident, '.sock'))}"
            elif backend in ("file", "pipe") and key == "path" and sep:
                part = f"path={_esc(self.path(ident, '.log'))}"
            elif key == "logfile" and sep:
                part = f"logfile={_esc(self.path(ident + '-log', '.log'))}"
            out.append(part)
        if backend == "socket" and server and "host" in opts:
            raise UnsupportedError(
                f"-chardev {value}: a clone cannot listen on the same TCP port as its source"
            )
        return _join(out)

    # --- networking ----------------------------------------------------------------------------

    def net(self, option: str, value: str, key: str) -> str:
        """``-netdev``/``-nic``/``-net`` value: as is, mapped, or refused."""
        if key in self.netdevs:
            self.used_maps.add(key)
            return self.netdevs[key]
        opts = _opts_dict(value)
        backend = opts.get("", "")
        why = None
        if backend not in _SHAREABLE_NET and not (backend == "socket" and "listen" not in opts):
            why = f"a {backend} backend cannot be shared with the source VM"
        elif backend == "socket":
            pass
        elif backend == "user":
            for part in _split_opts(value):
                name, _, rule = part.partition("=")
                if name == "hostfwd" and _fixed_host_port(rule):
                    why = f"hostfwd={rule} binds a fixed host port the source VM holds"
                    break
        if why is None:
            return value
        raise UnsupportedError(
            f"{option} {value}: {why}; map it for the clone with --net {key}=SPEC"
            f" (e.g. --net {key}=user,id={opts.get('id', key)})"
        )


def _fixed_host_port(rule: str) -> bool:
    """``tcp:HOSTADDR:HOSTPORT-GUESTADDR:GUESTPORT``: a host port other than 0 is fixed."""
    host = rule.split("-", 1)[0]
    port = host.rsplit(":", 1)[-1]
    return port not in ("", "0")


def clone_argv(
    argv: Sequence[str],
    cwd: str,
    *,
    directory: str,
    disks: Mapping[str, str],
    netdevs: Mapping[str, str] | None = None,
) -> CloneArgv:
    """The command line of a clone living in ``directory``.

    ``disks`` maps every image path the command line names (absolute, as
    :func:`~qemusnap.machine.image_paths_in_argv` gives them) to the clone's own image.
    ``netdevs`` maps a network backend that cannot be shared (key: the ``-netdev`` id, or
    ``nicN``/``netN`` for the N-th ``-nic``/``-net`` option, counted from 0) to the whole
    option value the clone gets instead.

    :raise UnsupportedError: something cannot be shared and is not mapped (one line).
    """
    directory = os.path.abspath(directory)
    unmapped = [p for p in image_paths_in_argv(argv, cwd) if p not in disks]
    if unmapped:
        raise UnsupportedError(
            f"the command line names image {unmapped[0]}, which is not a disk of the snapshot:"
            " a clone would write it too"
        )
    argv = replace_disk_paths(argv, disks, cwd)
    rw = _Rewriter(directory, netdevs or {})
    out: list[str] = [argv[0]] if argv else []
    counts = {"-nic": 0, "-net": 0}
    has_qmp_option = False
    i = 1
    while i < len(argv):
        option = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        i += 1
        if option in ("-qmp", "-qmp-pretty", "-monitor", "-serial", "-parallel"):
            new = rw.monitor(option, value)
            has_qmp_option |= option.startswith("-qmp") and new.startswith("unix:")
        elif option == "-chardev":
            new = rw.chardev(value)
        elif option == "-pidfile":
            new = rw.path("qemu", ".pid")
        elif option == "-D":
            new = rw.path("qemu-debug", ".log")
        elif option == "-vnc":
            if value.startswith("unix:"):
                new = "unix:" + _esc(rw.path("vnc", ".sock"))
            elif value.split(",")[0] != "none":
                raise UnsupportedError(
                    f"-vnc {value}: a clone cannot use the display its source listens on"
                )
            else:
                new = value
        elif option == "-spice" and "port=" in value:
            raise UnsupportedError(f"-spice {value}: a clone cannot listen on the same port")
        elif option == "-netdev":
            new = rw.net(option, value, _opts_dict(value).get("id", ""))
        elif option in ("-nic", "-net"):
            key = f"{option.lstrip('-')}{counts[option]}"
            counts[option] += 1
            new = rw.net(option, value, key)
        else:
            out.append(option)
            continue
        out += [option, new]
        i += 1
    unknown = sorted(set(rw.netdevs) - rw.used_maps)
    if unknown:
        raise UnsupportedError(
            f"--net {unknown[0]}: the command line has no such network backend"
            " (-netdev id, or nicN/netN for the N-th -nic/-net)"
        )
    if not has_qmp_option:
        # A QEMU launched by qemusnap talks QMP over an inherited socketpair, which a new
        # process does not have (restart_argv drops it): the clone gets a socket path.
        out += ["-qmp", f"unix:{_esc(rw.qmp_path())},server=on,wait=off"]
    assert rw.qmp is not None
    return CloneArgv(tuple(out), rw.qmp, tuple(rw.files))
