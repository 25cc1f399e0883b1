"""Read-side queries over the projection, for the CLI and for tests."""

from dataclasses import dataclass

import asyncpg
import msgspec

from schemas.outcomes import Outcome

_outcome = msgspec.json.Decoder(Outcome)


@dataclass(frozen=True, slots=True)
class EntityRow:
    kind: str
    id: str
    state: dict
    last_seq: int


async def get_entity(conn: asyncpg.Connection, kind: str, id_: str) -> EntityRow | None:
    row = await conn.fetchrow(
        "SELECT state, last_seq FROM entities WHERE kind = $1 AND id = $2", kind, id_
    )
    if row is None:
        return None
    return EntityRow(kind, id_, msgspec.json.decode(row["state"]), row["last_seq"])


async def list_entities(conn: asyncpg.Connection, kind: str) -> list[EntityRow]:
    rows = await conn.fetch(
        "SELECT id, state, last_seq FROM entities WHERE kind = $1 ORDER BY id", kind
    )
    return [EntityRow(kind, r["id"], msgspec.json.decode(r["state"]), r["last_seq"])
            for r in rows]


async def timeline(conn: asyncpg.Connection, kind: str, id_: str,
                   after_seq: int = 0) -> list[Outcome]:
    rows = await conn.fetch(
        "SELECT outcome FROM history WHERE kind = $1 AND id = $2 AND seq > $3 ORDER BY seq",
        kind, id_, after_seq,
    )
    return [_outcome.decode(r["outcome"]) for r in rows]


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    seq: int
    subject: str
    reason: str
    size: int


async def dead_letters(conn: asyncpg.Connection, limit: int = 100) -> list[DeadLetterRow]:
    rows = await conn.fetch(
        "SELECT seq, subject, reason, length(payload) AS size FROM dead_letters"
        " ORDER BY seq DESC LIMIT $1",
        limit,
    )
    return [DeadLetterRow(r["seq"], r["subject"], r["reason"], r["size"]) for r in rows]


def decode_outcome(data: bytes) -> Outcome:
    return _outcome.decode(data)


@dataclass(frozen=True, slots=True)
class HostRow:
    id: str
    condition: str
    vcpus: int
    memory_mib: int
    boot_id: str
    underlay: str | None
    instances: int
    role: str = "hypervisor"
    balancers: tuple[str, ...] = ()  # an LB node's: those it serves
    # Live migrations: moving memory out of it or into it, and asked but waiting.
    migrating_out: int = 0
    migrating_in: int = 0
    queued: int = 0


async def hosts(conn: asyncpg.Connection) -> list[HostRow]:
    rows = await conn.fetch(
        """
        SELECT h.id, h.state->>'condition' AS condition, (h.state->>'vcpus')::int AS vcpus,
               (h.state->>'memory_mib')::int AS memory_mib, h.state->>'boot_id' AS boot_id,
               h.state->>'underlay' AS underlay, count(i.id) AS instances,
               coalesce(h.state->>'role', 'hypervisor') AS role,
               array(SELECT l.id FROM entities l,
                            jsonb_array_elements(l.state->'slots') AS slot
                     WHERE l.kind = 'lb' AND slot->>'node' = h.id
                       AND l.state->>'status' NOT IN ('deleted', 'failed')
                     ORDER BY l.id) AS balancers,
               (SELECT count(*) FROM entities m WHERE m.kind = 'instance'
                  AND m.state->'migration'->>'source' = h.id
                  AND m.state->'migration'->>'phase' IN ('preparing', 'migrating', 'cleaning')
               ) AS migrating_out,
               (SELECT count(*) FROM entities m WHERE m.kind = 'instance'
                  AND m.state->'migration'->>'dest' = h.id
                  AND m.state->'migration'->>'phase' IN ('preparing', 'migrating')
               ) AS migrating_in,
               (SELECT count(*) FROM entities m WHERE m.kind = 'instance'
                  AND m.state->'migration'->>'source' = h.id
                  AND m.state->'migration'->>'phase' IN ('reserving', 'queued')) AS queued
        FROM entities h
        LEFT JOIN entities i ON i.kind = 'instance' AND i.state->>'host' = h.id
             AND i.state->>'status' <> 'deleted'
        WHERE h.kind = 'host'
        GROUP BY h.id, h.state ORDER BY h.id
        """
    )
    return [HostRow(**{**dict(r), "balancers": tuple(r["balancers"])}) for r in rows]


@dataclass(frozen=True, slots=True)
class AlertRow:
    kind: str
    id: str
    reason: str
    attempts: int | None  # of the job that ran out of retries; None for a host down
    since_ms: int


async def alerts(conn: asyncpg.Connection) -> list[AlertRow]:
    """Entities degraded after their retries ran out, hosts down, commands a bug of the fold
    refused (internal errors), balancers failed or without a healthy backend, instances that
    cannot leave a draining host or are stranded on a down one; newest first."""
    # The deciders only here: the timeline and log queries need not import them.
    from orchestrator.deciders.lb import LoadBalancer, without_healthy_backend

    rows = await conn.fetch(
        """
        SELECT kind, id, coalesce(state->>'error', '') AS reason,
               (state->>'attempts')::int AS attempts, (state->>'updated_at')::bigint AS since_ms
        FROM entities WHERE state->>'status' = 'degraded'
        UNION ALL
        SELECT kind, id, 'host down: its heartbeats stopped', NULL,
               (state->>'updated_at')::bigint
        FROM entities WHERE kind = 'host' AND state->>'condition' = 'down'
        UNION ALL
        -- A bug of ours met a command: cmd.<P>.<source>.<kind>.<id> names the entity.
        SELECT split_part(subject, '.', 4), split_part(subject, '.', 5), reason, NULL,
               (extract(epoch FROM at) * 1000)::bigint
        FROM dead_letters WHERE reason LIKE 'internal error in %'
        UNION ALL
        SELECT kind, id, 'load balancer failed: ' || coalesce(state->>'reason', ''), NULL,
               (state->>'updated_at')::bigint
        FROM entities WHERE kind = 'lb' AND state->>'status' = 'failed'
        UNION ALL
        SELECT kind, id, state->>'stalled', (state->>'attempts')::int,
               (state->>'updated_at')::bigint
        FROM entities WHERE kind = 'lb' AND state->>'stalled' IS NOT NULL
        UNION ALL
        SELECT kind, id, 'cannot leave draining host ' || (state->'migration'->>'source')
               || ': ' || coalesce(state->'migration'->>'reason', ''), NULL,
               (state->>'updated_at')::bigint
        FROM entities WHERE kind = 'instance' AND (state->'migration'->>'drain')::boolean
          AND state->'migration'->>'phase' = 'queued'
          AND state->'migration'->>'reason' LIKE '%free%'
        UNION ALL
        SELECT i.kind, i.id, 'stranded: ' || (i.state->>'error'), NULL,
               (i.state->>'updated_at')::bigint
        FROM entities i JOIN entities h ON h.kind = 'host' AND h.id = i.state->>'host'
        WHERE i.kind = 'instance' AND i.state->>'status' = 'placed'
          AND h.state->>'condition' = 'down' AND (h.state->>'evacuated_at')::bigint > 0
          AND i.state->>'error' IS NOT NULL
        ORDER BY since_ms DESC, kind, id
        """
    )
    found = [AlertRow(**dict(r)) for r in rows]
    # A balancer that answers nowhere: the fold's health rule says so, not SQL.
    for r in await conn.fetch("SELECT id, state FROM entities WHERE kind = 'lb'"
                              " AND state->>'status' = 'active'"):
        state = msgspec.json.decode(r["state"], type=LoadBalancer)
        if ports := without_healthy_backend(state):
            found.append(AlertRow("lb", r["id"], "no healthy backend on port"
                                  f"{'s' if len(ports) > 1 else ''} "
                                  f"{', '.join(map(str, ports))}", None, state.updated_at))
    return sorted(found, key=lambda a: (-(a.since_ms or 0), a.kind, a.id))


async def fold_progress(conn: asyncpg.Connection) -> tuple[int, int]:
    """(commands folded, outbox rows not yet relayed). A command counts once, whether it
    made a timeline entry, a dead letter, or both."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM history)"
        " + (SELECT count(*) FROM dead_letters d"
        "    WHERE NOT EXISTS (SELECT 1 FROM history h WHERE h.seq = d.seq)) AS folded,"
        " (SELECT count(*) FROM outbox) AS outbox"
    )
    return row["folded"], row["outbox"]


# ---- causes and effects: what orchestrator/tracer.py looks up by key --------------------


def _like(text: str) -> str:
    """``text`` matched literally in a LIKE pattern (ids and keys may hold ``_``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def outcome_at(conn: asyncpg.Connection, seq: int) -> Outcome | None:
    raw = await conn.fetchval("SELECT outcome FROM history WHERE seq = $1", seq)
    return None if raw is None else _outcome.decode(raw)


async def outcomes_with_key(conn: asyncpg.Connection, cmd_id: str) -> list[Outcome]:
    """Every folded command whose idempotency key is ``cmd_id`` (one per source and entity),
    through the index on keys (schema.sql's history_cmd_id)."""
    rows = await conn.fetch(
        "SELECT outcome FROM history WHERE outcome->>'cmd_id' = $1 ORDER BY seq", cmd_id)
    return [_outcome.decode(r["outcome"]) for r in rows]


async def follow_ups(conn: asyncpg.Connection, seq: int,
                     entities: list[tuple[str, str]]) -> list[Outcome]:
    """The folded follow-ups of the command at ``seq``, on the entities it sent them to."""
    rows = await conn.fetch(
        "SELECT h.outcome FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::text[])) AS"
        " e(kind, id), LATERAL (SELECT outcome, seq FROM history WHERE kind = e.kind"
        " AND id = e.id AND seq > $3 AND outcome->>'cmd_id' LIKE $4) AS h ORDER BY h.seq",
        [k for k, _ in entities], [i for _, i in entities], seq,
        _like(f"fx-{seq}-") + "%")
    return [_outcome.decode(r["outcome"]) for r in rows]


async def answers(conn: asyncpg.Connection, kind: str, id_: str, after_seq: int, host: str,
                  report_suffix: str, reconcile_key: str) -> list[Outcome]:
    """Reports of ``host`` whose key ends with ``report_suffix``, and the command keyed
    ``reconcile_key``, on one entity after ``after_seq``."""
    rows = await conn.fetch(
        "SELECT outcome FROM history WHERE kind = $1 AND id = $2 AND seq > $3"
        " AND ((outcome->>'source' = $4 AND outcome->>'cmd_id' LIKE $5)"
        "      OR outcome->>'cmd_id' = $6) ORDER BY seq",
        kind, id_, after_seq, host, "%" + _like(report_suffix), reconcile_key)
    return [_outcome.decode(r["outcome"]) for r in rows]


async def newer_report(conn: asyncpg.Connection, kind: str, id_: str, after_seq: int,
                       host: str, key_prefix: str, generation: int) -> Outcome | None:
    """The first accepted report of ``host`` on the entity after ``after_seq`` keyed
    ``<key_prefix><host>-<id>-<generation>-<attempt>`` with a generation at least this."""
    raw = await conn.fetchval(
        "SELECT outcome FROM history WHERE kind = $1 AND id = $2 AND seq > $3"
        " AND outcome->>'source' = $4 AND outcome->>'cmd_id' LIKE $5"
        " AND (outcome->>'accepted')::boolean"
        " AND (substring(outcome->>'cmd_id' FROM '-([0-9]+)-[0-9]+$'))::numeric >= $6"
        " ORDER BY seq LIMIT 1",
        kind, id_, after_seq, host, _like(f"{key_prefix}{host}-{id_}-") + "%", generation)
    return None if raw is None else _outcome.decode(raw)


async def outcomes_at(conn: asyncpg.Connection, seqs: list[int]) -> dict[int, Outcome]:
    """The folded commands among ``seqs``, by seq."""
    rows = await conn.fetch(
        "SELECT seq, outcome FROM history WHERE seq = ANY($1::bigint[])", seqs)
    return {r["seq"]: _outcome.decode(r["outcome"]) for r in rows}


@dataclass(frozen=True, slots=True)
class LogFilter:
    kind: str | None = None
    source: str | None = None
    type: str | None = None
    rejected: bool = False

    def matches(self, o: Outcome) -> bool:
        return ((self.kind is None or o.kind == self.kind)
                and (self.source is None or o.source == self.source)
                and (self.type is None or o.type == self.type)
                and not (self.rejected and o.accepted))


async def log(conn: asyncpg.Connection, where: LogFilter, after_seq: int = 0,
              limit: int | None = None) -> list[Outcome]:
    """Folded commands across entities after ``after_seq``, oldest first: the newest
    ``limit`` of them if given (the primary key read backwards stops there)."""
    rows = await conn.fetch(
        "SELECT outcome FROM history WHERE seq > $1"
        " AND ($2::text IS NULL OR kind = $2)"
        " AND ($3::text IS NULL OR outcome->>'source' = $3)"
        " AND ($4::text IS NULL OR outcome->>'type' = $4)"
        " AND (NOT $5 OR outcome->>'accepted' = 'false')"
        " ORDER BY seq DESC LIMIT $6",
        after_seq, where.kind, where.source, where.type, where.rejected, limit)
    return [_outcome.decode(r["outcome"]) for r in reversed(rows)]
