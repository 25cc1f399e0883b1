"""The libvirt domains this project manages are named ``orch-<instance id>``; nothing
else is touched."""

DOMAIN_PREFIX = "orch-"


def domain_name(instance_id: str) -> str:
    return DOMAIN_PREFIX + instance_id
