"""The driver: manifest reading and validation, planning, the Ray Data graph, writers and summaries.

The public face is one function, `pipeline.render(JobSpec) -> RunSummary`.
"""

from pipeline.run import render

__all__ = ["render"]
