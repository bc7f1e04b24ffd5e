"""Federated strategies, one module each. Every strategy is a Flower
``flwr.serverapp.strategy.Strategy``; register it with ``@STRATEGIES.register("name")``.
Users may also name any Strategy subclass by import path (``package.module:Class``)."""

from fedsim.registry import Registry

STRATEGIES: Registry = Registry("strategy", "fedsim.strategies", entry_points="fedsim.strategies")

__all__ = ["STRATEGIES"]
