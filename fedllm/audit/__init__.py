"""Empirical privacy auditing of a run (one-run audit, Steinke, Nasr and Jagielski 2023)."""
