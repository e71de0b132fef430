"""`fluxbatch` in a subprocess, rendering with the stand-in renderer (tests/stand_in.py), optionally SIGKILLed at
a named point of its run, as an operator's kill -9 or a lost node would stop it.

    python -m tests.stand_in_cli [--kill-at POINT] [--seconds-per-image S] render MANIFEST OUTPUT --model MODEL ...

For tests of the driver in a process of its own (two drivers racing, a driver killed): no torch is imported, so
it starts in a second or two. It joins the Ray cluster RAY_ADDRESS names. POINT: `render` (before any image is
written), `commit` (images written, none committed: where a changed row's image was once overwritten in place),
`settle` (new rows committed, old rows and images not yet retired), `retire` (nothing retired yet, in the middle
of settling), `rows` (old images retired, their rows not yet). Exit status -9 means it was killed where asked.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from jobs.cli import main as fluxbatch
from pipeline import render_stage
from pipeline import run as run_module
from pipeline.store import committed_images, ledger
from tests.stand_in import member_classes, stand_in


def kill_at(owner: Any, name: str, when: Any = lambda *args, **kwargs: True) -> None:
    """Replace `owner.name` with a function that kills this process when `when(...)` holds, else calls through."""
    original = getattr(owner, name)

    def killing(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, killing)


POINTS = {
    "render": lambda: kill_at(run_module, "_render_plan"),
    "commit": lambda: kill_at(ledger.MetadataWriter, "flush", lambda writer: bool(writer._pending)),
    "settle": lambda: kill_at(committed_images, "settle"),
    "retire": lambda: kill_at(committed_images, "_retire"),
    "rows": lambda: kill_at(ledger, "rewrite_part"),
}


def main(argv: list[str]) -> int:
    seconds = 0.0
    while argv[:1] in (["--kill-at"], ["--seconds-per-image"]):
        if argv[0] == "--kill-at":
            POINTS[argv[1]]()
        else:
            seconds = float(argv[1])
        argv = argv[2:]
    render_stage.in_actor = member_classes(stand_in(seconds), render_stage.in_actor)
    return fluxbatch(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
