"""Prometheus metrics of an agent, served on --metrics-port when asked for."""

from prometheus_client import Counter, Histogram

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0)

JOBS = Counter("orch_agent_jobs_total", "Jobs converged, by where the job came from"
               " (job: the bus; resync: every newest job, checked again on the timer) and"
               " how it ended", ["source", "outcome"])
# Looked up once: labels() takes a lock and builds a key on every call.
JOB_ENDS = {(source, outcome): JOBS.labels(source, outcome)
            for source in ("job", "resync") for outcome in ("applied", "failed", "stale")}
APPLY_SECONDS = Histogram("orch_agent_apply_seconds",
                          "The driver's apply of one job, retries included", buckets=_SECONDS)
RESYNC_SECONDS = Histogram("orch_agent_resync_seconds", "One full resync", buckets=_SECONDS)
REMOVED = Counter("orch_agent_removed_total", "Managed domains removed: no job wants them here")
_ROUNDS_SKIPPED = Counter("orch_agent_rounds_skipped_total",
                          "Heartbeats and resyncs skipped on a transient bus error", ["duty"])
ROUNDS_SKIPPED = {duty: _ROUNDS_SKIPPED.labels(duty) for duty in ("heartbeat", "resync")}
