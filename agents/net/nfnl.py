"""Reading nf_tables and conntrack through nfnetlink, object by object.

Writes go through libnftables (one JSON transaction per converge), but its reads do not
scale: before any command it loads a cache of the whole ruleset, so `list chain` of one
port's chain took 14-35 ms with 400 ports here. The kernel answers for one chain or one
set directly, in tens of microseconds, and dumps a set of 1,000 elements in about a
millisecond: that is what the firewall reads (rarely: see `agents.net.firewall._View`).

Conntrack entries are listed and deleted here too (ctnetlink), to cut the connections a
removed rule allowed.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import NamedTuple

from agents.net.netlink import (
    NLM_F_DUMP,
    Message,
    NetlinkSocket,
    attr_list,
    attrs,
    cstr,
    get_or_none,
    nest,
    nla,
    nla_str,
)

NFNL_SUBSYS_CTNETLINK = 1
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETTABLE, NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSET = 1, 4, 7, 10
NFT_MSG_GETSETELEM, NFT_MSG_GETGEN = 13, 16
NFTA_GEN_ID = 1
IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 1, 2

NFPROTO_INET, NFPROTO_BRIDGE = 1, 7

NFTA_TABLE_NAME = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_USERDATA = 1, 2, 3, 7
NFTA_SET_TABLE, NFTA_SET_NAME = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_DATA, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY_END = 1, 2, 3, 10
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
NFTNL_UDATA_COMMENT = 0  # a rule's comment, and a set element's
NFT_SET_ELEM_INTERVAL_END = 1
NFT_JUMP = -3

CTA_TUPLE_ORIG, CTA_ZONE = 1, 18
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

_NFGEN = struct.Struct("=BBH")
_BE32 = struct.Struct("!i")
_BE16 = struct.Struct("!H")
_BE64 = struct.Struct("!Q")


def _nft(msg: int) -> int:
    return NFNL_SUBSYS_NFTABLES << 8 | msg


def _head(family: int) -> bytes:
    return _NFGEN.pack(family, 0, 0)


class Rule(NamedTuple):
    handle: int
    comment: str | None


@dataclass(frozen=True)
class Element:
    key: bytes
    key_end: bytes | None = None
    value: bytes | None = None  # a map's data
    jump: str | None = None  # a verdict map's: the chain it jumps to
    comment: str | None = None


class Flow(NamedTuple):
    """A conntrack entry's original direction."""

    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    zone: int


def _udata_comment(raw: bytes | memoryview) -> str | None:
    offset = 0
    while offset + 2 <= len(raw):
        kind, size = raw[offset], raw[offset + 1]
        if kind == NFTNL_UDATA_COMMENT:
            return cstr(raw[offset + 2:offset + 2 + size])
        offset += 2 + size
    return None


def _element(raw: bytes | memoryview) -> Element | None:
    a = attrs(raw)
    if NFTA_SET_ELEM_FLAGS in a and _BE32.unpack(a[NFTA_SET_ELEM_FLAGS])[0] & \
            NFT_SET_ELEM_INTERVAL_END:
        return None  # the end marker of a non-concatenated interval: not used here
    key = bytes(attrs(a[NFTA_SET_ELEM_KEY]).get(NFTA_DATA_VALUE, b"")) \
        if NFTA_SET_ELEM_KEY in a else b""
    end = attrs(a[NFTA_SET_ELEM_KEY_END]).get(NFTA_DATA_VALUE) \
        if NFTA_SET_ELEM_KEY_END in a else None
    key_end = bytes(end) if end is not None else None
    value = jump = None
    if NFTA_SET_ELEM_DATA in a:
        data = attrs(a[NFTA_SET_ELEM_DATA])
        value = bytes(data[NFTA_DATA_VALUE]) if NFTA_DATA_VALUE in data else None
        if NFTA_DATA_VERDICT in data:
            verdict = attrs(data[NFTA_DATA_VERDICT])
            code = _BE32.unpack(verdict[NFTA_VERDICT_CODE])[0]
            if code == NFT_JUMP and NFTA_VERDICT_CHAIN in verdict:
                jump = cstr(verdict[NFTA_VERDICT_CHAIN])
    comment = _udata_comment(a[NFTA_SET_ELEM_USERDATA]) if NFTA_SET_ELEM_USERDATA in a else None
    return Element(key, key_end, value, jump, comment)


class NftReader:
    """Reads of one namespace's nf_tables and conntrack over an nfnetlink socket."""

    def __init__(self, sock: NetlinkSocket) -> None:
        self.sock = sock

    def _dump(self, msg: int, query: bytes, what: str) -> list[tuple[int, memoryview]]:
        """A dump of nf_tables objects; nothing if their table does not exist."""
        return get_or_none(self.sock, _nft(msg), query, what, missing=(errno.ENOENT,),
                           flags=NLM_F_DUMP) or []

    def generation(self) -> int:
        """The ruleset's generation: every committed transaction, anyone's, moves it by 1."""
        answers = self.sock.dump(_nft(NFT_MSG_GETGEN), _head(socket.AF_UNSPEC),
                                 "get ruleset generation", flags=0)
        for _kind, body in answers:
            raw = attrs(body, _NFGEN.size).get(NFTA_GEN_ID)
            if raw is not None:
                return int(_BE32.unpack(raw)[0]) & 0xFFFFFFFF
        raise OSError(errno.EPROTO, "no generation in the answer to NFT_MSG_GETGEN")

    def rules(self, family: int, table: str, chain: str) -> list[Rule]:
        """The rules of one chain, in order (empty if the chain or its table is missing)."""
        query = (_head(family) + nla_str(NFTA_RULE_TABLE, table)
                 + nla_str(NFTA_RULE_CHAIN, chain))
        out = []
        for _kind, body in self._dump(NFT_MSG_GETRULE, query, f"list chain {chain}"):
            a = attrs(body, _NFGEN.size)
            if cstr(a.get(NFTA_RULE_CHAIN, b"")) != chain:
                continue
            out.append(Rule(_BE64.unpack(a[NFTA_RULE_HANDLE])[0],
                            _udata_comment(a[NFTA_RULE_USERDATA])
                            if NFTA_RULE_USERDATA in a else None))
        return out

    def tables(self, family: int) -> list[str]:
        """The names of the family's tables (libnftables' `list tables` loads every set's
        elements first: 0.5 s and more beside one 65,537-bucket balancer map)."""
        out = []
        for _kind, body in self._dump(NFT_MSG_GETTABLE, _head(family), "list tables"):
            name = attrs(body, _NFGEN.size).get(NFTA_TABLE_NAME)
            if name is not None:
                out.append(cstr(name))
        return out

    def chains(self, family: int, table: str) -> list[str]:
        """The names of a table's chains (none if the table is missing)."""
        return self._names(NFT_MSG_GETCHAIN, NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, family, table,
                           "chains")

    def sets(self, family: int, table: str) -> list[str]:
        """The names of a table's sets and maps (none if the table is missing)."""
        return self._names(NFT_MSG_GETSET, NFTA_SET_TABLE, NFTA_SET_NAME, family, table, "sets")

    def _names(self, msg: int, table_attr: int, name_attr: int, family: int, table: str,
               what: str) -> list[str]:
        query = _head(family) + nla_str(table_attr, table)
        out = []
        for _kind, body in self._dump(msg, query, f"list {what} of {table}"):
            a = attrs(body, _NFGEN.size)
            if cstr(a.get(table_attr, b"")) == table and name_attr in a:
                out.append(cstr(a[name_attr]))
        return out

    def elements(self, family: int, table: str, set_name: str) -> list[Element] | None:
        """Every element of a set or map; None if it does not exist."""
        query = (_head(family) + nla_str(NFTA_SET_ELEM_LIST_TABLE, table)
                 + nla_str(NFTA_SET_ELEM_LIST_SET, set_name))
        answers = get_or_none(self.sock, _nft(NFT_MSG_GETSETELEM), query,
                              f"list set {set_name}", missing=(errno.ENOENT,),
                              flags=NLM_F_DUMP)
        if answers is None:
            return None
        return self._parse_elements(answers)

    @staticmethod
    def _parse_elements(answers: list[tuple[int, memoryview]]) -> list[Element]:
        out = []
        for _kind, body in answers:
            a = attrs(body, _NFGEN.size)
            for kind, raw in attr_list(a.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
                if kind == NFTA_LIST_ELEM and (element := _element(raw)) is not None:
                    out.append(element)
        return out

    # -- conntrack --------------------------------------------------------------------------

    def flows(self, zone: int) -> list[Flow]:
        """The IPv4 conntrack entries of one zone (TCP, UDP and others, by original tuple)."""
        query = _head(socket.AF_INET) + nla(CTA_ZONE, _BE16.pack(zone))
        out = []
        for _kind, body in self.sock.dump(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET,
                                          query, f"list conntrack zone {zone}",
                                          flags=NLM_F_DUMP):
            a = attrs(body, _NFGEN.size)
            flow_zone = _BE16.unpack(a[CTA_ZONE])[0] if CTA_ZONE in a else 0
            if flow_zone != zone or CTA_TUPLE_ORIG not in a:
                continue
            tup = attrs(a[CTA_TUPLE_ORIG])
            ip = attrs(tup.get(CTA_TUPLE_IP, b""))
            proto = attrs(tup.get(CTA_TUPLE_PROTO, b""))
            if CTA_IP_V4_SRC not in ip or CTA_PROTO_NUM not in proto:
                continue
            out.append(Flow(
                proto[CTA_PROTO_NUM][0],
                socket.inet_ntoa(ip[CTA_IP_V4_SRC]), socket.inet_ntoa(ip[CTA_IP_V4_DST]),
                _BE16.unpack(proto[CTA_PROTO_SRC_PORT])[0] if CTA_PROTO_SRC_PORT in proto else 0,
                _BE16.unpack(proto[CTA_PROTO_DST_PORT])[0] if CTA_PROTO_DST_PORT in proto else 0,
                flow_zone))
        return out

    def forget(self, flows: list[Flow]) -> int:
        """Delete these conntrack entries (gone already: fine); how many were asked."""
        messages = []
        for f in flows:
            proto = nla(CTA_PROTO_NUM, bytes([f.proto]))
            if f.proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                proto += (nla(CTA_PROTO_SRC_PORT, _BE16.pack(f.sport))
                          + nla(CTA_PROTO_DST_PORT, _BE16.pack(f.dport)))
            tup = nest(CTA_TUPLE_ORIG,
                       nest(CTA_TUPLE_IP, nla(CTA_IP_V4_SRC, socket.inet_aton(f.src)),
                            nla(CTA_IP_V4_DST, socket.inet_aton(f.dst))),
                       nest(CTA_TUPLE_PROTO, proto))
            messages.append(Message(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE, 0,
                                    _head(socket.AF_INET) + tup
                                    + nla(CTA_ZONE, _BE16.pack(f.zone)),
                                    f"forget connection {f.src}:{f.sport} > {f.dst}:{f.dport}"))
        self.sock.write(messages, ignore=frozenset({errno.ENOENT}))
        return len(messages)
