"""Host liveness: heartbeats in, HostDown / HostUp commands out.

``judge`` is the pure rule; ``Liveness`` reads the heartbeat bucket and the projection
and publishes what ``judge`` says. Idempotency keys name the host's projection version,
so every replica and every tick asks for the same change at most once.
"""

from dataclasses import dataclass

import asyncpg
from nats.js import JetStreamContext

from events.bus import Publisher
from events.heartbeats import read_heartbeats
from schemas import commands as c
from schemas.heartbeat import Heartbeat
from schemas.ids import SYSTEM


@dataclass(frozen=True, slots=True)
class HostView:
    condition: str
    boot_id: str
    updated_at: int  # changes whenever the host's state does
    underlay: str | None = None


def judge(hosts: dict[str, HostView], beats: dict[str, Heartbeat], now_ms: int,
          down_after_ms: int) -> list[c.Command]:
    """Hosts never heard from are left alone: liveness starts with the first heartbeat."""
    out: list[c.Command] = []
    for name, view in sorted(hosts.items()):
        beat = beats.get(name)
        if beat is None:
            continue
        fresh = now_ms - beat.at_ms <= down_after_ms
        if not fresh and view.condition == "up":
            out.append(c.HostDown(cmd_id=f"down-{name}-{view.updated_at}", id=name,
                                  boot_id=beat.boot_id))
        elif fresh and (view.condition == "down" or beat.boot_id != view.boot_id
                        or beat.underlay not in (None, view.underlay)):
            key = f"up-{name}-{view.updated_at}-{beat.boot_id}"
            out.append(c.HostUp(cmd_id=key + (f"-{beat.underlay}" if beat.underlay else ""),
                                id=name, boot_id=beat.boot_id, underlay=beat.underlay))
    return out


class Liveness:
    def __init__(self, js: JetStreamContext, publisher: Publisher, down_after_s: float) -> None:
        self.js, self.publisher = js, publisher
        self.down_after_ms = int(down_after_s * 1000)

    async def tick(self, conn: asyncpg.Connection, now_ms: int) -> list[c.Command]:
        beats = await read_heartbeats(self.js)
        if not beats:
            return []
        rows = await conn.fetch(
            "SELECT id, state->>'condition' AS condition, state->>'boot_id' AS boot_id,"
            " (state->>'updated_at')::bigint AS updated_at, state->>'underlay' AS underlay"
            " FROM entities WHERE kind = 'host'"
        )
        hosts = {r["id"]: HostView(r["condition"], r["boot_id"], r["updated_at"], r["underlay"])
                 for r in rows}
        commands = judge(hosts, beats, now_ms, self.down_after_ms)
        if commands:
            await self.publisher.publish_many([(SYSTEM, cmd) for cmd in commands])
        return commands
