"""A render driver that SIGKILLs itself at a named point of its run, as an operator's kill -9 or a lost node would.

    python -m tests.kill_driver MANIFEST OUTPUT MODEL POINT [--rerender-changed]

POINT: `render` (before any image is written), `commit` (images written, none committed: where a changed row's
image was once overwritten in place), `settle` (new rows committed, old rows and images not yet retired),
`retire` (old rows retired, old images not yet). It renders with the stand-in renderer (tests/stand_in.py) on
the Ray cluster RAY_ADDRESS names. Exit status -9 means it was killed where asked; 0 means it never got there.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from pipeline import committed_images, ledger, render
from pipeline import run as run_module
from schemas import JobSpec
from tests.stand_in import stand_in


def kill_at(module: Any, name: str, when: Any = lambda *args, **kwargs: True) -> None:
    """Replace `module.name` with a function that kills this process when `when(...)` holds, else calls through."""
    original = getattr(module, name)

    def killing(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, killing)


def main(argv: list[str]) -> None:
    manifest, output, model, point = argv[:4]
    if point == "render":
        kill_at(run_module, "_render_plan")
    elif point == "commit":
        kill_at(ledger.MetadataWriter, "flush", lambda writer: bool(writer._pending))
    elif point == "settle":
        kill_at(committed_images, "settle")
    elif point == "retire":
        kill_at(committed_images, "_retire")
    else:
        raise SystemExit(f"unknown point {point}")
    job = JobSpec.model_validate({"manifest": manifest, "output": {"uri": output}, "model": {"name": model},
                                  "commit_seconds": 0})
    render(job, rerender_changed="--rerender-changed" in argv, progress=False, renderer_class=stand_in())


if __name__ == "__main__":
    main(sys.argv[1:])
