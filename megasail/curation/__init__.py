"""Data curation: scaling-curve fits (the tools in tools/ are thin CLIs over these)."""

from megasail.curation.scaling import fit_curves, fit_form, fit_log_linear, fit_power_law
from megasail.curation.scaling_chinchilla import fit_chinchilla
from megasail.curation.scaling_points import PointsError, read_points, runs_series

__all__ = [
    "PointsError",
    "fit_chinchilla",
    "fit_curves",
    "fit_form",
    "fit_log_linear",
    "fit_power_law",
    "read_points",
    "runs_series",
]
