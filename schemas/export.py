"""JSON Schema of every message on the bus, for clients in other languages."""

from typing import Any

import msgspec

from schemas.commands import AnyCommand
from schemas.jobs import Job
from schemas.outcomes import Outcome


def json_schema() -> dict[str, Any]:
    (command, job, outcome), components = msgspec.json.schema_components(
        [AnyCommand, Job, Outcome], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "orch bus messages",
        "oneOf": [command, job, outcome],
        "$defs": components,
    }
