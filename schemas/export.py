"""JSON Schema of every message on the bus, for clients in other languages."""

from typing import Any

import msgspec

from schemas.commands import AnyCommand
from schemas.jobs import SPECS, Job
from schemas.outcomes import Outcome


def json_schema() -> dict[str, Any]:
    """Jobs come in one shape per kind of entity (their subject's kind token says which)."""
    jobs = [Job[spec] for spec in SPECS.values()]  # type: ignore[valid-type]
    (command, *job_schemas, outcome), components = msgspec.json.schema_components(
        [AnyCommand, *jobs, Outcome], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "orch bus messages",
        "oneOf": [command, *job_schemas, outcome],
        "$defs": components,
    }
