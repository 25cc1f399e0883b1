"""The pure rules of the leader's duties: when a host is down or up, when a job is overdue."""

from orchestrator.liveness import HostView, judge
from orchestrator.reconciler import MAX_ATTEMPTS, windows
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


def overdue(attempts: int, issued_at: int, now_ms: int, deadline_ms: int = 10_000,
            max_backoff_ms: int = 300_000) -> bool:
    return any(lo <= attempts < hi and issued_at <= before
               for lo, hi, before in windows(now_ms, deadline_ms, max_backoff_ms))


def test_overdue_backs_off_exponentially_up_to_a_cap() -> None:
    assert not overdue(0, 0, 9_999) and overdue(0, 0, 10_000)
    assert not overdue(3, 0, 79_999) and overdue(3, 0, 80_000)
    assert not overdue(5, 0, 299_999) and overdue(5, 0, 300_000)
    assert overdue(20, 0, 300_000) and not overdue(20, 1, 300_000)
    assert windows(300_000, 10_000, 300_000)[-1] == (5, MAX_ATTEMPTS, 0)


def test_the_cap_never_shortens_the_deadline() -> None:
    assert windows(7_200_000, 3_600_000, 300_000) == [(0, MAX_ATTEMPTS, 3_600_000)]
    assert not overdue(0, 0, 3_599_999, deadline_ms=3_600_000)
    assert overdue(4, 0, 3_600_000, deadline_ms=3_600_000)
    # No deadline: every lagging job is overdue at once.
    assert windows(5, 0, 300_000) == [(0, MAX_ATTEMPTS, 5)]
