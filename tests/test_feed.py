"""The fold's feed against a real nats-server: order, bounded backlog, loss detection."""

import asyncio

import pytest
from nats.js import JetStreamContext

from events.feed import ConsumerGone, Feed
from events.meta import delivery
from events.subjects import CMD_STREAM, partition_of
from events.topology import open_fold_consumer
from tests.conftest import PARTITIONS


async def test_the_feed_holds_one_window_and_delivers_all_in_order(
        js: JetStreamContext) -> None:
    """A backlog of 3,000: until a batch is acked, no more than max_ack_pending wait in the
    feed; acking batch after batch brings every message, once and in order."""
    count, window = 3000, 500
    acks = [await js.publish_async("cmd.user.instance.big", b"{}") for _ in range(count)]
    await asyncio.gather(*acks)
    feed = Feed(js._nc, heartbeat_s=1.0, ack_every=1, ack_within_s=0.0)
    await feed.open()
    await open_fold_consumer(js, partition_of("instance", "big", PARTITIONS), epoch=1,
                             after_seq=0, deliver_subject=feed.subject, heartbeat_s=1.0,
                             max_pending=window)
    seqs: list[int] = []
    try:
        await asyncio.sleep(0.5)
        assert feed.buffered == window
        while len(seqs) < count:
            msgs = await feed.take(200, timeout_s=5.0)
            assert msgs, f"delivery stalled after {len(seqs)} messages"
            seqs.extend(delivery(m.reply).stream_seq for m in msgs)
            await feed.committed(msgs[-1], len(msgs))
    finally:
        await feed.close()
    assert seqs == list(range(1, count + 1))


async def test_a_broken_consumer_sequence_stops_the_feed(js: JetStreamContext) -> None:
    """The consumer is replaced under the feed (its sequence starts again): not followable."""
    for _ in range(3):
        await js.publish("cmd.user.instance.gap", b"{}")
    partition = partition_of("instance", "gap", PARTITIONS)
    feed = Feed(js._nc, heartbeat_s=1.0, ack_every=1, ack_within_s=0.0)
    await feed.open()
    try:
        await open_fold_consumer(js, partition, 1, 0, feed.subject, 1.0, 100)
        taken = []
        while len(taken) < 3:
            taken += await feed.take(10, timeout_s=2.0)
        await open_fold_consumer(js, partition, 1, 0, feed.subject, 1.0, 100)  # made anew
        with pytest.raises(ConsumerGone, match="got 1 after 3"):
            await feed.take(10, timeout_s=2.0)
    finally:
        await feed.close()


async def test_heartbeats_keep_an_idle_feed_open_until_its_consumer_is_deleted(
        js: JetStreamContext) -> None:
    """Idle, the consumer's heartbeats keep the feed open; deleted (as a newer owner does),
    it falls silent and within three intervals the feed says it is gone."""
    feed = Feed(js._nc, heartbeat_s=0.1, ack_every=1, ack_within_s=0.0)
    await feed.open()
    try:
        await open_fold_consumer(js, partition_of("instance", "idle", PARTITIONS), 1, 0,
                                 feed.subject, 0.1, 100)
        for _ in range(10):  # 1 s, over three heartbeat intervals
            assert await feed.take(10, timeout_s=0.1) == []
        consumers = await js.consumers_info(CMD_STREAM)
        assert len(consumers) == 1
        await js.delete_consumer(CMD_STREAM, consumers[0].name)
        with pytest.raises(ConsumerGone, match="heartbeat"):
            for _ in range(20):
                assert await feed.take(10, timeout_s=0.1) == []
    finally:
        await feed.close()
