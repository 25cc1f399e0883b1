"""Decoding commands from the wire: typed, versioned, with readable errors."""

from collections.abc import Callable
from typing import Any, Literal

import msgspec

from schemas.commands import COMMAND_TYPES, AnyCommand, Command
from schemas.ids import EntityId

MAX_COMMAND_BYTES = 64 * 1024

# Flavours of the v1 CreateInstance, which named a size instead of giving it.
FLAVORS: dict[str, tuple[int, int]] = {
    "tiny": (1, 256),
    "small": (1, 1024),
    "medium": (2, 4096),
    "large": (4, 8192),
}


class CommandError(ValueError):
    """A command that cannot be accepted; the message is the reason, one line."""

    def __init__(self, reason: str, type_: str = "?") -> None:
        super().__init__(reason)
        self.type = type_  # the type the message claimed, when it got that far


class _Head(msgspec.Struct):
    type: str = ""
    v: int = 0  # absent: the current version (every older producer stamped its version)


class _CreateInstanceV1(msgspec.Struct, kw_only=True):
    """The v1 shape, typed so that a bad old document fails with the field named."""

    cmd_id: str
    id: str
    flavor: Literal["tiny", "small", "medium", "large"]
    image: str
    networks: list[EntityId] = []
    power: str = "running"
    pool: str | None = None


def _create_instance_v1(doc: dict[str, Any]) -> dict[str, Any]:
    old = msgspec.convert({k: v for k, v in doc.items() if k not in ("type", "v")},
                          _CreateInstanceV1)
    vcpus, memory = FLAVORS[old.flavor]
    return {
        "type": "CreateInstance", "v": 2, "cmd_id": old.cmd_id, "id": old.id,
        "power": old.power, "pool": old.pool,
        "template": {"vcpus": vcpus, "memory_mib": memory, "image": old.image,
                     "nics": [{"network": n} for n in old.networks]},
    }


# (type, version read) -> function lifting the raw document one version up.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("CreateInstance", 1): _create_instance_v1,
}

_head_decoder = msgspec.json.Decoder(_Head)
_decoder = msgspec.json.Decoder(AnyCommand)
_encoder = msgspec.json.Encoder()


def decode_command(data: bytes) -> Command:
    """Decode one command, upcasting older versions; raise CommandError with a reason."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(data)} bytes exceeds {MAX_COMMAND_BYTES} bytes")
    try:  # the common case, one decode: a valid command of the current version
        cmd = _decoder.decode(data)
        if cmd.v == cmd.version:
            return cmd
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass  # decode again below, for the upcast or for a reason that names the field
    try:
        head = _head_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CommandError(f"not a JSON command: {exc}") from None
    cls = COMMAND_TYPES.get(head.type)
    if cls is None:
        raise CommandError(f"unknown command type {head.type!r} at `$.type`", head.type)
    version = head.v or cls.version
    if not 1 <= version <= cls.version:
        raise CommandError(f"{head.type} version {head.v} is not supported at `$.v`", head.type)
    try:
        if version == cls.version:
            return _decoder.decode(data)
        doc = msgspec.json.decode(data)
        for old in range(version, cls.version):
            doc = UPCASTERS[(head.type, old)](doc)
        return msgspec.convert(doc, AnyCommand)
    except msgspec.ValidationError as exc:
        raise CommandError(f"{head.type}: {exc}", head.type) from None


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def command_from_dict(doc: dict[str, Any]) -> Command:
    """Build a command from parsed input (CLI flags, JSON lines) with the same checks."""
    return decode_command(encode(doc))
