"""Shared MoE machinery used by every model file: routing, dispatch, balancing losses."""

from moelab.moe.routing import RoutingInfo, TopKRouter, expert_counts

__all__ = ["RoutingInfo", "TopKRouter", "expert_counts"]
