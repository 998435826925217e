"""Optimal Brain Surgeon: per-layer Hessian accumulation and the structured OBS solver."""

from .solver import HessianError, OBSLayer, StopForward, group_sizes, magnitude_order

__all__ = ["HessianError", "OBSLayer", "StopForward", "group_sizes", "magnitude_order"]
