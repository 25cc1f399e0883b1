"""Heartbeats on the bus: one key per host in a JetStream key-value bucket."""

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from events.subjects import HEARTBEAT_BUCKET
from schemas.heartbeat import Heartbeat

_beat = msgspec.json.Decoder(Heartbeat)


async def beat(kv: KeyValue, host: str, heartbeat: Heartbeat) -> None:
    await kv.put(host, msgspec.json.encode(heartbeat))


async def read_heartbeats(js: JetStreamContext) -> dict[str, Heartbeat]:
    """The last heartbeat of every host that ever sent one (and sent one in the last day).

    One ordered consumer delivers every key's last value: listing the keys and then getting
    each was a round trip per host, 200 of them behind a leader's busy event loop."""
    kv = await js.key_value(HEARTBEAT_BUCKET)
    watcher = await kv.watchall(ignore_deletes=True)
    beats: dict[str, Heartbeat] = {}
    try:
        async for entry in watcher:
            if entry is None:  # the last value of every key has come
                break
            if entry.value:
                beats[entry.key] = _beat.decode(entry.value)
    finally:
        await watcher.stop()
    return beats
