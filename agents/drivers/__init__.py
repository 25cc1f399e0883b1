"""Drivers: what an agent uses to converge the real world on its host (VMs, network, LB)."""
