"""Reports and inspection: analytic cost, comparison tables and plots, routing maps."""

from routelab.report.flops import Cost, model_cost

__all__ = ["Cost", "model_cost"]
