"""A renderer that records how many of its calls were under way at once, in a file beside OUTPUT: what Ray
Data's pool really does with a member, seen from inside the actor. Importable by Ray workers."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa

from flux_worker.renderer import Renderer


class CountingRenderer(Renderer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lock, self.under_way, self.most = threading.Lock(), 0, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.lock:
            self.under_way += 1
            self.most = max(self.most, self.under_way)
        try:
            return super().__call__(batch)
        finally:
            with self.lock:
                self.under_way -= 1
            Path(f"{self.writer.root}.calls-at-once-{os.getpid()}").write_text(str(self.most))
