"""Files a job writes into OUTPUT before it calls `render` (the drawn manifest, the synthesis spec), put back as
they were when the render is refused: a refused job leaves OUTPUT byte-identical, as a refused render does.

`synthesize` and `catalog run` write their manifest into OUTPUT first because the render reads it from there. If
the render is then refused (no GPUs for the replicas, changed rows, a lease held, any error with exit code 2),
each of those files gets back the bytes it had, or goes if it was not there, and a folder the job made is removed.
A render that fails once under way keeps the manifest its rows were committed from.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from schemas.errors import FluxbatchError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def restored_on_refusal(fs: Any, root: str, names: list[str]) -> Iterator[None]:
    """Within the block, the files `names` under `root` may be written; a refusal raised in it restores them."""
    made_root = fs.local and not os.path.isdir(root)
    before: dict[str, bytes | None] = {}
    for name in names:
        path = f"{root}/{name}"
        before[path] = fs.read_bytes(path) if fs.exists(path) else None
    try:
        yield
    except FluxbatchError as error:
        if error.refused:  # the render changed nothing (pipeline/run.py); once under way, the manifest stays
            _restore(fs, root, before, made_root)
        raise


def _restore(fs: Any, root: str, before: dict[str, bytes | None], made_root: bool) -> None:
    try:
        for path, data in before.items():
            if data is not None:
                fs.write_bytes(path, data)
            elif fs.exists(path):
                fs.rm_file(path)
        if made_root:
            with contextlib.suppress(OSError):  # something else is in it by now: left as it is
                os.rmdir(root)
    except Exception as error:  # noqa: BLE001 - the refusal is what the user must see
        log.warning("could not put back what this refused job wrote into %s: %s", fs.uri(root), error)
