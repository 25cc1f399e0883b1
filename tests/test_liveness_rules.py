"""The pure rules of the leader's duties: when a host is down or up, when a job is overdue."""

from orchestrator.liveness import HostView, judge
from orchestrator.reconciler import Lagging, overdue
from schemas import commands as c
from schemas.heartbeat import Heartbeat

DOWN_AFTER = 5_000


def test_silent_host_goes_down_once_per_state_version() -> None:
    hosts = {"h1": HostView("up", "b1", updated_at=100)}
    out = judge(hosts, {"h1": Heartbeat("b1", at_ms=1_000)}, 7_000, DOWN_AFTER)
    assert out == [c.HostDown(cmd_id="down-h1-100", id="h1", boot_id="b1")]
    # Another tick before the fold caught up asks for the same change: same key, deduped.
    assert judge(hosts, {"h1": Heartbeat("b1", at_ms=1_000)}, 9_000, DOWN_AFTER) == out


def test_fresh_beat_brings_a_down_host_up_and_a_new_boot_is_recorded() -> None:
    down = {"h1": HostView("down", "b1", updated_at=200)}
    assert judge(down, {"h1": Heartbeat("b1", at_ms=9_000)}, 10_000, DOWN_AFTER) == [
        c.HostUp(cmd_id="up-h1-200-b1", id="h1", boot_id="b1")]
    rebooted = {"h1": HostView("up", "b1", updated_at=300)}
    assert judge(rebooted, {"h1": Heartbeat("b2", at_ms=9_000)}, 10_000, DOWN_AFTER) == [
        c.HostUp(cmd_id="up-h1-300-b2", id="h1", boot_id="b2")]


def test_a_host_reporting_a_new_underlay_address_is_brought_up_with_it() -> None:
    hosts = {"h1": HostView("up", "b1", updated_at=400, underlay=None)}
    beat = Heartbeat("b1", at_ms=9_000, underlay="192.0.2.7")
    assert judge(hosts, {"h1": beat}, 10_000, DOWN_AFTER) == [
        c.HostUp(cmd_id="up-h1-400-b1-192.0.2.7", id="h1", boot_id="b1", underlay="192.0.2.7")]
    known = {"h1": HostView("up", "b1", updated_at=500, underlay="192.0.2.7")}
    assert judge(known, {"h1": beat}, 10_000, DOWN_AFTER) == []


def test_hosts_never_heard_from_and_healthy_hosts_are_left_alone() -> None:
    hosts = {"h1": HostView("up", "b1", 1), "h2": HostView("up", "", 1),
             "h3": HostView("maintenance", "b3", 1)}
    beats = {"h1": Heartbeat("b1", at_ms=9_500), "h3": Heartbeat("b3", at_ms=0)}
    assert judge(hosts, beats, 10_000, DOWN_AFTER) == []


def test_overdue_backs_off_exponentially_up_to_a_cap() -> None:
    lag = Lagging(id="i1", generation=3, attempts=0, issued_at=0)
    assert not overdue(lag, 9_999, 10_000, 300_000)
    assert overdue(lag, 10_000, 10_000, 300_000)
    third = Lagging(id="i1", generation=3, attempts=3, issued_at=0)
    assert not overdue(third, 79_999, 10_000, 300_000)
    assert overdue(third, 80_000, 10_000, 300_000)
    many = Lagging(id="i1", generation=3, attempts=20, issued_at=0)
    assert overdue(many, 300_000, 10_000, 300_000)
