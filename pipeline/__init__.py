"""The driver: manifest reading and validation, planning, the Ray Data graph, writers and summaries.

The public face is one function, `pipeline.render(JobSpec) -> RunSummary`. It is imported on first use:
`fluxbatch validate` and `plan` import `pipeline.manifest` and must not pay for Ray, torch and diffusers.
"""

from typing import Any

__all__ = ["render"]


def __getattr__(name: str) -> Any:
    if name == "render":
        from pipeline.run import render

        return render
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
