"""Discrete-event swarm simulator driven by the pure placement core (``core.placement``)."""

from swarmshard.sim.engine import SimConfig, SimReport, plot_report, simulate

__all__ = ["SimConfig", "SimReport", "simulate", "plot_report"]
