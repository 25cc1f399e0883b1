"""Prometheus metrics of a replica, served on --metrics-port when asked for."""

from prometheus_client import Counter, Histogram

COMMANDS = Counter("orch_commands_folded_total", "Commands folded", ["kind", "outcome"])
DEAD_LETTERS = Counter("orch_dead_letters_total", "Messages the fold could not use")
ALERTS = Counter("orch_alerts_total", "Entities degraded after their retries ran out", ["kind"])
INTERNAL_ERRORS = Counter("orch_internal_errors_total",
                          "Commands the fold raised on (a bug): rejected and dead-lettered",
                          ["kind"])
BATCH_SECONDS = Histogram("orch_batch_seconds", "Fold, commit and ack of one batch",
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
