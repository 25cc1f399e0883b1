"""Replay: fold the whole CMD log again, with the same code, into a scratch schema.

With ``verify`` every partition is folded up to the live checkpoint read in the same
snapshot as the live projection, so both must agree entity by entity.
"""

import re
import time
from dataclasses import dataclass, field

import asyncpg
import msgspec
from nats.js import JetStreamContext

from events.bus import read_stream
from events.meta import delivery
from events.subjects import CMD_STREAM
from orchestrator.fold import Key, fold_message
from schemas.codec import encode

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(slots=True)
class ReplayReport:
    schema: str
    commands: int = 0
    dead_letters: int = 0
    last_seq: int = 0
    seconds: float = 0.0
    entities: int = 0
    differs: list[Key] = field(default_factory=list)  # only with verify

    @property
    def rate(self) -> float:
        return self.commands / self.seconds if self.seconds else 0.0


async def _live_snapshot(conn: asyncpg.Connection) -> tuple[dict[int, int], dict[Key, bytes]]:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoints = {r["partition"]: r["checkpoint"]
                       for r in await conn.fetch("SELECT partition, checkpoint FROM partitions")}
        live = {(r["kind"], r["id"]): r["state"]
                for r in await conn.fetch("SELECT kind, id, state FROM entities")}
    return checkpoints, live


async def replay(js: JetStreamContext, conn: asyncpg.Connection, partitions: int, *,
                 schema: str = "replay", to_seq: int | None = None,
                 verify: bool = False) -> ReplayReport:
    if not _SCHEMA_RE.match(schema) or schema == "public":
        raise ValueError(f"invalid scratch schema name {schema!r}")
    if verify and to_seq is not None:
        raise ValueError("verify compares with the live projection: it replays the whole log")
    report = ReplayReport(schema=schema)
    checkpoints, live = await _live_snapshot(conn) if verify else ({}, {})
    states: dict[Key, object] = {}
    started = time.perf_counter()
    done = False
    async for msgs in read_stream(js, CMD_STREAM, "cmd.>"):
        for msg in msgs:
            d = delivery(msg.reply)
            if to_seq is not None and d.stream_seq > to_seq:
                done = True
                break
            if verify:
                token = msg.subject.split(".", 2)[1]
                limit = checkpoints.get(int(token), 0) if token.isdigit() else 0
                if d.stream_seq > limit:
                    continue  # the live projection has not folded it yet
            folded = fold_message(states, msg.subject, msg.data, d.stream_seq, d.at_ms,
                                  partitions)
            report.commands += 1
            report.dead_letters += folded.dead_letter is not None
            report.last_seq = d.stream_seq
        if done:
            break
    rows = [(kind, id_, encode(state), 0) for (kind, id_), state in states.items()]
    report.seconds = time.perf_counter() - started
    report.entities = len(rows)
    async with conn.transaction():
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(
            f"CREATE TABLE {schema}.entities (kind text, id text, state jsonb, last_seq bigint,"
            " PRIMARY KEY (kind, id))"
        )
        await conn.copy_records_to_table("entities", records=rows, schema_name=schema,
                                         columns=["kind", "id", "state", "last_seq"])
    if verify:
        replayed = {(k, i): msgspec.json.decode(s) for k, i, s, _ in rows}
        report.differs = sorted(
            key for key in replayed.keys() | live.keys()
            if replayed.get(key) != (msgspec.json.decode(live[key]) if key in live else None)
        )
    return report
