"""Heartbeats on the bus: one key per host in a JetStream key-value bucket."""

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from events.subjects import HEARTBEAT_BUCKET
from schemas.heartbeat import Heartbeat

_beat = msgspec.json.Decoder(Heartbeat)


async def beat(kv: KeyValue, host: str, heartbeat: Heartbeat) -> None:
    await kv.put(host, msgspec.json.encode(heartbeat))


async def read_heartbeats(js: JetStreamContext) -> dict[str, Heartbeat]:
    """The last heartbeat of every host that ever sent one (and sent one in the last day)."""
    kv = await js.key_value(HEARTBEAT_BUCKET)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    beats: dict[str, Heartbeat] = {}
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value:
            beats[key] = _beat.decode(entry.value)
    return beats
