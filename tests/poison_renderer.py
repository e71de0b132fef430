"""A renderer whose process dies (SIGKILL, as a segfault or the OOM killer would) on a row with the prompt
"poison": the stand-in for an input that crashes its worker every time. Importable by Ray workers. It renders the
other rows as the stand-in renderer does (tests/stand_in.py): what is tested is the driver's handling of a dying
process, not the model."""

from __future__ import annotations

import os
import signal

import pyarrow as pa

from tests.stand_in import StandInRenderer


class PoisonRenderer(StandInRenderer):
    def __call__(self, batch: pa.Table) -> pa.Table:
        if "poison" in batch.column("prompt").to_pylist():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)
