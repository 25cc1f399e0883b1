"""The reconciler: instances, networks and balancers whose jobs are overdue get a Reconcile
command.

Whether to re-issue the job or to degrade the instance is the fold's decision (pure and
replayable); this loop only notices lateness, with exponential backoff per attempt.
Instances on a host that is down are left alone: re-issuing to nobody would only degrade
them, one alert each, and the host's return brings a full resync anyway. Their deadline
counts from that return, so a host that flaps does not use up their retries. A host down
longer than ``evacuate_after_s`` (when set) is evacuated: EvacuateHost, once per outage.
"""

from dataclasses import dataclass

import asyncpg
import msgspec

from events.bus import Publisher
from orchestrator.deciders.lb import LoadBalancer, drains_due
from schemas import commands as c
from schemas.ids import SYSTEM


@dataclass(frozen=True, slots=True)
class Lagging:
    id: str
    generation: int
    attempts: int
    issued_at: int


def overdue(lag: Lagging, now_ms: int, deadline_ms: int, max_backoff_ms: int) -> bool:
    """Past its deadline, doubled for every re-issue so far, capped."""
    wait = min(deadline_ms * 2 ** lag.attempts, max_backoff_ms)
    return now_ms >= lag.issued_at + wait


@dataclass(frozen=True, slots=True)
class ReconcilerConfig:
    deadline_s: float = 10.0
    max_attempts: int = 5
    max_backoff_s: float = 300.0
    evacuate_after_s: float | None = None  # None: a host down is never evacuated by itself


class Reconciler:
    def __init__(self, publisher: Publisher, config: ReconcilerConfig) -> None:
        self.publisher, self.config = publisher, config

    async def tick(self, conn: asyncpg.Connection,
                   now_ms: int) -> list[c.Command]:
        rows = await conn.fetch(
            """
            SELECT i.id, (i.state->>'generation')::int AS generation,
                   (i.state->>'attempts')::int AS attempts,
                   greatest((i.state->>'issued_at')::bigint,
                            (h.state->>'updated_at')::bigint) AS issued_at
            FROM entities i
            LEFT JOIN entities h ON h.kind = 'host' AND h.id = i.state->>'host'
            WHERE i.kind = 'instance' AND i.state->>'host' IS NOT NULL
              AND i.state->>'status' IN ('placed', 'deleted')
              AND ((i.state->>'observed_generation')::int < (i.state->>'generation')::int
                   -- or a host it left has not applied its removal (a lost report, say)
                   OR i.state->'cleanup' <> '{}'::jsonb)
              -- memory moving: its deadline bounds it, and the source's report ends it
              AND i.state->'migration'->>'phase' IS DISTINCT FROM 'migrating'
              AND h.state->>'condition' IS DISTINCT FROM 'down'
            """
        )
        # Networks some host has not applied, not counting hosts that are down.
        networks = await conn.fetch(
            """
            SELECT n.id, (n.state->>'generation')::int AS generation,
                   (n.state->>'attempts')::int AS attempts,
                   greatest((n.state->>'issued_at')::bigint,
                            max((h.state->>'updated_at')::bigint)) AS issued_at
            FROM entities n
            CROSS JOIN LATERAL jsonb_each(n.state->'hosts') AS span(host, view)
            LEFT JOIN entities h ON h.kind = 'host' AND h.id = span.host
            WHERE n.kind = 'network' AND n.state->>'status' = 'active'
              AND (span.view->>'observed_generation')::int < (n.state->>'generation')::int
              AND h.state->>'condition' IS DISTINCT FROM 'down'
            GROUP BY n.id, n.state
            """
        )
        # Balancers some node has not applied (an LB node's removal job too), not counting
        # nodes that are down.
        balancers = await conn.fetch(
            """
            SELECT l.id, (l.state->>'generation')::int AS generation,
                   (l.state->>'attempts')::int AS attempts,
                   greatest((l.state->>'issued_at')::bigint,
                            max((h.state->>'updated_at')::bigint)) AS issued_at
            FROM entities l
            CROSS JOIN LATERAL jsonb_array_elements(l.state->'slots') AS slot
            LEFT JOIN entities h ON h.kind = 'host' AND h.id = slot->>'node'
            WHERE l.kind = 'lb' AND l.state->>'stalled' IS NULL
              AND slot->>'node' IS NOT NULL
              AND (slot->'port' <> 'null'::jsonb OR l.state->>'status' IN ('deleted', 'failed'))
              AND (slot->>'observed_generation')::int < (l.state->>'generation')::int
              AND h.state->>'condition' IS DISTINCT FROM 'down'
            GROUP BY l.id, l.state
            """
        )
        cfg = self.config
        deadline_ms, cap_ms = int(cfg.deadline_s * 1000), int(cfg.max_backoff_s * 1000)

        def due(rows: list[asyncpg.Record]) -> list[Lagging]:
            return [lag for lag in (Lagging(**dict(r)) for r in rows)
                    if overdue(lag, now_ms, deadline_ms, cap_ms)]

        commands: list[c.Command] = [
            c.Reconcile(cmd_id=f"rc-{lag.id}-{lag.generation}-{lag.attempts}", id=lag.id,
                        generation=lag.generation, max_attempts=cfg.max_attempts)
            for lag in due(rows)
        ]
        commands += [
            c.ReconcileNetwork(cmd_id=f"rc-{lag.id}-{lag.generation}-{lag.attempts}", id=lag.id,
                               generation=lag.generation, max_attempts=cfg.max_attempts)
            for lag in due(networks)
        ]
        commands += [
            c.ReconcileLb(cmd_id=f"rc-{lag.id}-{lag.generation}-{lag.attempts}", id=lag.id,
                          generation=lag.generation, max_attempts=cfg.max_attempts)
            for lag in due(balancers)
        ]
        commands += await _drains_due(conn, now_ms)
        if cfg.evacuate_after_s is not None:
            commands += await _evacuations_due(conn, now_ms, int(cfg.evacuate_after_s * 1000))
        if commands:
            await self.publisher.publish_many([(SYSTEM, cmd) for cmd in commands])
        return commands


async def _drains_due(conn: asyncpg.Connection, now_ms: int) -> list[c.Command]:
    """A tick for each balancer with a leaving member whose drain time is up; its key is
    the oldest drain's start, so ticks for one state dedupe."""
    out: list[c.Command] = []
    for r in await conn.fetch("SELECT id, state FROM entities WHERE kind = 'lb'"
                              " AND state->'draining' <> '{}'::jsonb"):
        state = msgspec.json.decode(r["state"], type=LoadBalancer)
        if drains_due(state, now_ms):
            oldest = min(state.draining.values())
            out.append(c.DrainTick(cmd_id=f"dt-{r['id']}-{oldest}", id=r["id"]))
    return out


async def _evacuations_due(conn: asyncpg.Connection, now_ms: int,
                           after_ms: int) -> list[c.Command]:
    """EvacuateHost for each hypervisor down longer than ``after_ms`` and not evacuated
    yet; keyed by when it went down, so the ticks of one outage dedupe."""
    rows = await conn.fetch(
        """
        SELECT id, (state->>'updated_at')::bigint AS down_since FROM entities
        WHERE kind = 'host' AND state->>'condition' = 'down'
          AND coalesce(state->>'role', 'hypervisor') = 'hypervisor'
          AND coalesce((state->>'evacuated_at')::bigint, 0) = 0
          AND (state->>'updated_at')::bigint <= $1
        """, now_ms - after_ms)
    return [c.EvacuateHost(cmd_id=f"ev-{r['id']}-{r['down_since']}", id=r["id"]) for r in rows]
