"""An agent's heartbeat, the value of its key in the HEARTBEATS key-value bucket."""

import msgspec


class Heartbeat(msgspec.Struct, frozen=True):
    boot_id: str  # a new one each time the agent starts: a new boot means a full resync
    at_ms: int  # the agent's clock; hosts are expected to keep time (NTP)
    underlay: str | None = None  # the host's VTEP address, where its segments are reached
