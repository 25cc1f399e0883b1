"""JetStream delivery metadata, parsed straight from the ack reply subject."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Delivery:
    stream_seq: int
    consumer_seq: int
    delivered: int  # 1 on first delivery, more on redelivery
    timestamp_ns: int  # when the stream stored the message
    pending: int  # messages left for this consumer after this one

    @property
    def at_ms(self) -> int:
        return self.timestamp_ns // 1_000_000


def delivery(reply: str) -> Delivery:
    """Parse ``$JS.ACK.[<domain>.<hash>.]<stream>.<consumer>.<n>.<sseq>.<cseq>.<ts>.<pending>``."""
    tokens = reply.split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream delivery: {reply!r}")
    base = 4 if len(tokens) == 9 else 6
    return Delivery(
        delivered=int(tokens[base]),
        stream_seq=int(tokens[base + 1]),
        consumer_seq=int(tokens[base + 2]),
        timestamp_ns=int(tokens[base + 3]),
        pending=int(tokens[base + 4]),
    )


def pending(reply: str) -> int:
    """Just the pending count, cheaply for the common (domain-less) form."""
    if reply.count(".") == 8:
        return int(reply.rpartition(".")[2])
    return delivery(reply).pending
