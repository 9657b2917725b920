"""The cluster model: plain typed data, no Qt, no I/O."""

from cloudmon.model.cluster import ClusterModel, NodeState, NodeStatus, NodeSummary

__all__ = ["ClusterModel", "NodeState", "NodeStatus", "NodeSummary"]
