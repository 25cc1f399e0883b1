"""The operator tools' pure parts: diffs, the plain timeline line, trace keys and statuses,
the `--wait` argument, and an entity's history folded again with the real deciders."""

from events.subjects import partition_of, stored_command_subject
from orchestrator.cli.app import wait_argument
from orchestrator.history import Change, EntityFold, Stored, diff
from orchestrator.logview import log_line, log_plain, outcome_plain
from orchestrator.render import outcome_line
from orchestrator.trace import JobRef, Node, follow_up_parent, job_status, waiting_for
from schemas.codec import command_from_dict, encode
from schemas.outcomes import Outcome


def test_diff_by_dotted_path() -> None:
    before = {"power": "running", "generation": 1, "template": {"vcpus": 1, "image": "a"},
              "nics": [1], "gone": {"x": 1}}
    after = {"power": "stopped", "generation": 2, "template": {"vcpus": 1, "image": "b"},
             "nics": [1, 2], "new": {"y": {"z": 3}}}
    assert diff(before, after) == [
        Change("generation", 1, 2), Change("gone.x", 1, None), Change("new.y.z", None, 3),
        Change("nics", [1], [1, 2]), Change("power", "running", "stopped"),
        Change("template.image", "a", "b")]
    assert diff(before, dict(before)) == []
    assert diff(None, {"a": 1}) == [Change("a", None, 1)]
    assert diff({"a": {}}, {"a": {"b": None}, "c": None}) == []  # appeared, unset


def test_plain_outcome_line_is_the_rich_one_without_styles() -> None:
    for o in [
        Outcome(seq=7, at=1_700_000_000_123, cmd_id="k", type="StopInstance", source="user",
                kind="instance", id="vm1", accepted=True, events=("PowerSet",),
                jobs=("job.h1.instance.vm1",)),
        Outcome(seq=123456, at=1, cmd_id="k", type="CreateInstance", source="system",
                kind="instance", id="vm1", accepted=False, reason="exists",
                commands=("network/n:AttachPort", "scheduler/default:Place")),
        Outcome(seq=1, at=0, cmd_id="k", type="X", source="h1", kind="lb", id="a",
                accepted=True, reason="why"),
        Outcome(seq=3, at=5, cmd_id="k", type="X", source="admin", kind="instance",
                id="a-name-longer-than-the-log-column", accepted=True),
    ]:
        assert outcome_plain(o) == outcome_line(o).plain
        assert log_plain(o) == log_line(o).plain


def test_keys_name_their_causes() -> None:
    assert follow_up_parent("fx-42-0") == 42
    assert follow_up_parent("fx-42") is None and follow_up_parent("applied-h-x-1-0") is None
    job = JobRef("h1", "instance", "vm-1", 3, 0, removal=False)
    ok = Outcome(seq=9, at=0, cmd_id="applied-h1-vm-1-3-0", type="Applied", source="h1",
                 kind="instance", id="vm-1", accepted=True)
    assert job.answers(ok)
    assert not job.answers(Outcome(seq=9, at=0, cmd_id="applied-h1-vm-1-3-0", type="Applied",
                                   source="h2", kind="instance", id="vm-1", accepted=True))
    pending = Node(job=job)
    assert job_status(pending) == "pending"
    pending.status = "pending"
    assert waiting_for(pending, applied=True) == [
        "job.h1.instance.vm-1 generation 3 attempt 0: no report yet"]
    assert waiting_for(pending, applied=False) == []
    assert job_status(Node(job=job, children=[Node(outcome=ok)])) == "applied"
    degraded = Outcome(seq=10, at=0, cmd_id="rc-vm-1-3-0", type="Reconcile", source="system",
                       kind="instance", id="vm-1", accepted=True, events=("Degraded",))
    assert job.answers(degraded)
    assert job_status(Node(job=job, children=[Node(outcome=degraded)])) == "failed"
    # A host's own job (an evacuation's notice) is read by its agent, never answered.
    notice = Node(job=JobRef("h1", "host", "h1", 1, 0, removal=False))
    notice.status = job_status(notice)
    assert notice.status == "notice" and waiting_for(notice, applied=True) == []


def test_wait_takes_an_optional_word() -> None:
    assert wait_argument(["publish", "X", "y", "--wait"]) == ["publish", "X", "y",
                                                              "--wait=outcome"]
    assert wait_argument(["publish", "--wait", "applied", "X", "y"]) == [
        "publish", "--wait=applied", "X", "y"]
    assert wait_argument(["publish", "--wait", "X", "y"]) == ["publish", "--wait=outcome",
                                                             "X", "y"]
    assert wait_argument(["publish", "--", "--wait"]) == ["publish", "--", "--wait"]
    assert wait_argument(["agent", "--host", "h1", "--wait"]) == ["agent", "--host", "h1",
                                                                  "--wait"]


def test_an_entity_folded_again_gives_each_commands_change_and_jobs() -> None:
    def stored(seq: int, source: str, doc: dict) -> Stored:
        cmd = command_from_dict({"cmd_id": f"c{seq}", **doc})
        subject = stored_command_subject(partition_of(cmd.kind, cmd.id, 8), source, cmd.kind,
                                         cmd.id)
        return Stored(seq, seq * 1000, subject, encode(cmd))

    template = {"vcpus": 1, "memory_mib": 64, "image": "tiny"}
    fold = EntityFold(("instance", "vm1"), 8)
    steps = list(fold.feed([
        stored(1, "user", {"type": "CreateInstance", "id": "vm1", "template": template}),
        stored(2, "system", {"type": "Placed", "id": "vm1", "host": "h1"}),
        stored(3, "user", {"type": "StopInstance", "id": "vm1"}),
        stored(4, "user", {"type": "StopInstance", "id": "vm1"}),
    ]))
    assert steps[0].before is None and steps[0].after is not None
    assert [j.host for j in steps[1].folded.jobs] == ["h1"]
    changed = {c.path: (c.before, c.after) for c in diff(steps[2].before, steps[2].after)}
    assert changed["power"] == ("running", "stopped")
    assert changed["generation"][1] == changed["generation"][0] + 1
    assert steps[2].folded.jobs[0].generation == changed["generation"][1]
    assert not steps[3].folded.changed and steps[3].before == steps[3].after
    assert fold.last_seq == 3 and fold.read_upto == 4
