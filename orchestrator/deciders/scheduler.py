"""Placement: one entity owns every host's free capacity, so placements never race.

Instances ask it with ``Place`` and it answers with ``Placed``, or with ``PlacementFailed``
while it keeps the request waiting: capacity arriving later (a host registered or back up,
an instance released) places waiting requests first come, first served. The choice is
deterministic: most free memory, then most free vCPUs, then the host's name.

It also owns the LB nodes: each balancer is placed on two (`_replace_balancers`).

And live migrations' capacity (`ReserveMove`): a move holds its destination's capacity
besides its source's until it ends (`EndMove`), and at most ``migration_limit`` moves run
at once out of any host and into any host; the rest queue, first come, first served. A
host set draining asks each of its instances to move (`MigrateInstance` from the system),
and once nothing is left on it, sets it in maintenance. A destination that goes down aborts
the moves into it.
"""

from collections.abc import Callable

import msgspec

from orchestrator.deciders.base import Ctx, Decision, Event, accept, follow_ups, reject
from schemas import commands as c
from schemas.commands import SCHEDULER_ID
from schemas.specs import HostCondition


class Slot(msgspec.Struct, kw_only=True):
    vcpus: int
    memory_mib: int
    condition: HostCondition
    used_vcpus: int = 0
    used_memory_mib: int = 0
    underlay: str | None = None  # where a migration reaches it


class Allocation(msgspec.Struct, array_like=True, frozen=True):  # replaced, never changed
    host: str
    vcpus: int
    memory_mib: int


class Request(msgspec.Struct, array_like=True):
    instance: str
    vcpus: int
    memory_mib: int
    rehome: bool = False  # an evacuated instance's: answered with Rehome, not Placed


class Move(msgspec.Struct, array_like=True):
    """An instance moving off ``source``; ``dest`` is None while it queues."""

    instance: str
    ticket: int  # the migration asking (its MigrateInstance's seq)
    source: str
    to: str | None
    vcpus: int
    memory_mib: int
    wait: bool
    dest: str | None = None
    avoid: tuple[str, ...] = ()  # hosts that still hold a copy of it to remove
    switched: bool = False  # it runs on dest: its allocation is there, source held


def held(move: Move, moved: bool = False) -> str | None:
    """The host whose capacity the move holds besides the instance's allocation: the
    destination's reservation, or once it has switched (or is ending moved), the source."""
    return move.source if move.switched or moved else move.dest


DEFAULT_MIGRATION_LIMIT = 2


class Scheduler(msgspec.Struct, kw_only=True):
    hosts: dict[str, Slot] = {}
    allocations: dict[str, Allocation] = {}
    waiting: list[Request] = []
    # LB nodes: their condition, and the nodes of each balancer (two, or fewer while it
    # waits for a node; the waiting ones in the order they asked).
    lb_nodes: dict[str, HostCondition] = {}
    balancers: dict[str, list[str]] = {}
    moves: list[Move] = []  # running (dest set), then queued, each in the order asked
    migration_limit: int = DEFAULT_MIGRATION_LIMIT


class CapacitySet(Event):
    host: str
    vcpus: int
    memory_mib: int
    condition: HostCondition
    underlay: str | None = None


class Allocated(Event):
    instance: str
    host: str
    vcpus: int
    memory_mib: int
    rehome: bool = False


class Queued(Event):
    request: Request


class Freed(Event):
    instance: str


class LbNodeSet(Event):
    host: str
    condition: HostCondition


class BalancerNodes(Event):
    """The nodes of a balancer, as they are now (empty: it is no longer placed)."""

    lb: str
    nodes: tuple[str, ...]
    reason: str = ""


class BalancerReleased(Event):
    lb: str


class MoveQueued(Event):
    move: Move
    reason: str


class MoveStarted(Event):
    """The destination's capacity is held for the instance, besides its source's."""

    move: Move


class MoveSwitchedTo(Event):
    instance: str


class MoveEnded(Event):
    instance: str
    moved: bool  # the instance lives on the destination now: the source's capacity goes


class LimitSet(Event):
    limit: int


Free = dict[str, list[int]]  # host -> [free memory, free vCPUs], schedulable hosts only


def _free(hosts: dict[str, Slot]) -> Free:
    return {name: [s.memory_mib - s.used_memory_mib, s.vcpus - s.used_vcpus]
            for name, s in hosts.items() if s.condition == "up"}


def _choose(free: Free, req: Request) -> str | None:
    fits = [(-mem, -cpu, name) for name, (mem, cpu) in free.items()
            if mem >= req.memory_mib and cpu >= req.vcpus]
    return min(fits)[2] if fits else None


def _place(free: Free, requests: list[Request]) -> list[Allocated]:
    """Place what fits, in order, updating ``free`` as it goes."""
    placed = []
    for req in requests:
        host = _choose(free, req)
        if host is not None:
            free[host][0] -= req.memory_mib
            free[host][1] -= req.vcpus
            placed.append(Allocated(instance=req.instance, host=host, vcpus=req.vcpus,
                                    memory_mib=req.memory_mib, rehome=req.rehome))
    return placed


def _answer(ctx: Ctx, *events: Event, refused: tuple[Request, str] | None = None) -> Decision:
    placed = [(c.Rehome, dict(id=e.instance, host=e.host, reason="its host was evacuated"))
              if e.rehome else (c.Placed, dict(id=e.instance, host=e.host))
              for e in events if isinstance(e, Allocated)]
    failed = [(c.PlacementFailed, dict(id=refused[0].instance, reason=refused[1]))] \
        if refused else []
    return accept(*events, commands=follow_ups(ctx, *placed, *failed))


# ---- LB nodes: each balancer on two, spread by load -------------------------------------

NODES_PER_BALANCER = 2


def _waiting_reason(lb_nodes: dict[str, HostCondition], have: int) -> str:
    if have >= NODES_PER_BALANCER:
        return ""
    up = sum(1 for condition in lb_nodes.values() if condition == "up")
    return (f"on {have} of {NODES_PER_BALANCER} LB nodes: waiting for another"
            f" ({up} LB node{'s' if up != 1 else ''} up)")


def _replace_balancers(lb_nodes: dict[str, HostCondition], balancers: dict[str, list[str]],
                       asking: str | None = None) -> list[BalancerNodes]:
    """Every balancer whose nodes change: a node that is not up is dropped, and a balancer
    short of nodes takes the least loaded up nodes it does not have (then by name), in the
    order the balancers asked. A first placement takes two nodes or waits for them; a
    balancer that lost one keeps serving on the other meanwhile. Deterministic."""
    up = {n for n, condition in lb_nodes.items() if condition == "up"}
    now = {lb: [n for n in nodes if n in up] for lb, nodes in balancers.items()}
    load = {n: 0 for n in up}
    for nodes in now.values():
        for n in nodes:
            load[n] += 1
    changed: list[BalancerNodes] = []
    for lb, nodes in now.items():
        free = sorted((load[n], n) for n in up if n not in nodes)
        need = NODES_PER_BALANCER - len(nodes)
        if nodes or len(free) >= need:  # a first placement needs both at once
            for _, n in free[:need]:
                nodes.append(n)
                load[n] += 1
        if nodes != balancers[lb] or lb == asking:
            changed.append(BalancerNodes(lb=lb, nodes=tuple(nodes),
                                         reason=_waiting_reason(lb_nodes, len(nodes))))
    return changed


def _balancers_answer(ctx: Ctx, *events: Event) -> Decision:
    return accept(*events, commands=follow_ups(ctx, *[
        (c.BalancerPlaced, dict(id=e.lb, nodes=e.nodes, reason=e.reason))
        for e in events if isinstance(e, BalancerNodes)]))


# ---- live migrations: a destination's capacity held, within the limit per host --------


def _fits(free: Free, host: str, vcpus: int, memory_mib: int) -> bool:
    return host in free and free[host][0] >= memory_mib and free[host][1] >= vcpus


def _counts(moves: list[Move]) -> tuple[dict[str, int], dict[str, int]]:
    """Running moves out of and into each host."""
    out: dict[str, int] = {}
    into: dict[str, int] = {}
    for m in moves:
        if m.dest is not None:  # reserved, until the source is clean
            out[m.source] = out.get(m.source, 0) + 1
            into[m.dest] = into.get(m.dest, 0) + 1
    return out, into


def _destination(state: Scheduler, free: Free, out: dict[str, int], into: dict[str, int],
                 move: Move) -> tuple[str | None, str]:
    """Where the move can go now (the best fit, as for placement), or why it waits."""
    limit = state.migration_limit
    if out.get(move.source, 0) >= limit:
        return None, f"{limit} migrations out of {move.source} already (the limit)"
    names = [move.to] if move.to else [h for h in free
                                        if h != move.source and h not in move.avoid]
    fits = [(-free[h][0], -free[h][1], h) for h in names
            if _fits(free, h, move.vcpus, move.memory_mib) and state.hosts[h].underlay]
    if not fits:
        where = f"host {move.to} has not" if move.to else "no other host has"
        return None, f"{where} {move.vcpus} vCPUs and {move.memory_mib} MiB free"
    room = [f for f in fits if into.get(f[2], 0) < limit]
    if not room:
        return None, f"{limit} migrations into {fits[0][2]} already (the limit)"
    return min(room)[2], ""


def _start(state: Scheduler, free: Free, ended: set[str]) -> list[MoveStarted]:
    """Queued moves that can start now, in the order asked (``free`` and the counts are
    updated as each starts; ``ended``: moves this decision ends)."""
    live = [m for m in state.moves if m.instance not in ended]
    out, into = _counts(live)
    started = []
    for m in live:
        if m.dest is not None:
            continue
        dest, _ = _destination(state, free, out, into, m)
        if dest is not None:
            free[dest][0] -= m.memory_mib
            free[dest][1] -= m.vcpus
            out[m.source] = out.get(m.source, 0) + 1
            into[dest] = into.get(dest, 0) + 1
            started.append(MoveStarted(move=msgspec.structs.replace(m, dest=dest)))
    return started


def _refusal(state: Scheduler, cmd: c.ReserveMove, free: Free) -> str | None:
    """Why a move to the host asked for can never be: a clear reason, or None."""
    if cmd.to is None:
        return None
    if cmd.to == cmd.source:
        return f"instance {cmd.instance} is on {cmd.to} already"
    if cmd.to in cmd.avoid:
        return f"host {cmd.to} has not removed an earlier copy of {cmd.instance} yet"
    if cmd.to in state.lb_nodes:
        return f"host {cmd.to} is an LB node: instances do not run there"
    slot = state.hosts.get(cmd.to)
    if slot is None:
        return f"no host {cmd.to}"
    if slot.condition != "up":
        return f"host {cmd.to} is {slot.condition}"
    if not slot.underlay:
        return f"host {cmd.to} has not reported its underlay address (is its agent up?)"
    if not cmd.wait and not _fits(free, cmd.to, cmd.vcpus, cmd.memory_mib):
        mem, cpu = free[cmd.to]
        return f"host {cmd.to} has {cpu} vCPUs and {mem} MiB free, not {cmd.vcpus} and" \
            f" {cmd.memory_mib}"
    return None


def _reserve(state: Scheduler, cmd: c.ReserveMove, ctx: Ctx) -> Decision:
    held = next((m for m in state.moves if m.instance == cmd.instance), None)
    if held is not None and held.ticket == cmd.ticket:  # asked twice: answer the same
        return accept(commands=_move_answers(ctx, state, [MoveStarted(move=held)])
                      if held.dest else [])
    if held is not None:  # an earlier migration's, whose end is not heard yet: it goes
        return reject(f"instance {cmd.instance} still holds the move of migration"
                      f" {held.ticket}", commands=follow_ups(ctx, (c.MigrationRefused, dict(
                          id=cmd.instance, ticket=cmd.ticket,
                          reason=f"its previous migration ({held.ticket}) has not ended"))))
    free = _free(state.hosts)
    reason = _refusal(state, cmd, free)
    if reason is not None:
        return reject(reason, commands=follow_ups(ctx, (c.MigrationRefused, dict(
            id=cmd.instance, ticket=cmd.ticket, reason=reason))))
    move = Move(cmd.instance, cmd.ticket, cmd.source, cmd.to, cmd.vcpus, cmd.memory_mib,
                cmd.wait, avoid=cmd.avoid)
    out, into = _counts(state.moves)
    dest, why = _destination(state, free, out, into, move)
    if dest is not None:
        started = MoveStarted(move=msgspec.structs.replace(move, dest=dest))
        return accept(started, commands=_move_answers(ctx, state, [started]))
    no_room = not any(_fits(free, h, cmd.vcpus, cmd.memory_mib)
                      for h in ([cmd.to] if cmd.to else free)
                      if h != cmd.source and h not in cmd.avoid)
    if no_room and not cmd.wait:
        return reject(why, commands=follow_ups(ctx, (c.MigrationRefused, dict(
            id=cmd.instance, ticket=cmd.ticket, reason=why))))
    return accept(MoveQueued(move=move, reason=why), commands=follow_ups(
        ctx, (c.MigrationQueued, dict(id=cmd.instance, ticket=cmd.ticket,
                                      reason=f"queued: {why}"))))


def _move_answers(ctx: Ctx, state: Scheduler, started: list[MoveStarted],
                  start: int = 0) -> list[c.Command]:
    return follow_ups(ctx, *[(c.MigrationReserved, dict(
        id=e.move.instance, ticket=e.move.ticket, host=e.move.dest,
        address=state.hosts[e.move.dest or ""].underlay)) for e in started], start=start)


def _drained(state: Scheduler, gone: set[str], ended: set[str]) -> list[str]:
    """Draining hosts left with nothing on them (``gone``: instances leaving now;
    ``ended``: moves ending now)."""
    draining = {h for h, s in state.hosts.items() if s.condition == "draining"}
    if not draining:
        return []
    busy = {a.host for i, a in state.allocations.items() if i not in gone}
    busy |= {held(m) for m in state.moves if m.dest and m.instance not in ended}
    return sorted(draining - busy)


def _after_freeing(state: Scheduler, ctx: Ctx, events: list[Event], free: Free, *,
                   ended: set[str], gone: set[str], hosts: set[str]) -> Decision:
    """Capacity came free: waiting placements first, then queued moves (``ended``: moves
    this decision ends); a draining host among ``hosts`` that is left empty (``gone``:
    instances that leave it now) goes into maintenance."""
    placed = _place(free, state.waiting)
    started = _start(state, free, ended=ended)
    done = [h for h in _drained(state, gone, ended) if h in hosts]
    decision = _answer(ctx, *events, *placed)
    moves = _move_answers(ctx, state, started, start=len(decision.commands))
    maintenance = follow_ups(ctx, *[(c.SetHostCondition, dict(id=h, condition="maintenance"))
                                    for h in done], start=len(decision.commands) + len(moves))
    return accept(*decision.events, *started, commands=[*decision.commands, *moves,
                                                         *maintenance])


def _switched(state: Scheduler, cmd: c.MoveSwitched, ctx: Ctx) -> Decision:
    """It runs on the destination: its allocation is there (an evacuation of the source
    leaves it alone); the source's capacity, and the move's slot in the limit, stay held
    until the source is clean."""
    move = next((m for m in state.moves if m.instance == cmd.instance), None)
    if move is None or move.ticket != cmd.ticket or move.switched or move.dest is None:
        return accept()
    commands: list[c.Command] = []
    if state.hosts[move.dest].condition == "draining":  # it arrived where it cannot stay
        commands = follow_ups(ctx, (c.MigrateInstance, dict(id=cmd.instance)))
    return accept(MoveSwitchedTo(instance=cmd.instance), commands=commands)


def _end_move(state: Scheduler, cmd: c.EndMove, ctx: Ctx) -> Decision:
    move = next((m for m in state.moves if m.instance == cmd.instance), None)
    if move is None or move.ticket != cmd.ticket:
        return accept()  # ended already (or never held: refused)
    ended = MoveEnded(instance=cmd.instance, moved=cmd.moved and move.dest is not None)
    free = _free(state.hosts)
    freed = held(move, ended.moved)
    if freed in free:
        free[freed][0] += move.memory_mib
        free[freed][1] += move.vcpus
    gone = {cmd.instance} if ended.moved and not move.switched else set()
    decision = _after_freeing(state, ctx, [ended], free, ended={cmd.instance}, gone=gone,
                              hosts={move.source})
    dest = state.hosts.get(move.dest or "")
    if ended.moved and not move.switched and dest is not None and \
            dest.condition == "draining":
        # It arrived on a host set draining meanwhile: it moves on.
        decision.commands.extend(follow_ups(ctx, (c.MigrateInstance, dict(id=cmd.instance)),
                                            start=len(decision.commands)))
    return decision


def _capacity(state: Scheduler, cmd: c.HostCapacity, ctx: Ctx) -> Decision:
    hosts = dict(state.hosts)
    old = hosts.get(cmd.host)
    hosts[cmd.host] = Slot(vcpus=cmd.vcpus, memory_mib=cmd.memory_mib,
                           condition=cmd.condition,
                           used_vcpus=old.used_vcpus if old else 0,
                           used_memory_mib=old.used_memory_mib if old else 0,
                           underlay=cmd.underlay or (old.underlay if old else None))
    changed = CapacitySet(host=cmd.host, vcpus=cmd.vcpus, memory_mib=cmd.memory_mib,
                          condition=cmd.condition, underlay=hosts[cmd.host].underlay)
    free = _free(hosts)
    now = Scheduler(hosts=hosts, moves=state.moves, migration_limit=state.migration_limit)
    decision = _answer(ctx, changed, *_place(free, state.waiting))
    started = _start(now, free, ended=set())
    extra = _move_answers(ctx, now, started, start=len(decision.commands))
    was = old.condition if old else None
    if cmd.condition == "draining" and was != "draining":
        # Each of its instances is asked to move; an empty host is in maintenance at once.
        moving = {m.instance for m in state.moves}
        here = sorted(i for i, a in state.allocations.items() if a.host == cmd.host)
        asks = [(c.MigrateInstance, dict(id=i)) for i in here if i not in moving]
        if not here and not any(m.dest == cmd.host for m in state.moves):
            asks = [(c.SetHostCondition, dict(id=cmd.host, condition="maintenance"))]
        extra += follow_ups(ctx, *asks, start=len(decision.commands) + len(extra))
    elif cmd.condition == "down" and was != "down":
        into = sorted(m.instance for m in state.moves if m.dest == cmd.host)
        extra += follow_ups(ctx, *[(c.AbortMigration, dict(
            id=i, reason=f"destination {cmd.host} is down")) for i in into],
            start=len(decision.commands) + len(extra))
    return accept(*decision.events, *started, commands=[*decision.commands, *extra])


def _release(state: Scheduler, cmd: c.Release, ctx: Ctx) -> Decision:
    alloc = state.allocations.get(cmd.instance)
    move = next((m for m in state.moves if m.instance == cmd.instance), None)
    ended = [MoveEnded(instance=cmd.instance, moved=False)] if move else []
    if alloc is None:
        waiting = any(w.instance == cmd.instance for w in state.waiting)
        return accept(*ended, Freed(cmd.instance)) if waiting or ended else accept()
    free = _free(state.hosts)
    for host in (alloc.host, held(move) if move else None):
        if host in free:
            free[host][0] += alloc.memory_mib
            free[host][1] += alloc.vcpus
    return _after_freeing(state, ctx, [*ended, Freed(cmd.instance)], free,
                          ended={cmd.instance}, gone={cmd.instance}, hosts={alloc.host})


def _evacuate(state: Scheduler, cmd: c.Evacuate, ctx: Ctx) -> Decision:
    """Every instance of the down host gets another, as placement chooses; those that find
    no room wait for it, first in line. Their moves end: the host they left is gone."""
    slot = state.hosts.get(cmd.host)
    if slot is None or slot.condition != "down":
        # Up again (its return folded first): its instances stay, and run there.
        return reject(f"host {cmd.host} is {slot.condition if slot else 'unknown'} here:"
                      " not evacuated")
    here = sorted((i, a) for i, a in state.allocations.items() if a.host == cmd.host)
    if not here:
        return accept()
    free = _free(state.hosts)
    moving = {m.instance: m for m in state.moves}
    events: list[Event] = []
    stranded: list[Request] = []
    for instance, alloc in here:
        if instance in moving:
            move = moving[instance]
            events.append(MoveEnded(instance=instance, moved=move.switched))
            if (host := held(move)) in free:
                free[host][0] += move.memory_mib
                free[host][1] += move.vcpus
        events.append(Freed(instance))
        req = Request(instance, alloc.vcpus, alloc.memory_mib, rehome=True)
        placed = _place(free, [req])
        events.extend(placed)
        if not placed:
            events.append(Queued(req))
            stranded.append(req)
    decision = _answer(ctx, *events)
    waits = follow_ups(ctx, *[(c.Rehome, dict(
        id=r.instance, host=None, reason=f"its host {cmd.host} is down and no host has"
        f" {r.vcpus} vCPUs and {r.memory_mib} MiB free (waiting)")) for r in stranded],
        start=len(decision.commands))
    return accept(*decision.events, commands=[*decision.commands, *waits])


def decide(state: Scheduler | None, cmd: c.Command, ctx: Ctx) -> Decision:
    if cmd.id != SCHEDULER_ID:
        return reject(f"the scheduler is {SCHEDULER_ID!r}, not {cmd.id!r}")
    state = state or Scheduler()
    match cmd:
        case c.HostCapacity():
            return _capacity(state, cmd, ctx)
        case c.Place():
            held = state.allocations.get(cmd.instance)
            if held is not None:  # asked twice: answer the same
                return accept(commands=follow_ups(ctx, (c.Placed, dict(
                    id=cmd.instance, host=held.host))))
            if any(w.instance == cmd.instance for w in state.waiting):
                return accept()
            req = Request(cmd.instance, cmd.vcpus, cmd.memory_mib)
            placed = _place(_free(state.hosts), [req])
            if placed:
                return _answer(ctx, *placed)
            reason = f"no host has {cmd.vcpus} vCPUs and {cmd.memory_mib} MiB free (waiting)"
            return _answer(ctx, Queued(req), refused=(req, reason))
        case c.LbNode():
            if state.lb_nodes.get(cmd.host) == cmd.condition:
                return accept()
            nodes = {**state.lb_nodes, cmd.host: cmd.condition}
            return _balancers_answer(ctx, LbNodeSet(host=cmd.host, condition=cmd.condition),
                                     *_replace_balancers(nodes, state.balancers))
        case c.PlaceBalancer():
            if cmd.lb in state.balancers:  # asked twice: answer the same
                nodes = state.balancers[cmd.lb]
                return accept(commands=follow_ups(ctx, (c.BalancerPlaced, dict(
                    id=cmd.lb, nodes=tuple(nodes), reason=_waiting_reason(
                        state.lb_nodes, len(nodes))))))
            return _balancers_answer(ctx, *_replace_balancers(
                state.lb_nodes, {**state.balancers, cmd.lb: []}, asking=cmd.lb))
        case c.ReleaseBalancer():
            if cmd.lb not in state.balancers:
                return accept()
            rest = {lb: nodes for lb, nodes in state.balancers.items() if lb != cmd.lb}
            return _balancers_answer(ctx, BalancerReleased(cmd.lb),
                                     *_replace_balancers(state.lb_nodes, rest))
        case c.Release():
            return _release(state, cmd, ctx)
        case c.ReserveMove():
            return _reserve(state, cmd, ctx)
        case c.MoveSwitched():
            return _switched(state, cmd, ctx)
        case c.EndMove():
            return _end_move(state, cmd, ctx)
        case c.Evacuate():
            return _evacuate(state, cmd, ctx)
        case c.SetMigrationLimit():
            if cmd.limit == state.migration_limit:
                return accept()
            limited = Scheduler(hosts=state.hosts, moves=state.moves, migration_limit=cmd.limit)
            started = _start(limited, _free(state.hosts), ended=set())
            return accept(LimitSet(cmd.limit), *started,
                          commands=_move_answers(ctx, state, started))
    return reject(f"{type(cmd).__name__} does not apply to the scheduler")


# The only events whose evolve changes allocations, each that of its own ``instance``.
_ALLOCATING = (Allocated, Freed, MoveSwitchedTo, MoveEnded)
_copy = msgspec.msgpack.Encoder()


def keep(state: Scheduler, events: list[Event]) -> Callable[[], Scheduler]:
    """For the fold, should evolving ``events`` raise (a bug): what gives the state back as
    it is now. The allocations grow with the instances, and copying them for every command
    made a placement's cost grow with them too: only the entries the events name are kept
    (evolve changes no other), and all the rest, which grows with the hosts, whole."""
    rest = _copy.encode(msgspec.structs.replace(state, allocations={}))
    allocations = state.allocations
    named = {e.instance: allocations.get(e.instance) for e in events
             if isinstance(e, _ALLOCATING)}

    def restore() -> Scheduler:
        for instance, alloc in named.items():
            if alloc is None:
                allocations.pop(instance, None)
            else:
                allocations[instance] = alloc
        return msgspec.structs.replace(msgspec.msgpack.decode(rest, type=Scheduler),
                                       allocations=allocations)
    return restore


def evolve(state: Scheduler | None, event: Event) -> Scheduler:
    state = state or Scheduler()
    match event:
        case CapacitySet():
            slot = state.hosts.get(event.host)
            if slot is None:
                state.hosts[event.host] = Slot(vcpus=event.vcpus, memory_mib=event.memory_mib,
                                               condition=event.condition,
                                               underlay=event.underlay)
            else:
                slot.vcpus, slot.memory_mib = event.vcpus, event.memory_mib
                slot.condition, slot.underlay = event.condition, event.underlay
        case Allocated():
            slot = state.hosts[event.host]
            slot.used_vcpus += event.vcpus
            slot.used_memory_mib += event.memory_mib
            state.allocations[event.instance] = Allocation(event.host, event.vcpus,
                                                           event.memory_mib)
            state.waiting = [w for w in state.waiting if w.instance != event.instance]
        case Queued():
            state.waiting.append(event.request)
        case LbNodeSet():
            state.lb_nodes[event.host] = event.condition
        case BalancerNodes():
            state.balancers[event.lb] = list(event.nodes)
        case BalancerReleased():
            del state.balancers[event.lb]
        case MoveQueued():
            state.moves.append(event.move)
        case MoveStarted():
            move = event.move
            assert move.dest is not None
            at = next((i for i, m in enumerate(state.moves) if m.instance == move.instance),
                      None)
            if at is None:
                state.moves.append(move)
            else:
                state.moves[at] = move
            dest = state.hosts[move.dest]
            dest.used_vcpus += move.vcpus
            dest.used_memory_mib += move.memory_mib
        case MoveSwitchedTo():
            move = next(m for m in state.moves if m.instance == event.instance)
            assert move.dest is not None
            move.switched = True
            state.allocations[event.instance] = Allocation(move.dest, move.vcpus,
                                                           move.memory_mib)
        case MoveEnded():
            at = next(i for i, m in enumerate(state.moves) if m.instance == event.instance)
            move = state.moves.pop(at)
            if move.dest is not None:
                if event.moved and not move.switched and event.instance in state.allocations:
                    # It lives on the destination now: its reservation there is its
                    # allocation, and the source's capacity goes.
                    state.allocations[event.instance] = Allocation(move.dest, move.vcpus,
                                                                   move.memory_mib)
                slot = state.hosts[held(move, event.moved) or ""]
                slot.used_vcpus -= move.vcpus
                slot.used_memory_mib -= move.memory_mib
        case LimitSet():
            state.migration_limit = event.limit
        case Freed():
            alloc = state.allocations.pop(event.instance, None)
            if alloc is None:
                state.waiting = [w for w in state.waiting if w.instance != event.instance]
            else:
                slot = state.hosts[alloc.host]
                slot.used_vcpus -= alloc.vcpus
                slot.used_memory_mib -= alloc.memory_mib
    return state
