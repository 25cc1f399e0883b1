"""Property tests of ``fold_message``: the pure function partition workers and replay share.

A generated *script* mixes stored commands (valid ones of every type, addressed to a small
pool of interacting entities, and invalid ones of many shapes) with *relay* steps that
deliver one pending follow-up command, as the outbox relay of the emitting partition
would: follow-ups from one partition keep their order, partitions interleave freely.
"Pokes" send valid commands to entities that exist when they run (agents' reports for the
current generation or a stale one, reconciler ticks, scaling, deletions), so that scripts
go deep into the lifecycles. The messages actually folded, in order, form the history
that replay and resume refold.
"""

import contextlib
import json
import re
import types
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from events.subjects import partition_of, stored_command_subject
from orchestrator.deciders import DECIDERS, STATE_TYPES
from orchestrator.deciders.instance import Instance
from orchestrator.deciders.lb import LoadBalancer, lagging
from orchestrator.deciders.network import Network
from orchestrator.deciders.scheduler import Scheduler, held
from orchestrator.fold import INTERNAL_ERROR, Folded, Key, fold_message, job_subject
from schemas.codec import FLAVORS, MAX_COMMAND_BYTES, CommandError, decode_command, encode
from schemas.commands import COMMAND_TYPES, REGISTRY_ID, SCHEDULER_ID, Command, SourceClass
from schemas.ids import is_valid_id

PARTITIONS = 4
HOSTS = ("h0", "h1", "h2")
# i0..i5, plus the ids pools p0/p1 give their first members, so that users and pools collide.
INSTANCES = ("i0", "i1", "i2", "i3", "i4", "i5", "p0-0", "p0-1", "p1-0")
NETWORKS = ("n0", "n1")
POOLS = ("p0", "p1")
LBS = ("l0", "l1")
VTEPS = ("192.0.2.1", "192.0.2.2")
# The answers a rejection may carry (to whoever asked).
REFUSALS = {"NicRefused", "VniRefused", "LbPortRefused", "PoolRefused", "MigrationRefused"}
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")
IDS: dict[str, tuple[str, ...]] = {
    "host": HOSTS,
    "instance": INSTANCES,
    "network": NETWORKS,
    "pool": POOLS,
    "lb": LBS,
    "scheduler": (SCHEDULER_ID,),
    "registry": (REGISTRY_ID,),
}
SOURCES = ("user", "admin", "system", *HOSTS)
KEY_SCHEDULER: Key = ("scheduler", SCHEDULER_ID)

PROPERTY_SETTINGS = settings(
    max_examples=200,
    database=None,  # no .hypothesis directory: examples are cheap to find again
    deadline=None,
    # No explain phase: it traces every line, which on Python 3.11 turns a failure found
    # in seconds into a timeout that hides it.
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def at_of(seq: int) -> int:
    return 1_700_000_000_000 + 1000 * seq


def subject_for(source: str, kind: str, id_: str) -> str:
    return stored_command_subject(partition_of(kind, id_, PARTITIONS), source, kind, id_)


# ---- valid command bodies ------------------------------------------------------------

Doc = dict[str, Any]

cpus = st.sampled_from([1, 2, 4, 8])
memory = st.sampled_from([256, 1024, 2048, 4096])
small_cpus = st.sampled_from([1, 2, 4])
small_memory = st.sampled_from([64, 512, 1024, 2048])
generation = st.integers(0, 5)
tickets = st.integers(0, 40)  # a migration's ticket is its MigrateInstance's seq
images = st.sampled_from(["debian-12", "alpine:3.19"])
networks = st.sampled_from(NETWORKS)
owners = st.sampled_from(["instance", "lb"])

templates: st.SearchStrategy[Doc] = st.fixed_dictionaries(
    {"vcpus": small_cpus, "memory_mib": small_memory, "image": images},
    optional={
        "nics": st.lists(
            st.fixed_dictionaries({"network": networks}, optional={"ip": st.just("10.0.0.9")}),
            max_size=2, unique_by=lambda nic: nic["network"],
        ),
        "rules": st.lists(
            st.fixed_dictionaries({"protocol": st.sampled_from(["tcp", "udp"]),
                                   "port": st.sampled_from([22, 80, 443])}),
            max_size=1,
        ),
    },
)
services = st.lists(
    st.fixed_dictionaries(
        {"port": st.sampled_from([80, 443]), "target_port": st.sampled_from([8080, 8443])},
        optional={"strategy": st.sampled_from(["round_robin", "least_conn"])},
    ),
    min_size=1, max_size=2,
)


def fields(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[Doc]:
    return st.fixed_dictionaries(strategies)


FIELDS: dict[str, st.SearchStrategy[Doc]] = {
    "RegisterHost": st.fixed_dictionaries(
        {"vcpus": cpus, "memory_mib": memory},
        optional={"role": st.sampled_from(["hypervisor", "lb"]), "v": st.sampled_from([1, 2])}),
    "SetHostCondition": fields(condition=st.sampled_from(["up", "draining", "maintenance"])),
    "HostDown": fields(boot_id=st.sampled_from(["", "b1", "b2"])),
    "HostUp": st.fixed_dictionaries(
        {"boot_id": st.sampled_from(["", "b1", "b2"])},
        optional={"underlay": st.sampled_from(VTEPS), "v": st.sampled_from([1, 2])}),
    "CreateInstance": st.fixed_dictionaries(
        {"template": templates},
        optional={"power": st.sampled_from(["running", "stopped"]),
                  "pool": st.sampled_from(POOLS), "v": st.just(2)},
    ),
    "StartInstance": fields(),
    "StopInstance": fields(),
    "DeleteInstance": fields(),
    "SetRules": fields(rules=st.lists(st.fixed_dictionaries(
        {"protocol": st.sampled_from(["tcp", "udp"]), "port": st.sampled_from([22, 8080])}),
        max_size=2)),
    "AttachPort": st.fixed_dictionaries(
        {"instance": st.sampled_from(INSTANCES), "index": st.integers(0, 1),
         "mac": st.sampled_from(MACS)},
        optional={"ip": st.sampled_from(["10.0.0.2", "10.0.0.7", "10.1.0.300"]),
                  "owner": owners}),
    "BindPort": st.fixed_dictionaries(
        {"instance": st.sampled_from(INSTANCES + LBS), "host": st.sampled_from(HOSTS)},
        optional={"owner": owners, "index": st.integers(0, 1), "incoming": st.booleans()}),
    "DetachPort": st.fixed_dictionaries({"instance": st.sampled_from(INSTANCES + LBS)},
                                        optional={"owner": owners}),
    "VniGranted": fields(),
    "VniRefused": fields(reason=st.just("VNI 1 is in use by network n1")),
    "HostVtep": fields(host=st.sampled_from(HOSTS), vtep=st.sampled_from(VTEPS)),
    "NetworkApplied": fields(generation=generation, observed=st.just("up")),
    "NetworkFailed": fields(generation=generation, error=st.just("EEXIST")),
    "ReconcileNetwork": fields(generation=generation, max_attempts=st.integers(0, 3)),
    "NicAddressed": fields(index=st.integers(0, 1), network=st.sampled_from(NETWORKS),
                           vni=st.integers(1, 3), mac=st.sampled_from(MACS),
                           ip=st.sampled_from(["10.0.0.2", "10.1.0.3"]), prefix=st.just(24),
                           mtu=st.just(1500)),
    "NicRefused": fields(index=st.integers(0, 1), network=st.sampled_from(NETWORKS),
                         reason=st.just("no network n0")),
    "ReserveVni": fields(vni=st.integers(1, 3), network=st.sampled_from(NETWORKS)),
    "ReleaseVni": fields(vni=st.integers(1, 3), network=st.sampled_from(NETWORKS)),
    "SpanNetwork": fields(network=st.sampled_from(NETWORKS)),
    "UnspanNetwork": fields(network=st.sampled_from(NETWORKS)),
    "Placed": fields(host=st.sampled_from(HOSTS)),
    "PlacementFailed": fields(reason=st.sampled_from(["full", "no host"])),
    "Applied": fields(generation=generation, observed=st.sampled_from(
        ["running", "stopped", "incoming", "migrated", "absent"])),
    "MigrateInstance": st.fixed_dictionaries(
        {}, optional={"to": st.sampled_from(HOSTS), "deadline_ms": st.just(5000)}),
    "AbortMigration": st.fixed_dictionaries({}, optional={"reason": st.just("operator")}),
    "MigrationReserved": fields(ticket=tickets, host=st.sampled_from(HOSTS),
                                address=st.sampled_from(VTEPS)),
    "MigrationRefused": fields(ticket=tickets, reason=st.just("host h1 is down")),
    "MigrationQueued": fields(ticket=tickets,
                              reason=st.just("queued: 2 migrations out of h0 already")),
    "MigrationProgress": fields(generation=generation, processed_mib=st.integers(0, 80),
                                remaining_mib=st.integers(0, 80)),
    "ReserveMove": st.fixed_dictionaries(
        {"instance": st.sampled_from(INSTANCES), "ticket": tickets,
         "source": st.sampled_from(HOSTS), "vcpus": small_cpus, "memory_mib": small_memory},
        optional={"to": st.sampled_from(HOSTS), "wait": st.booleans()}),
    "EndMove": fields(instance=st.sampled_from(INSTANCES), ticket=tickets, moved=st.booleans()),
    "MoveSwitched": fields(instance=st.sampled_from(INSTANCES), ticket=tickets),
    "SetMigrationLimit": fields(limit=st.integers(1, 3)),
    "EvacuateHost": fields(),
    "Evacuate": fields(host=st.sampled_from(HOSTS)),
    "Rehome": fields(host=st.one_of(st.none(), st.sampled_from(HOSTS)),
                     reason=st.just("its host was evacuated")),
    "Reconcile": fields(generation=generation, max_attempts=st.integers(0, 3)),
    "Failed": st.fixed_dictionaries(
        {"generation": generation, "error": st.just("qemu exited")},
        optional={"attempt": st.integers(1, 3)},
    ),
    "CreateNetwork": fields(vni=st.integers(1, 3),
                            cidr=st.sampled_from(["10.0.0.0/24", "10.1.0.0/24"])),
    "DeleteNetwork": fields(),
    "JoinNetwork": fields(instance=st.sampled_from(INSTANCES)),
    "LeaveNetwork": fields(instance=st.sampled_from(INSTANCES)),
    "CreatePool": fields(template=templates, size=st.integers(0, 3)),
    "ScalePool": fields(size=st.integers(0, 4)),
    "DeletePool": fields(),
    "AttachBalancer": fields(lb=st.sampled_from(LBS)),
    "DetachBalancer": fields(lb=st.sampled_from(LBS)),
    "CreateLoadBalancer": fields(vip=st.just("192.0.2.10"), pool=st.sampled_from(POOLS),
                                 services=services),
    "DeleteLoadBalancer": fields(),
    "PoolMembers": fields(members=st.lists(st.sampled_from(INSTANCES), max_size=3,
                                           unique=True)),
    "PoolBackends": fields(network=st.one_of(st.none(), st.sampled_from(NETWORKS)),
                           backends=st.lists(st.tuples(st.sampled_from(INSTANCES),
                                                       st.sampled_from(["10.0.0.2", "10.0.0.3"])),
                                             max_size=3, unique_by=lambda m: m[0])),
    "PoolRefused": fields(reason=st.just("no pool p0")),
    "BalancerPlaced": st.fixed_dictionaries(
        {"nodes": st.lists(st.sampled_from(HOSTS), max_size=2, unique=True)},
        optional={"reason": st.just("waiting for another")}),
    "LbPortAddressed": fields(index=st.integers(0, 1), network=st.sampled_from(NETWORKS),
                              vni=st.integers(1, 3), mac=st.sampled_from(MACS),
                              ip=st.sampled_from(["10.0.0.5", "192.0.2.9"]), prefix=st.just(24),
                              mtu=st.just(1500)),
    "LbPortRefused": fields(index=st.integers(0, 1), network=st.sampled_from(NETWORKS),
                            reason=st.just("no address left")),
    "MemberState": st.fixed_dictionaries(
        {"instance": st.sampled_from(INSTANCES), "serving": st.booleans()},
        optional={"leaving": st.booleans(), "ip": st.sampled_from(["10.0.0.2", "10.0.0.3"])}),
    "BalancerDrained": fields(lb=st.sampled_from(LBS), instance=st.sampled_from(INSTANCES)),
    "MemberDrained": fields(),
    "LbNode": fields(host=st.sampled_from(HOSTS),
                     condition=st.sampled_from(["up", "up", "down", "draining"])),
    "PlaceBalancer": fields(lb=st.sampled_from(LBS)),
    "ReleaseBalancer": fields(lb=st.sampled_from(LBS)),
    "LbApplied": fields(generation=generation, observed=st.just("serving")),
    "LbFailed": fields(generation=generation, error=st.just("bird: no such file")),
    "ReconcileLb": fields(generation=generation, max_attempts=st.integers(0, 3)),
    "DrainTick": fields(),
    "BackendHealth": fields(instance=st.sampled_from(INSTANCES), port=st.sampled_from([80, 443]),
                            healthy=st.booleans(), generation=generation),
    "HostCapacity": st.fixed_dictionaries(
        {"host": st.sampled_from(HOSTS), "vcpus": cpus, "memory_mib": memory,
         "condition": st.sampled_from(["up", "up", "down", "draining"])},
        optional={"underlay": st.sampled_from(VTEPS)}),
    "Place": fields(instance=st.sampled_from(INSTANCES), vcpus=small_cpus,
                    memory_mib=small_memory),
    "Release": fields(instance=st.sampled_from(INSTANCES)),
}
# Creations weigh more, so that the entities other commands address tend to exist.
TYPE_CHOICES = [
    *sorted(COMMAND_TYPES),
    "RegisterHost", "RegisterHost", "CreateInstance", "CreateInstance", "CreateNetwork",
    "CreatePool", "CreateLoadBalancer", "StopInstance", "DeleteInstance",
]


def names_of(source_class: SourceClass) -> tuple[str, ...]:
    return HOSTS if source_class == "host" else (source_class,)


@dataclass
class Parts:
    """One command before encoding: who sends it, to which entity, with which body."""

    source: str
    kind: str
    id: str
    doc: Doc

    def subject(self) -> str:
        return subject_for(self.source, self.kind, self.id)


CREATIONS = ["RegisterHost", "CreateNetwork", "CreatePool", "CreateLoadBalancer",
             "CreateInstance"]


@st.composite
def valid_parts(draw: st.DrawFn, types: list[str] = TYPE_CHOICES,
                any_source: bool = True) -> Parts:
    type_ = draw(st.sampled_from(types))
    cls = COMMAND_TYPES[type_]
    allowed = [name for sc in cls.sources for name in names_of(sc)]
    # Mostly an allowed source; sometimes any plausible one (which may be refused).
    sources = st.sampled_from(allowed)
    source = draw(st.one_of(sources, st.sampled_from(SOURCES)) if any_source else sources)
    id_ = draw(st.sampled_from(IDS[cls.kind]))
    doc: Doc = {"type": type_, "cmd_id": f"c-{draw(st.integers(0, 20))}", "id": id_}
    doc.update(draw(FIELDS[type_]))
    return Parts(source, cls.kind, id_, doc)


@st.composite
def v1_create_instance(draw: st.DrawFn) -> tuple[str, bytes]:
    """The old CreateInstance that named a flavour, sometimes ill-typed."""
    id_ = draw(st.sampled_from(INSTANCES))
    doc: Doc = {
        "type": "CreateInstance", "v": 1, "cmd_id": f"v1-{id_}", "id": id_,
        "flavor": draw(st.sampled_from([*FLAVORS, "huge", ["medium"], {"a": 1}, None])),
        "image": draw(images),
        "networks": draw(st.one_of(st.lists(networks, max_size=2, unique=True),
                                   st.sampled_from(["n0", 5, None, {"n0": True}]))),
    }
    if draw(st.booleans()):
        del doc[draw(st.sampled_from(sorted(doc)))]
    source = draw(st.sampled_from(["user", "admin", "user", "h0"]))
    return subject_for(source, "instance", id_), encode(doc)


# ---- invalid messages ----------------------------------------------------------------

BAD_IDS = ["I0", "i 0", "i.0", "-i0", "", "x" * 64, "i*", ">", "é"]
BAD_VALUES: list[Any] = [None, -1, 0, "", "x y", [], {}, True, 10**30, 1.5]
BAD_SUBJECTS = [
    "cmd.0.user.instance", "cmd.0.user.instance.i0.x", "evt.instance.i0", "cmd", "",
    "job.h0.instance.i0", "cmd.x.user.instance.i0", "cmd.-1.user.instance.i0",
    "cmd.00.user.instance.i0", "cmd..user.instance.i0",
]
GARBAGE = [b"", b"{", b"null", b"[]", b"1", b'"CreateInstance"', b'{"type":5}', b"\xff\xfe",
           b'{"type":"CreateInstance"', b'{"v":"1","type":"StartInstance"}']


@st.composite
def invalid_message(draw: st.DrawFn) -> tuple[str, bytes]:
    p = draw(valid_parts())
    doc, subject = p.doc, p.subject()
    how = draw(st.sampled_from([
        "garbage", "binary", "unknown_type", "missing_field", "bad_value", "bad_template",
        "wrong_version", "oversize", "wrong_partition", "id_mismatch", "other_kind_body",
        "bad_body_id", "bad_subject_id", "bad_source", "unknown_kind", "bad_subject",
    ]))
    match how:
        case "garbage":
            return subject, draw(st.sampled_from(GARBAGE))
        case "binary":
            return subject, draw(st.binary(max_size=24))
        case "unknown_type":
            doc["type"] = draw(st.sampled_from(["Reboot", "createinstance", "", "Command"]))
        case "missing_field":
            del doc[draw(st.sampled_from(sorted(doc)))]
        case "bad_value":
            doc[draw(st.sampled_from(sorted(doc)))] = draw(st.sampled_from(BAD_VALUES))
        case "bad_template":
            if "template" in doc:
                key = draw(st.sampled_from(["vcpus", "memory_mib", "image", "nics", "extra"]))
                doc["template"] = {**doc["template"], key: draw(st.sampled_from(BAD_VALUES))}
            else:
                doc["template"] = {"vcpus": 0}
        case "wrong_version":
            doc["v"] = draw(st.sampled_from([2, 3, -1, 99]))
        case "oversize":
            doc["pad"] = "x" * MAX_COMMAND_BYTES
        case "wrong_partition":
            right = partition_of(p.kind, p.id, PARTITIONS)
            wrong = (right + draw(st.integers(1, PARTITIONS - 1))) % PARTITIONS
            subject = stored_command_subject(wrong, p.source, p.kind, p.id)
        case "id_mismatch":
            doc["id"] = draw(st.sampled_from([i for ids in IDS.values() for i in ids]))
        case "other_kind_body":
            kind = draw(st.sampled_from(sorted(IDS)))
            subject = subject_for(p.source, kind, p.id)
        case "bad_body_id":
            doc["id"] = draw(st.sampled_from(BAD_IDS))
        case "bad_subject_id":
            bad = draw(st.sampled_from(BAD_IDS))
            subject = subject_for(p.source, p.kind, bad)
        case "bad_source":
            bad = draw(st.sampled_from(["User", "*", ">", "a b", "", "sys tem", "é"]))
            subject = subject_for(bad, p.kind, p.id)
        case "unknown_kind":
            kind = draw(st.sampled_from(["vm", "Host", "instances", "*", ""]))
            subject = stored_command_subject(0, p.source, kind, p.id)
        case "bad_subject":
            subject = draw(st.sampled_from(BAD_SUBJECTS))
    return subject, encode(doc)


@st.composite
def stored_message(draw: st.DrawFn) -> tuple[str, bytes]:
    mode = draw(st.integers(0, 9))  # shrinks towards valid commands
    if mode <= 6:
        p = draw(valid_parts())
        return p.subject(), encode(p.doc)
    if mode == 7:
        return draw(v1_create_instance())
    return draw(invalid_message())


@st.composite
def creation(draw: st.DrawFn) -> tuple[str, bytes]:
    p = draw(valid_parts(CREATIONS, any_source=False))
    return p.subject(), encode(p.doc)


@dataclass(frozen=True)
class Poke:
    """A valid command to an entity that exists when the step runs (picked by ``pick``).

    Agents' reports (Applied, Failed) and the reconciler's ticks (Reconcile) go to placed
    instances, from their host or from system, for the current generation less ``lag``
    (stale when positive, ahead when negative); people's commands go to any entity.
    """

    type: str
    pick: int
    lag: int


POKES = {
    "Applied": "instance", "Failed": "instance", "Reconcile": "instance",
    "StartInstance": "instance", "StopInstance": "instance", "DeleteInstance": "instance",
    "ScalePool": "pool", "DeletePool": "pool", "DeleteNetwork": "network",
    "DeleteLoadBalancer": "lb", "SetHostCondition": "host", "HostDown": "host",
    "HostUp": "host", "MigrateInstance": "instance", "AbortMigration": "instance",
    "EvacuateHost": "host",
}
REPORTS = ("Applied", "Failed", "Reconcile")


# A step is a stored message; an int: relay one pending follow-up, picked by that number;
# or a poke.
Step = tuple[str, bytes] | int | Poke
relay = st.integers(0, 7)
pokes = st.builds(Poke, st.sampled_from(sorted(POKES)), st.integers(0, 7),
                  st.sampled_from([0, 0, 1, 2, -1]))
# A live migration's steps need their agents' reports in turn: drawn more often.
migration_pokes = st.builds(
    Poke, st.sampled_from(["MigrateInstance", "Applied", "Applied", "Applied", "Failed",
                           "AbortMigration"]), st.integers(0, 7), st.sampled_from([0, 0, 2]))


@st.composite
def scripts(draw: st.DrawFn) -> list[Step]:
    """Some creations first (so that later commands find their entities), then anything."""
    setup = draw(st.lists(st.one_of(creation(), relay), min_size=4, max_size=20))
    rest = draw(st.lists(st.one_of(stored_message(), relay, relay, pokes, migration_pokes),
                         min_size=20, max_size=100))
    return setup + rest


# ---- running scripts -----------------------------------------------------------------

Snapshot = dict[Key, bytes]
Checker = Callable[[Snapshot, dict[Key, Any], str, Folded], None]
RELAY_BUDGET = 1000


def snapshot(states: dict[Key, Any]) -> Snapshot:
    return {key: msgspec.json.encode(state) for key, state in states.items()}


def relayed(cmd: Command) -> tuple[str, bytes]:
    """A follow-up as the relay publishes it (from system) and the stream stores it."""
    return subject_for("system", cmd.kind, cmd.id), encode(cmd)


def poke(step: Poke, states: dict[Key, Any]) -> tuple[str, bytes] | None:
    kind = POKES[step.type]
    keys = sorted(k for k, v in states.items() if k[0] == kind and (
        step.type not in REPORTS or v.host is not None))
    if not keys:
        return None
    key = keys[step.pick % len(keys)]
    doc: Doc = {"type": step.type, "cmd_id": f"poke-{step.pick}", "id": key[1]}
    source = next(s for sc in COMMAND_TYPES[step.type].sources for s in names_of(sc))
    if step.type in REPORTS:
        state: Instance = states[key]
        assert state.host is not None
        source = "system" if step.type == "Reconcile" else state.host
        doc["generation"] = max(0, state.generation - step.lag)
        doc.update({"Applied": {"observed": state.power}, "Failed": {"error": "boom"},
                    "Reconcile": {"max_attempts": 2}}[step.type])
        # A migration's reports: the destination ready or the guest arrived, the source
        # that it left, a removal applied.
        m, turn = state.migration, step.pick % 4
        if step.type != "Reconcile" and m is not None and m.dest and turn == 1:
            source = m.dest
            if step.type == "Applied":
                doc["observed"] = ("incoming", "running")[step.lag % 2]
        elif step.type == "Applied" and m is not None and turn == 2:
            doc["observed"] = "migrated"
        elif step.type == "Applied" and state.cleanup and turn == 3:
            source = sorted(state.cleanup)[step.lag % len(state.cleanup)]
            doc["observed"] = "absent"
    elif step.type == "ScalePool":
        doc["size"] = step.pick % 5
    elif step.type == "SetHostCondition":
        doc["condition"] = ("up", "draining", "maintenance")[step.pick % 3]
    elif step.type == "HostUp":  # with its underlay: the scheduler may migrate to it
        doc["boot_id"] = f"b{step.lag}"
        doc["underlay"] = VTEPS[step.pick % len(VTEPS)]
    return subject_for(source, *key), encode(doc)


@dataclass
class Run:
    states: dict[Key, Any]
    history: list[tuple[str, bytes]]
    results: list[Folded]
    undelivered: int


def simulate(script: list[Step], check: Checker | None = None) -> Run:
    states: dict[Key, Any] = {}
    pending: dict[int, deque[tuple[str, bytes]]] = {}
    history: list[tuple[str, bytes]] = []
    results: list[Folded] = []

    def fold(subject: str, data: bytes) -> None:
        seq = len(history) + 1
        before = snapshot(states) if check else {}
        f = fold_message(states, subject, data, seq, at_of(seq), PARTITIONS)
        history.append((subject, data))
        results.append(f)
        if check:
            check(before, states, subject, f)
        if f.commands:
            assert f.key is not None
            queue = pending.setdefault(partition_of(*f.key, PARTITIONS), deque())
            queue.extend(relayed(cmd) for cmd in f.commands)

    def queues() -> list[deque[tuple[str, bytes]]]:
        return [q for _, q in sorted(pending.items()) if q]

    for step in script:
        if isinstance(step, int):
            if ready := queues():
                fold(*ready[step % len(ready)].popleft())
        elif isinstance(step, Poke):
            if message := poke(step, states):
                fold(*message)
        else:
            fold(*step)
    budget = RELAY_BUDGET
    while budget and (ready := queues()):
        fold(*ready[0].popleft())
        budget -= 1
    return Run(states, history, results, sum(len(q) for q in pending.values()))


def replay(history: list[tuple[str, bytes]], states: dict[Key, Any] | None = None,
           first_seq: int = 1) -> tuple[dict[Key, Any], list[Folded]]:
    states = {} if states is None else states
    results = [fold_message(states, subject, data, seq, at_of(seq), PARTITIONS)
               for seq, (subject, data) in enumerate(history, first_seq)]
    return states, results


def summary(f: Folded) -> tuple[Any, ...]:
    """Everything a Folded carries, comparable (and readable when an assert shows it)."""
    return (
        f.seq, f.subject, f.key, f.dead_letter, f.changed,
        encode(f.outcome) if f.outcome is not None else None,
        tuple(encode(j) for j in f.jobs), tuple(encode(c) for c in f.commands),
    )


def reload(states: dict[Key, Any]) -> dict[Key, Any]:
    """States as a worker has them after loading them back from PostgreSQL."""
    return {key: msgspec.json.decode(encode(state), type=STATE_TYPES[key[0]])
            for key, state in states.items()}


# ---- per-step invariants -------------------------------------------------------------


def check_folded(before: Snapshot, states: dict[Key, Any], subject: str, f: Folded) -> None:
    """(d): each message gives an outcome, a dead letter without entity, or both."""
    after = snapshot(states)
    assert f.subject == subject
    if f.key is None:
        # Not addressed to any entity: only a dead letter, and nothing moves.
        assert f.dead_letter, f
        assert f.outcome is None and not f.changed and not f.jobs and not f.commands
        assert after == before
        return
    kind, id_ = f.key
    tokens = subject.split(".")
    assert (tokens[3], tokens[4]) == f.key and is_valid_id(id_)
    outcome = f.outcome
    assert outcome is not None, "a message addressed to an entity must reach its timeline"
    assert (outcome.seq, outcome.at, outcome.kind, outcome.id) == (f.seq, at_of(f.seq), kind, id_)
    assert outcome.source == tokens[2]
    if f.dead_letter is not None:  # undecodable or misaddressed: both, and a rejection
        assert f.dead_letter and not outcome.accepted and outcome.reason == f.dead_letter
    if not outcome.accepted:
        assert outcome.reason, "a rejection must say why"
        assert not f.changed and not f.jobs and (outcome.events, outcome.jobs) == ((), ())
        # Its only follow-ups answer who asked: a refused port tells its instance why.
        assert all(type(c).__name__ in REFUSALS for c in f.commands), f.commands
        assert outcome.commands == tuple(f"{c.kind}/{c.id}:{type(c).__name__}"
                                         for c in f.commands)
        assert f.dead_letter is None or not f.commands
        assert after == before, "a rejected command changed a state"
        return
    assert f.dead_letter is None
    assert outcome.type in COMMAND_TYPES and COMMAND_TYPES[outcome.type].kind == kind
    assert f.changed == bool(outcome.events)
    # Only the addressed entity may change, and only through events.
    assert {k: v for k, v in after.items() if k != f.key} == {
        k: v for k, v in before.items() if k != f.key}
    if f.changed:
        assert f.key in states
    else:
        assert after.get(f.key) == before.get(f.key), "state changed without an event"
    assert outcome.jobs == tuple(job_subject(j) for j in f.jobs)
    check_jobs(before, states, f)
    assert len(outcome.commands) == len(f.commands)
    for n, cmd in enumerate(f.commands):
        assert outcome.commands[n] == f"{cmd.kind}/{cmd.id}:{type(cmd).__name__}"
        assert cmd.cmd_id == f"fx-{f.seq}-{n}"
        assert "system" in type(cmd).sources, f"follow-up {cmd} would be refused"
        assert is_valid_id(cmd.id)
        assert decode_command(encode(cmd)) == cmd, "a follow-up must survive the wire"
    if f.key == KEY_SCHEDULER or kind in {"host", "instance"}:
        check_scheduler(before, states, f)


def check_jobs(before: Snapshot, states: dict[Key, Any], f: Folded) -> None:
    assert f.key is not None
    if f.key[0] == "network" and f.key in states:
        check_network_jobs(before, states, f)
        return
    if f.key[0] == "lb" and f.key in states:
        check_lb_jobs(before, states, f)
        return
    if f.key[0] == "host" and f.jobs:  # evacuated: its own job, to its agent
        (job,) = f.jobs
        assert (job.kind, job.id, job.host) == ("host", f.key[1], f.key[1])
        assert f.outcome is not None and "Evacuated" in f.outcome.events
        return
    if f.key[0] != "instance" or f.key not in states:
        assert not f.jobs
        return
    assert f.outcome is not None
    reissued = "Reissued" in f.outcome.events
    state: Instance = states[f.key]
    old = before.get(f.key)
    old_generation = msgspec.json.decode(old, type=Instance).generation if old else 0
    assert state.generation >= old_generation
    if not f.jobs:  # the host has nothing new to do, or there is no host yet
        assert state.host is None or (state.generation == old_generation and not reissued)
        return
    assert all(j.kind == "instance" and j.id == f.key[1] for j in f.jobs)
    hosts = [j.host for j in f.jobs]
    assert len(set(hosts)) == len(hosts), "one job per host"
    job, *others = f.jobs
    m = state.migration
    for other in others:  # a migration's destination, or a removal from a host it left
        assert other.generation == state.generation
        if other.spec is None:  # new in cleanup, or re-issued to a host in it
            assert other.host in state.cleanup, (other, state.cleanup)
            assert reissued or state.cleanup[other.host] > old_generation, (other, state.cleanup)
        else:
            assert m is not None and other.host == m.dest and other.spec.incoming
            assert (other.spec.template, other.spec.power) == (state.template, state.power)
    assert (job.kind, job.id, job.host) == ("instance", f.key[1], state.host)
    assert job.generation == state.generation
    assert job.generation > old_generation or reissued
    assert job.attempt == state.attempts
    if state.status == "deleted":
        assert job.spec is None
    else:
        assert job.spec is not None
        assert (job.spec.template, job.spec.power, job.spec.host) == (
            state.template, state.power, state.host)


def check_network_jobs(before: Snapshot, states: dict[Key, Any], f: Folded) -> None:
    """A network sends jobs only when some host's view changed (a new generation, to every
    host it spans, and removals to hosts it left) or to re-issue one to late hosts."""
    assert f.key is not None and f.outcome is not None
    state: Network = states[f.key]
    old = before.get(f.key)
    old_generation = msgspec.json.decode(old, type=Network).generation if old else 0
    assert state.generation >= old_generation
    hosts = {j.host for j in f.jobs}
    assert len(hosts) == len(f.jobs), "one job per host"
    assert all(j.kind == "network" and j.id == f.key[1] and j.generation == state.generation
               for j in f.jobs)
    if state.generation > old_generation:
        assert {j.host for j in f.jobs if j.spec is not None} == set(state.hosts)
        assert all(j.host not in state.hosts for j in f.jobs if j.spec is None)
    elif "Reissued" in f.outcome.events:
        assert all(j.attempt == state.attempts and j.spec is not None for j in f.jobs)
    else:
        assert not f.jobs


def check_lb_jobs(before: Snapshot, states: dict[Key, Any], f: Folded) -> None:
    """A balancer sends its nodes their full spec on each new generation (a removal when it
    is gone), a removal to each node it dropped, and re-issues only to nodes still late."""
    assert f.key is not None and f.outcome is not None
    state: LoadBalancer = states[f.key]
    old = before.get(f.key)
    old_generation = msgspec.json.decode(old, type=LoadBalancer).generation if old else 0
    assert state.generation >= old_generation
    hosts = [j.host for j in f.jobs]
    assert len(set(hosts)) == len(hosts), "one job per node"
    assert all(j.kind == "lb" and j.id == f.key[1] and j.generation == state.generation
               for j in f.jobs)
    gone = state.status in ("deleted", "failed")
    serving = {s.node for s in state.slots if s.node is not None and (s.port or gone)}
    if state.generation > old_generation:
        assert {j.host for j in f.jobs if j.spec is not None} == (set() if gone else serving)
        assert all(j.host not in serving or gone for j in f.jobs if j.spec is None)
        for j in f.jobs:
            if j.spec is not None:
                assert j.spec.seed == state.seed and j.spec.vip == state.vip
                assert {b.instance for b in j.spec.backends} == set(state.backends)
    elif "Reissued" in f.outcome.events:
        late = {state.slots[i].node for i in lagging(state)}
        assert set(hosts) <= late and all(j.attempt == state.attempts for j in f.jobs)
    else:
        assert not f.jobs


def check_scheduler(before: Snapshot, states: dict[Key, Any], f: Folded) -> None:
    """(e): usage is the sum of allocations; placing never overcommits a host.

    A host reporting less capacity than it already gives (re-registered smaller) is left
    overcommitted: that is the only way usage exceeds capacity (see test_deciders).
    """
    sched: Scheduler | None = states.get(KEY_SCHEDULER)
    if sched is None:
        return
    raw = before.get(KEY_SCHEDULER)
    old = msgspec.json.decode(raw, type=Scheduler) if raw else Scheduler()
    for name, slot in sched.hosts.items():
        # A running move holds its destination's capacity besides its source's; once it
        # has switched, the other way round.
        mine = [a for a in sched.allocations.values() if a.host == name] + [
            m for m in sched.moves if m.dest is not None and held(m) == name]
        assert slot.used_vcpus == sum(a.vcpus for a in mine) >= 0, (name, slot)
        assert slot.used_memory_mib == sum(a.memory_mib for a in mine) >= 0, (name, slot)
        over = slot.used_vcpus > slot.vcpus or slot.used_memory_mib > slot.memory_mib
        prev = old.hosts.get(name)
        if prev is None:
            assert not over, (name, slot)
            continue
        if slot.used_vcpus > prev.used_vcpus or slot.used_memory_mib > prev.used_memory_mib:
            assert not over, f"placing overcommitted {name}: {slot}"
        elif over:
            was_over = prev.used_vcpus > prev.vcpus or prev.used_memory_mib > prev.memory_mib
            shrank = slot.vcpus < prev.vcpus or slot.memory_mib < prev.memory_mib
            assert was_over or shrank, (name, prev, slot)
    for instance, alloc in sched.allocations.items():
        assert alloc.host in sched.hosts, (instance, alloc)
    waiting = [w.instance for w in sched.waiting]
    assert len(set(waiting)) == len(waiting), waiting
    assert not set(waiting) & set(sched.allocations), (waiting, sched.allocations)
    # Work-conserving: nothing waits that some schedulable host could take now.
    for req in sched.waiting:
        for name, slot in sched.hosts.items():
            fits = (slot.memory_mib - slot.used_memory_mib >= req.memory_mib
                    and slot.vcpus - slot.used_vcpus >= req.vcpus)
            assert slot.condition != "up" or not fits, f"{req} waits but fits on {name}"


# ---- properties ----------------------------------------------------------------------


def test_every_command_type_is_generated() -> None:
    assert set(FIELDS) == set(COMMAND_TYPES)
    assert set(TYPE_CHOICES) == set(COMMAND_TYPES)


@PROPERTY_SETTINGS
@given(valid_parts())
def test_generated_valid_commands_decode(p: Parts) -> None:
    cmd = decode_command(encode(p.doc))
    assert type(cmd).__name__ == p.doc["type"]
    assert (cmd.kind, cmd.id) == (p.kind, p.id)


@PROPERTY_SETTINGS
@given(scripts())
def test_fold_never_raises_and_each_message_is_accounted_for(script: list[Step]) -> None:
    """(a), (d), (e) at every step; and follow-up cascades end."""
    run = simulate(script, check=check_folded)
    assert run.undelivered == 0, "follow-ups kept cascading"
    assert len(run.results) == len(run.history) >= sum(isinstance(s, tuple) for s in script)
    # A worker persists the states of messages flagged changed: that must be all of them.
    flagged = {f.key for f in run.results if f.changed}
    assert flagged == set(run.states)


@PROPERTY_SETTINGS
@given(scripts())
def test_fold_is_deterministic(script: list[Step]) -> None:
    """(b): the same script folded into fresh dicts gives the same states and outcomes."""
    one, two = simulate(script), simulate(script)
    assert one.history == two.history
    assert [summary(f) for f in one.results] == [summary(f) for f in two.results]
    assert snapshot(one.states) == snapshot(two.states)


@PROPERTY_SETTINGS
@given(scripts(), st.data())
def test_replay_and_resume_reproduce_the_fold(script: list[Step], data: st.DataObject) -> None:
    """(c): refolding the history from empty, or from a reloaded checkpoint, agrees."""
    run = simulate(script)
    expected_results = [summary(f) for f in run.results]
    expected_states = snapshot(run.states)

    states, results = replay(run.history)
    assert [summary(f) for f in results] == expected_results
    assert snapshot(states) == expected_states

    cut = data.draw(st.integers(0, len(run.history)), label="checkpoint")
    head_states, head = replay(run.history[:cut])
    resumed = reload(head_states)
    assert snapshot(resumed) == snapshot(head_states), "a state did not survive JSON"
    tail_states, tail = replay(run.history[cut:], resumed, first_seq=cut + 1)
    assert [summary(f) for f in head + tail] == expected_results
    assert snapshot(tail_states) == expected_states


# ---- hostile input: bytes, encodings, nesting, numbers, types, versions ----------------
#
# A hostile client writes JSON by hand. Documents are built here as trees that say exactly
# which bytes go out: Raw inserts its bytes as they are (invalid UTF-8, NaN, 1e400, a
# nesting thousands deep), Pairs is an object that may give a key twice.


@dataclass(frozen=True)
class Raw:
    text: bytes


class Pairs(list[tuple[Any, Any]]):
    """An object as its (key, value) pairs, a key given twice kept twice."""


def written(node: Any) -> bytes:
    match node:
        case Raw():
            return node.text
        case dict():
            return written(Pairs(node.items()))
        case Pairs():
            return b"{" + b",".join(written(k) + b":" + written(v) for k, v in node) + b"}"
        case list() | tuple():
            return b"[" + b",".join(written(v) for v in node) + b"]"
    return json.dumps(node).encode()


def as_pairs(node: Any) -> Any:
    if isinstance(node, dict):
        return Pairs((k, as_pairs(v)) for k, v in node.items())
    if isinstance(node, list | tuple):
        return [as_pairs(v) for v in node]
    return node


Path = tuple[int, ...]  # indices: of a pair in an object, of an item in an array


def paths(node: Any, path: Path = ()) -> list[tuple[Path, Any]]:
    """Every value of a tree (not the root), with its path."""
    found: list[tuple[Path, Any]] = []
    items = [v for _, v in node] if isinstance(node, Pairs) else node
    if isinstance(node, Pairs | list):
        for n, value in enumerate(items):
            found.append(((*path, n), value))
            found.extend(paths(value, (*path, n)))
    return found


def objects(node: Any) -> list[Pairs]:
    found = [node] if isinstance(node, Pairs) else []
    return found + [v for _, v in paths(node) if isinstance(v, Pairs)]


def replace(node: Any, path: Path, value: Any) -> None:
    *parents, last = path
    for n in parents:
        node = node[n][1] if isinstance(node, Pairs) else node[n]
    if isinstance(node, Pairs):
        node[last] = (node[last][0], value)
    else:
        node[last] = value


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]
NUMBERS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"-0",
           str(10**30).encode(), str(-(10**30)).encode(), str(2**63).encode(),
           str(2**64).encode(), b"9" * 5000, b"1.5", b"0.0", b"1E2"]
NOT_JSON = {b"NaN", b"Infinity", b"-Infinity"}
WRONG_TYPES: list[Any] = [None, True, False, 0, -1, "", "x", [], {}, [1], {"a": 1}, 1.5]
VERSION_TOKENS: list[Any] = [0, -1, 99, 3, "1", "2", True, False, None, 1.5, [], {}, 2**64]
NESTING_DEPTH = st.sampled_from([200, 1_000, 5_000, 20_000])


def nesting(depth: int, arrays: bool) -> Raw:
    if arrays:
        return Raw(b"[" * depth + b"]" * depth)
    return Raw(b'{"a":' * depth + b"1" + b"}" * depth)


@dataclass
class Hostile:
    subject: str
    data: bytes
    how: str
    # The message must be refused, and its reason must hold this (empty: any reason).
    refused: str | None


def command_objects() -> list[mi.StructType]:
    """Every kind of object a command can hold, commands included."""
    seen: dict[type, mi.StructType] = {}

    def visit(t: mi.Type) -> None:
        match t:
            case mi.StructType(cls=cls) if cls not in seen:
                seen[cls] = t
                for f in t.fields:
                    visit(f.type)
            case mi.UnionType():
                for u in t.types:
                    visit(u)
            case mi.ListType() | mi.VarTupleType() | mi.SetType() | mi.FrozenSetType():
                visit(t.item_type)
            case mi.TupleType():
                for u in t.item_types:
                    visit(u)
            case mi.DictType() | mi.AnyType():
                raise AssertionError(f"{t}: a free-form object in a command")

    for cls in COMMAND_TYPES.values():
        visit(mi.type_info(cls))
    return list(seen.values())


# A name absent from a document can still be a field of its object (an optional one, or
# the version `v`): an "unknown" field is none of these.
FIELD_NAMES = frozenset(f.encode_name for t in command_objects() for f in t.fields)


@st.composite
def hostile_message(draw: st.DrawFn) -> Hostile:
    p = draw(valid_parts(any_source=False))
    doc = as_pairs(p.doc)
    nodes = paths(doc)
    strings = [(path, v) for path, v in nodes if isinstance(v, str)]
    keyed = objects(doc)
    how = draw(st.sampled_from(["utf8_value", "utf8_key", "nesting", "unknown_field",
                                "duplicate_field", "number", "wrong_type", "version"]))
    refused: str | None = ""
    match how:
        case "utf8_value":
            path, value = draw(st.sampled_from(strings))
            cut = draw(st.integers(0, len(value)))
            bad = draw(st.sampled_from(INVALID_UTF8))
            replace(doc, path, Raw(json.dumps(value[:cut]).encode()[:-1] + bad
                                   + json.dumps(value[cut:]).encode()[1:]))
        case "utf8_key":
            obj = draw(st.sampled_from(keyed))
            n = draw(st.integers(0, len(obj) - 1))
            key, value = obj[n]
            obj[n] = (Raw(b'"' + key.encode() + draw(st.sampled_from(INVALID_UTF8)) + b'"'),
                      value)
        case "nesting":
            deep = nesting(draw(NESTING_DEPTH), draw(st.booleans()))
            if draw(st.booleans()) or not nodes:
                draw(st.sampled_from(keyed)).append(("deep", deep))
            else:
                replace(doc, draw(st.sampled_from(nodes))[0], deep)
        case "unknown_field":
            obj = draw(st.sampled_from(keyed))
            known = [k for k, _ in obj]
            name = draw(st.one_of(
                st.sampled_from([k + "x" for k in known] + [k[:-1] for k in known if len(k) > 1]
                                + ["powr", "extra", "Type", "ID", "_", "v2"]),
                st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)))
            while name in known or name in FIELD_NAMES:
                name += "_"
            obj.insert(draw(st.integers(0, len(obj))),
                       (name, draw(st.sampled_from(WRONG_TYPES))))
            refused = f"unknown field `{name}`"
        case "duplicate_field":
            obj = draw(st.sampled_from(keyed))
            key, value = draw(st.sampled_from(list(obj)))
            again = value if draw(st.booleans()) else as_pairs(
                draw(st.sampled_from(WRONG_TYPES)))
            obj.insert(draw(st.integers(0, len(obj))), (key, again))
            refused = key  # named, as a duplicate (or as ill-typed, if that one comes first)
        case "number":
            path, _ = draw(st.sampled_from(nodes))
            token = draw(st.sampled_from(NUMBERS))
            replace(doc, path, Raw(token))
            refused = "" if token in NOT_JSON else None  # 2**63 - 1 fits a generation
        case "wrong_type":
            path, _ = draw(st.sampled_from(nodes))
            replace(doc, path, as_pairs(draw(st.sampled_from(WRONG_TYPES))))
            refused = None  # null may be a valid pool, 0 a valid size
        case "version":
            token = draw(st.sampled_from(VERSION_TOKENS))
            top = [n for n, (k, _) in enumerate(doc) if k == "v"]
            if top:
                doc[top[0]] = ("v", token)
            else:
                doc.insert(draw(st.integers(0, len(doc))), ("v", token))
            refused = "`$.v`"
    return Hostile(p.subject(), written(doc), how, refused)


def check_hostile(h: Hostile, states: dict[Key, Any]) -> Folded:
    before = snapshot(states)
    f = fold_message(states, h.subject, h.data, 7, at_of(7), PARTITIONS)
    check_folded(before, states, h.subject, f)  # accounted for, and nothing half done
    if h.refused is not None:
        assert f.dead_letter is not None and f.outcome is not None, (h, f)
        assert not f.outcome.accepted and not f.internal_error, (h, f)
        assert h.refused in f.dead_letter, (h.refused, f.dead_letter)
        assert snapshot(states) == before
    return f


# Bytes anywhere, and bytes inside the strings of a command that is otherwise valid.
any_bytes = st.one_of(st.binary(max_size=512), st.builds(
    lambda a, b: b'{"type":"StartInstance","cmd_id":"' + a + b'","id":"i0' + b + b'"}',
    st.binary(min_size=1, max_size=16), st.binary(max_size=4)))


@PROPERTY_SETTINGS
@given(any_bytes, st.sampled_from([
    subject_for("user", "instance", "i0"), subject_for("h0", "instance", "i1"),
    subject_for("admin", "host", "h0"), subject_for("system", "scheduler", SCHEDULER_ID),
    "cmd.0.user.instance.*", "cmd.user.instance.>", "cmd.0.user.instance.I0", "",
]))
def test_fold_takes_arbitrary_bytes(data: bytes, subject: str) -> None:
    states: dict[Key, Any] = {}
    f = fold_message(states, subject, data, 1, at_of(1), PARTITIONS)
    check_folded({}, states, subject, f)
    assert not f.internal_error
    try:
        decode_command(data)
    except CommandError:
        assert f.dead_letter is not None
    # Else the bytes happened to spell a valid command (`"cmd_id":"0"`, say): folded like
    # one, which check_folded checked.


@PROPERTY_SETTINGS
@given(hostile_message(), st.data())
def test_fold_refuses_what_a_hostile_client_writes(h: Hostile, data: st.DataObject) -> None:
    """Into states where the entity may exist: a refusal changes nothing."""
    states: dict[Key, Any] = {}
    for step in data.draw(st.lists(creation(), max_size=6), label="existing"):
        fold_message(states, *step, 1, at_of(1), PARTITIONS)
    check_hostile(h, states)


@PROPERTY_SETTINGS
@given(st.sampled_from(sorted(COMMAND_TYPES)), st.sampled_from(VERSION_TOKENS))
def test_only_a_version_that_exists_is_read(type_: str, token: Any) -> None:
    """Absent, `v` is the current version; given, it must be one that exists (an older
    one is read by its upcaster: tests/test_deciders.py)."""
    with pytest.raises(CommandError, match=re.escape("`$.v`")):
        decode_command(written({"type": type_, "v": token, "cmd_id": "k", "id": "x0"}))


def test_every_object_of_a_command_refuses_unknown_fields() -> None:
    """Strictness everywhere: a Struct that let an unknown field through would also make
    a typo inside it pass for a default."""
    structs = command_objects()
    for t in structs:
        assert t.forbid_unknown_fields, f"{t.cls.__name__} lets unknown fields pass"
    assert {t.cls for t in structs} >= set(COMMAND_TYPES.values())


# ---- a decider that raises: a bug, an internal error, nothing half done ----------------
#
# A fake, named as such: a decider bug cannot be caused for real (there is none known).
# The real decider runs first, so evolve has updated the state in place when it raises.


class InjectedBug(Exception):
    def __init__(self, stage: str) -> None:
        # A memory address, as object reprs have: it must not reach the reason.
        super().__init__(f"{stage} failed on {object()!r}")


@contextlib.contextmanager
def buggy_deciders(fail_at: frozenset[int], stages: frozenset[str]) -> Iterator[None]:
    """Every decider raises at the n-th call (counted over all deciders and stages)."""
    calls = 0

    def wrap(real: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            result = real(*args)
            if stage in stages and calls in fail_at:
                raise InjectedBug(stage)
            return result
        return call

    saved = dict(DECIDERS)
    for kind, real in saved.items():
        fake = types.SimpleNamespace(**{name: getattr(real, name) for name in dir(real)
                                        if not name.startswith("__")})
        for stage in ("decide", "evolve", "jobs"):
            if hasattr(real, stage):
                setattr(fake, stage, wrap(getattr(real, stage), stage))
        DECIDERS[kind] = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        DECIDERS.update(saved)


failures = st.frozensets(st.integers(1, 300), min_size=1, max_size=30)
stage_sets = st.frozensets(st.sampled_from(["decide", "evolve", "jobs"]), min_size=1)


@PROPERTY_SETTINGS
@given(scripts(), failures, stage_sets)
def test_a_decider_that_raises_stops_nothing_and_replays_alike(
        script: list[Step], fail_at: frozenset[int], stages: frozenset[str]) -> None:
    with buggy_deciders(fail_at, stages):
        run = simulate(script, check=check_folded)
    bugs = [f for f in run.results if f.internal_error]
    for f in bugs:
        assert f.outcome is not None and f.dead_letter == f.outcome.reason
        assert f.dead_letter.startswith(INTERNAL_ERROR), f.dead_letter
        stage = f.dead_letter.removeprefix(INTERNAL_ERROR).split(":")[0]
        assert stage.split(".")[1] in stages, f.dead_letter
        assert "InjectedBug" in f.dead_letter and "0x" not in f.dead_letter
        assert "tests/test_fold_properties.py:" in f.dead_letter  # where it was raised
    # Replay is the same fold over the same history: the same bugs, the same states.
    with buggy_deciders(fail_at, stages):
        states, results = replay(run.history)
    assert [summary(f) for f in results] == [summary(f) for f in run.results]
    assert snapshot(states) == snapshot(run.states)


@pytest.mark.parametrize("kind", ["instance", "scheduler"])  # kept shallow, kept encoded
def test_evolve_that_raises_halfway_leaves_the_state_as_it_was(kind: str) -> None:
    states: dict[Key, Any] = {}
    creates = {"instance": ("user", {"type": "CreateInstance", "cmd_id": "c", "id": "i0",
                                     "template": {"vcpus": 1, "memory_mib": 64,
                                                  "image": "debian-12"}}),
               "scheduler": ("system", {"type": "HostCapacity", "cmd_id": "c",
                                        "id": SCHEDULER_ID, "host": "h0", "vcpus": 8,
                                        "memory_mib": 4096, "condition": "up"})}
    changes = {"instance": ("user", {"type": "StopInstance", "cmd_id": "s", "id": "i0"}),
               "scheduler": ("system", {"type": "HostCapacity", "cmd_id": "d",
                                        "id": SCHEDULER_ID, "host": "h1", "vcpus": 8,
                                        "memory_mib": 4096, "condition": "up"})}
    source, doc = creates[kind]
    key = (kind, doc["id"])
    assert fold_message(states, subject_for(source, *key), encode(doc), 1, 1, PARTITIONS
                        ).outcome.accepted  # type: ignore[union-attr]
    before = snapshot(states)
    source, doc = changes[kind]
    with buggy_deciders(frozenset({2}), frozenset({"evolve"})):  # 1: decide, 2: evolve
        f = fold_message(states, subject_for(source, *key), encode(doc), 2, 2, PARTITIONS)
    assert f.internal_error and f.outcome is not None and not f.outcome.accepted
    assert f.dead_letter is not None and f.dead_letter.startswith(
        f"{INTERNAL_ERROR}{kind}.evolve: InjectedBug: evolve failed on <object object>")
    assert snapshot(states) == before, "the half-evolved state was kept"
    # The same command, without the bug, is folded: the partition went on.
    f = fold_message(states, subject_for(source, *key), encode(doc), 3, 3, PARTITIONS)
    assert f.outcome is not None and f.outcome.accepted and f.changed


def test_a_scheduler_evolve_that_raises_halfway_leaves_its_allocations_as_they_were() -> None:
    """The scheduler keeps only the allocations its events name (its ``keep``): a placement
    and a release that raise once evolved leave them, and the hosts' usage, as they were."""
    states: dict[Key, Any] = {}
    subject = subject_for("system", "scheduler", SCHEDULER_ID)

    def doc(type_: str, cmd_id: str, **fields: Any) -> bytes:
        return encode({"type": type_, "cmd_id": cmd_id, "id": SCHEDULER_ID, **fields})

    place = {"vcpus": 1, "memory_mib": 64}
    host = doc("HostCapacity", "c", host="h0", vcpus=8, memory_mib=4096, condition="up")
    for seq, body in enumerate([host, doc("Place", "p0", instance="i0", **place)], 1):
        assert fold_message(states, subject, body, seq, seq, PARTITIONS).changed
    before = snapshot(states)
    for seq, body in enumerate([doc("Place", "p1", instance="i1", **place),
                                doc("Release", "r0", instance="i0")], 3):
        with buggy_deciders(frozenset({2}), frozenset({"evolve"})):  # 1: decide, 2: evolve
            f = fold_message(states, subject, body, seq, seq, PARTITIONS)
        assert f.internal_error, f.outcome
        assert snapshot(states) == before, "the half-evolved state was kept"
    assert fold_message(states, subject, doc("Place", "p1", instance="i1", **place), 5, 5,
                        PARTITIONS).changed
    state = states[("scheduler", SCHEDULER_ID)]
    assert sorted(state.allocations) == ["i0", "i1"] and state.hosts["h0"].used_vcpus == 2
