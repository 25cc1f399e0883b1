"""Reading an entity's commands back from CMD (orchestrator/logreader.py) against a real
nats-server: what the ordered consumer of events.bus reads, chunk after chunk, bounded by
a seq or a count, and no consumer left behind."""

import pytest
from conftest import Env
from nats.js import JetStreamContext

from events.bus import read_stream
from events.subjects import CMD_STREAM, command_subject
from orchestrator import logreader
from orchestrator.cli.connect import open_nats
from orchestrator.logreader import LogClient, entity_filter, read_entity


async def test_an_entity_reads_as_the_ordered_consumer_reads_it(
        env: Env, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logreader, "CHUNK", 3)  # many chunks, and requests ahead of them
    for n in range(40):  # vm1 on every third, from two sources
        id_ = "vm1" if n % 3 == 0 else f"other{n % 5}"
        await js.publish(command_subject("admin" if n % 2 else "user", "instance", id_),
                         f"payload {n}".encode())
    expected = [(m.metadata.sequence.stream, m.subject, m.data)
                async for batch in read_stream(js, CMD_STREAM, entity_filter("instance", "vm1"))
                for m in batch]
    nc = await open_nats(env.nats_url, "test-reader", client=LogClient)
    try:
        reader = nc.jetstream()
        got = await read_entity(reader, "instance", "vm1")
        assert [(m.seq, m.subject, m.data) for m in got] == expected
        assert len(got) == 14 and all(m.at > 0 for m in got)
        assert [m.at for m in got] == sorted(m.at for m in got)
        seqs = [m.seq for m in got]
        assert [m.seq for m in await read_entity(reader, "instance", "vm1",
                                                 start_seq=seqs[4] + 1)] == seqs[5:]
        assert [m.seq for m in await read_entity(reader, "instance", "vm1",
                                                 to_seq=seqs[7])] == seqs[:8]
        assert [m.seq for m in await read_entity(reader, "instance", "vm1", start_seq=seqs[2],
                                                 limit=1)] == [seqs[2]]
        assert await read_entity(reader, "instance", "nobody") == []
        assert await read_entity(reader, "instance", "vm1", start_seq=seqs[-1] + 1) == []
        # nats-py's own subscriptions on the same connection are untouched.
        assert len([m async for batch in read_stream(reader, CMD_STREAM, "cmd.>")
                    for m in batch]) == 40
        # Every pull consumer of the reader's is gone (the ordered ones time out by themselves).
        consumers = await js.consumers_info(CMD_STREAM)
        assert [c.name for c in consumers if c.config.deliver_subject is None] == []
    finally:
        await nc.close()
