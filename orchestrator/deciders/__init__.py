"""Pure deciders, one module per entity kind, and the table that finds them."""

from types import ModuleType

import msgspec

from orchestrator.deciders import host, instance, lb, network, pool, registry, scheduler

DECIDERS: dict[str, ModuleType] = {
    "host": host,
    "instance": instance,
    "network": network,
    "pool": pool,
    "lb": lb,
    "scheduler": scheduler,
    "registry": registry,
}

STATE_TYPES: dict[str, type[msgspec.Struct]] = {
    "host": host.Host,
    "instance": instance.Instance,
    "network": network.Network,
    "pool": pool.Pool,
    "lb": lb.LoadBalancer,
    "scheduler": scheduler.Scheduler,
    "registry": registry.Registry,
}
