"""Decoding commands from the wire: typed, versioned, strict, with readable errors.

Strict: an unknown field, a key given twice in one object and a version that does not
exist are refused, each naming the field. Whatever the bytes hold, ``decode_command``
raises nothing but ``CommandError``.
"""

import json
import re
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from schemas.commands import COMMAND_TYPES, AnyCommand, Command
from schemas.ids import EntityId

MAX_COMMAND_BYTES = 64 * 1024
_SHOWN_CHARS = 64  # of a value quoted in a reason

# Flavours of the v1 CreateInstance, which named a size instead of giving it.
FLAVORS: dict[str, tuple[int, int]] = {
    "tiny": (1, 256),
    "small": (1, 1024),
    "medium": (2, 4096),
    "large": (4, 8192),
}


MAX_REASON_CHARS = 500
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """One short line that PostgreSQL can store and a terminal can show: control
    characters (NUL among them) and lone surrogates escaped, the length bounded."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit - 3] + "..."


class CommandError(ValueError):
    """A command that cannot be accepted; the message is the reason, one printable line."""

    def __init__(self, reason: str, type_: str = "?") -> None:
        super().__init__(printable(reason))
        self.type = type_  # the type the message claimed, when it got that far


class _Head(msgspec.Struct):
    type: Any = None
    v: Any = None  # absent: the current version (every older producer stamped its version)


class _CreateInstanceV1(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
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


def _create_load_balancer_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """v1's default strategy was round_robin: say so, since v2's is maglev."""
    services = doc.get("services")
    if isinstance(services, list):
        services = [{"strategy": "round_robin", **s} if isinstance(s, dict) else s
                    for s in services]
    return {**doc, "v": 2, "services": services}


# (type, version read) -> function lifting the raw document one version up.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("CreateInstance", 1): _create_instance_v1,
    # v1 knew no underlay: the host's VTEP stays unknown until a v2 HostUp says it.
    ("HostUp", 1): lambda doc: {**doc, "v": 2},
    # v1 knew one role: every host was a hypervisor.
    ("RegisterHost", 1): lambda doc: {**doc, "v": 2},
    ("CreateLoadBalancer", 1): _create_load_balancer_v1,
}

_head_decoder = msgspec.json.Decoder(_Head)
_decoder = msgspec.json.Decoder(AnyCommand)
_encoder = msgspec.json.Encoder()
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def decode_command(data: bytes) -> Command:
    """Decode one command, upcasting older versions; raise CommandError with a reason."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError(f"payload of {len(data)} bytes exceeds {MAX_COMMAND_BYTES} bytes")
    try:  # the common case, one decode: a valid command of the current version
        cmd = _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        pass  # decode again below, for the upcast or for a reason that names the field
    else:
        if cmd.v == cmd.version:
            # Written as this codec writes (every command we publish is): no key twice.
            if data != _encoder.encode(cmd):
                _refuse_duplicate_keys(data, type(cmd).__name__)
            return cmd
    return _decode_slowly(data)


def _decode_slowly(data: bytes) -> Command:
    try:
        head = _head_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise CommandError(f"not a JSON command: {_decode_error(exc)}") from None
    type_ = head.type
    cls = COMMAND_TYPES.get(type_) if isinstance(type_, str) else None
    if cls is None:
        raise CommandError(f"unknown command type {_shown(type_)} at `$.type`", _claimed(type_))
    # bool is an int to Python, not to JSON: `"v": true` is no version.
    version = cls.version if head.v is None else head.v
    if type(version) is not int or not 1 <= version <= cls.version:
        known = "1" if cls.version == 1 else f"1 to {cls.version}"
        raise CommandError(f"{type_} has no version {_shown(head.v)} at `$.v` (known: {known};"
                           " absent means the current one)", type_)
    try:
        if version == cls.version:
            cmd = _decoder.decode(data)
        else:
            doc = msgspec.json.decode(data)
            for old in range(version, cls.version):
                doc = UPCASTERS[(type_, old)](doc)
            cmd = msgspec.convert(doc, AnyCommand)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise CommandError(f"{type_}: {_decode_error(exc)}", type_) from None
    _refuse_duplicate_keys(data, type_)
    return cmd


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs in order, a key given twice kept twice."""


def _refuse_duplicate_keys(data: bytes, type_: str) -> None:
    """The exact check: JSON lets a key come twice (the last wins), a command may not."""
    try:
        tree = json.loads(data, object_pairs_hook=_Pairs)
    except (ValueError, RecursionError) as exc:  # what msgspec reads, Python's json may not
        raise CommandError(f"{type_}: {_decode_error(exc)}", type_) from None
    _refuse_twice(tree, f"{type_}: ", type_)


def _refuse_twice(tree: Any, prefix: str, type_: str = "?") -> None:
    if (found := _first_duplicate(tree, "$")) is not None:
        key, path = found
        where = "" if path == "$" else f" - at `{path}`"
        raise CommandError(f"{prefix}Object contains duplicate field `{key}`{where}", type_)


def loads(text: str | bytes) -> Any:
    """JSON read as a command's fields are (a --json option, a JSON line): json.loads, but
    a key given twice in an object is a CommandError that names it (not the last winning)."""
    tree = json.loads(text, object_pairs_hook=_Pairs)
    _refuse_twice(tree, "")
    return _plain(tree)


def _plain(node: Any) -> Any:
    if isinstance(node, _Pairs):
        return {key: _plain(value) for key, value in node}
    if isinstance(node, list):
        return [_plain(value) for value in node]
    return node


def _first_duplicate(node: Any, path: str) -> tuple[str, str] | None:
    if isinstance(node, _Pairs):
        seen: set[str] = set()
        for key, value in node:
            if key in seen:
                return key, path
            seen.add(key)
            if (found := _first_duplicate(value, f"{path}.{key}")) is not None:
                return found
    elif isinstance(node, list):
        for n, value in enumerate(node):
            if (found := _first_duplicate(value, f"{path}[{n}]")) is not None:
                return found
    return None


def _decode_error(exc: Exception) -> str:
    return "JSON nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _shown(value: Any) -> str:
    """A value quoted in a reason: short, one line, printable."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."


def _claimed(type_: Any) -> str:
    """The type a message claimed, as its timeline names it: a name, or `?`."""
    return type_ if isinstance(type_, str) and _TYPE_NAME.match(type_) else "?"


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def command_from_dict(doc: dict[str, Any]) -> Command:
    """Build a command from parsed input (CLI flags, JSON lines) with the same checks."""
    try:
        data = encode(doc)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        # A lone surrogate ("\ud800" read by json.loads), a value JSON has no form for.
        raise CommandError(f"not encodable as a JSON command: {_decode_error(exc)}") from None
    return decode_command(data)
