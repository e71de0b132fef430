"""A renderer whose process dies (SIGKILL, as a segfault or the OOM killer would) on a row with the prompt
"poison": the stand-in for an input that crashes its worker every time. Importable by Ray workers."""

from __future__ import annotations

import os
import signal

import pyarrow as pa

from flux_worker.renderer import Renderer


class PoisonRenderer(Renderer):
    def __call__(self, batch: pa.Table) -> pa.Table:
        if "poison" in batch.column("prompt").to_pylist():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)
