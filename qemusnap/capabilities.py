"""What a QEMU can do, and which mechanism qemusnap uses for it: the one place that decides.

Pure: :meth:`Capabilities.from_probe` reads what :meth:`qemusnap.monitor.Monitor.capabilities`
fetched once per connection (``query-version``, ``query-qmp-schema``,
``query-migrate-capabilities``), and the methods below turn it into decisions.  No other module
compares QEMU version numbers: a Fedora or Ubuntu QEMU between the versions we test gets the
mechanism its schema offers.

Memory files (external checkpoints, ``save``/``restore``):

====================  ===========================================  ============================
what QEMU offers      how the file is written                      memory file format
====================  ===========================================  ============================
``fd:`` only (7.2)    our fd passed with ``getfd``, ``fd:NAME``     stream
``file:`` (8.2+)      our fd put in an fd set with ``add-fd``,     stream
                      ``file:/dev/fdset/N`` (QEMU 11 refuses
                      ``fd:`` to a regular file)
``mapped-ram`` (9.0+) as ``file:``, capabilities ``mapped-ram`` +   mapped-ram (RAM pages at
                      ``multifd`` (N channels writing in parallel)  fixed offsets)
====================  ===========================================  ============================

A live checkpoint (``background-snapshot``) always writes a stream: QEMU refuses
``background-snapshot`` together with ``multifd``/``mapped-ram``.

The format a file has is recorded with the snapshot (:class:`MemoryFormat`); reading it back
needs a QEMU offering that format (a mapped-ram file needs ``mapped-ram`` on the loading side
too), whatever QEMU wrote it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .errors import UnsupportedError
from .models import MemoryFormat, StrEnum

__all__ = [
    "Capabilities",
    "MemoryFormat",
    "MemoryMechanism",
    "Transport",
    "machine_option",
]


class Transport(StrEnum):
    """How QEMU gets the memory file."""

    FD = "fd"  # getfd + fd:NAME
    FILE = "file"  # add-fd + file:/dev/fdset/N


@attrs.frozen
class MemoryMechanism:
    """Everything a transport needs to write or read one memory file."""

    transport: Transport
    format: MemoryFormat
    #: multifd channels writing/reading pages in parallel (0: no multifd).
    multifd_channels: int = 0
    #: ``migrate``/``migrate-incoming`` take ``channels`` (a MigrationAddress) instead of the
    #: deprecated ``uri`` string.
    use_channels: bool = False
    #: Migration capabilities to set (also to *clear*: they stick in a QEMU process between
    #: migrations, a mapped-ram save must not leak into a later live checkpoint).
    capabilities: tuple[tuple[str, bool], ...] = ()


#: Where mapped-ram would be chosen but the user (or a measurement) says otherwise.
DEFAULT_MULTIFD_CHANNELS = 4
#: Migration capabilities that change how the vmstate is written: a memory file may leave them
#: on (they stick in a QEMU process), and ``snapshot-save``/``-load`` must run without them.
FILE_FORMAT_CAPABILITIES = ("mapped-ram", "multifd")


@attrs.frozen
class Capabilities:
    """What one QEMU process offers (from its QMP schema and migration capabilities)."""

    version: tuple[int, int, int]
    commands: frozenset[str]
    #: Migration capabilities QEMU knows (``query-migrate-capabilities``).
    migration: frozenset[str]
    #: Argument names of ``migrate``, and of ``migrate-set-parameters``.
    migrate_args: frozenset[str] = frozenset()
    migrate_parameters: frozenset[str] = frozenset()
    #: Values of the ``transport`` discriminator of MigrationAddress (``file`` since 8.2).
    migration_transports: frozenset[str] = frozenset()
    #: "command" or "command.argument" entries whose schema carries the ``deprecated`` feature.
    deprecated: frozenset[str] = frozenset()

    # --- building -------------------------------------------------------------------------

    @classmethod
    def from_probe(
        cls,
        version: Mapping[str, Any],
        schema: Sequence[Mapping[str, Any]],
        migrate_capabilities: Iterable[Mapping[str, Any]],
    ) -> Capabilities:
        """From the answers of ``query-version``, ``query-qmp-schema`` and
        ``query-migrate-capabilities``.

        QAPI introspection hides type names (they are numbers), so types are reached from the
        command that uses them: ``migrate``'s arguments, its ``channels`` member's element type,
        that type's ``addr`` union and the union's discriminator enum.
        """
        qemu = version.get("qemu", {})
        ver = (int(qemu.get("major", 0)), int(qemu.get("minor", 0)), int(qemu.get("micro", 0)))
        types = {str(e["name"]): e for e in schema}
        commands = frozenset(n for n, e in types.items() if e.get("meta-type") == "command")
        deprecated: set[str] = set()
        for name in commands:
            entry = types[name]
            if "deprecated" in entry.get("features", ()):
                deprecated.add(name)
            for member in _members(types, entry.get("arg-type")):
                if "deprecated" in member.get("features", ()):
                    deprecated.add(f"{name}.{member['name']}")
        migrate_args = _member_map(types, types.get("migrate", {}).get("arg-type"))
        params = _member_map(types, types.get("migrate-set-parameters", {}).get("arg-type"))
        transports: frozenset[str] = frozenset()
        channels = migrate_args.get("channels")
        if channels is not None:
            channel = _element(types, channels.get("type"))
            addr = _member_map(types, channel).get("addr") if channel else None
            if addr is not None:
                transports = _discriminator_values(types, addr.get("type"))
        return cls(
            version=ver,
            commands=commands,
            migration=frozenset(str(c["capability"]) for c in migrate_capabilities),
            migrate_args=frozenset(migrate_args),
            migrate_parameters=frozenset(params),
            migration_transports=transports,
            deprecated=frozenset(deprecated),
        )

    # --- decisions ------------------------------------------------------------------------

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def file_uri(self) -> bool:
        """``file:`` migration with an fd set (``add-fd``)."""
        return "file" in self.migration_transports and "add-fd" in self.commands

    @property
    def mapped_ram(self) -> bool:
        """``mapped-ram`` + ``multifd`` into a ``file:`` (QEMU 9.0+)."""
        return self.file_uri and {"mapped-ram", "multifd"} <= self.migration

    @property
    def background_snapshot(self) -> bool:
        return "background-snapshot" in self.migration

    @property
    def use_channels(self) -> bool:
        """``migrate``'s ``uri`` is deprecated and ``channels`` replaces it: use that."""
        return "channels" in self.migrate_args and "migrate.uri" in self.deprecated

    def save_mechanism(
        self, *, live: bool, mapped_ram: bool = True, channels: int = DEFAULT_MULTIFD_CHANNELS
    ) -> MemoryMechanism:
        """How to write a memory file.  ``live``: with ``background-snapshot`` (which QEMU
        allows only on a plain stream).  ``mapped_ram``: use it where QEMU has it."""
        if live and not self.background_snapshot:
            raise UnsupportedError(
                f"QEMU {self.version_text} has no background-snapshot migration capability:"
                " no live checkpoint"
            )
        if not self.file_uri:
            return MemoryMechanism(
                Transport.FD, MemoryFormat.STREAM, capabilities=self._caps(live=live, mr=False)
            )
        use_mr = mapped_ram and self.mapped_ram and not live and channels > 0
        return MemoryMechanism(
            Transport.FILE,
            MemoryFormat.MAPPED_RAM if use_mr else MemoryFormat.STREAM,
            multifd_channels=channels if use_mr else 0,
            use_channels=self.use_channels,
            capabilities=self._caps(live=live, mr=use_mr),
        )

    def load_mechanism(
        self, fmt: MemoryFormat, *, channels: int = DEFAULT_MULTIFD_CHANNELS
    ) -> MemoryMechanism:
        """How to read a memory file of format ``fmt`` (written by any QEMU)."""
        if fmt is MemoryFormat.MAPPED_RAM and not self.mapped_ram:
            raise UnsupportedError(
                f"the memory file is in mapped-ram format, which QEMU {self.version_text}"
                " cannot read (it has no mapped-ram migration capability)"
            )
        if not self.file_uri:
            return MemoryMechanism(Transport.FD, fmt, capabilities=self._caps(live=False, mr=False))
        mr = fmt is MemoryFormat.MAPPED_RAM
        return MemoryMechanism(
            Transport.FILE,
            fmt,
            multifd_channels=channels if mr else 0,
            use_channels=self.use_channels,
            capabilities=self._caps(live=False, mr=mr),
        )

    def _caps(self, *, live: bool, mr: bool) -> tuple[tuple[str, bool], ...]:
        wanted = {"background-snapshot": live, "mapped-ram": mr, "multifd": mr}
        return tuple((k, v) for k, v in wanted.items() if k in self.migration)


def machine_option(qom_type: str) -> str:
    """The ``-machine`` value of a QOM machine type: ``pc-q35-7.2-machine`` -> ``pc-q35-7.2``.

    ``qom-get /machine type`` answers the resolved, versioned type even when QEMU was started
    with the alias ``-machine q35``/``pc`` (which a newer QEMU maps to a newer, incompatible
    type)."""
    return qom_type.removesuffix("-machine")


#: ``-machine`` values that are aliases of "the newest versioned type of this QEMU".
MACHINE_ALIASES = frozenset({"", "pc", "q35"})


def pin_machine(value: str | None, resolved: str) -> str | None:
    """The ``-machine`` value to start with so a memory file taken on ``resolved`` loads.

    ``value`` is the recorded ``-machine`` argument (None: none given, QEMU's default ``pc``);
    its type part is replaced only when it is an alias, its other options are kept.  None:
    nothing to change."""
    head, _, rest = (value or "").partition(",")
    kv = head.partition("=")
    if kv[1]:  # "type=q35,..."
        if kv[0] != "type" or kv[2] not in MACHINE_ALIASES:
            return None
    elif head not in MACHINE_ALIASES:
        return None
    return resolved + ("," + rest if rest else "")


def _members(types: Mapping[str, Mapping[str, Any]], name: object) -> list[Mapping[str, Any]]:
    entry = types.get(str(name)) if name is not None else None
    if not entry or entry.get("meta-type") != "object":
        return []
    return list(entry.get("members", ()))


def _member_map(
    types: Mapping[str, Mapping[str, Any]], name: object
) -> dict[str, Mapping[str, Any]]:
    return {str(m["name"]): m for m in _members(types, name)}


def _element(types: Mapping[str, Mapping[str, Any]], name: object) -> object:
    entry = types.get(str(name)) if name is not None else None
    if entry and entry.get("meta-type") == "array":
        return entry.get("element-type")
    return None


def _discriminator_values(types: Mapping[str, Mapping[str, Any]], name: object) -> frozenset[str]:
    entry = types.get(str(name)) if name is not None else None
    if not entry or entry.get("meta-type") != "object" or "tag" not in entry:
        return frozenset()
    tag = _member_map(types, name).get(str(entry["tag"]))
    enum_ = types.get(str(tag.get("type"))) if tag else None
    if not enum_ or enum_.get("meta-type") != "enum":
        return frozenset()
    values = enum_.get("members") or [{"name": v} for v in enum_.get("values", ())]
    return frozenset(str(v["name"]) for v in values)
