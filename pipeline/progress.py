"""What a run shows while it works: one stderr line per phase, a bar that moves per image, never 10 s of silence.

A run spends its first seconds (or minutes, for a large model) starting Ray and loading the model into every
actor, and its last ones checking OUTPUT and writing its records: each phase says so in one `fluxbatch: ...` line.
While the pool renders, a watcher thread asks Ray every second how many renderer actors are up (printing
"actors ready k/N" as it changes) and, with the bar on, how many images the renderers have written: they count
each image as it is written (`ImageCounter`, an actor of no CPU, made only when the bar is shown), so the bar
moves per image rather than per returned batch, and its rate and ETA start at the first finished image, not at
Ray's start. Whatever the phase, a line (or a redrawn bar) comes at least every `QUIET_SECONDS`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)
QUIET_SECONDS = 8.0  # the longest a run stays silent on stderr, with margin under the promised 10 s
POLL_SECONDS = 1.0


class ImageCounter:
    """Images written by this run's renderers, counted as each is written (a Ray actor; `image_counter()` makes it)."""

    def __init__(self) -> None:
        self.images = 0

    def add(self, images: int) -> None:
        self.images += images

    def count(self) -> int:
        return self.images


def image_counter() -> Any:
    """A new `ImageCounter` actor: no CPU reserved, so it never takes a renderer's place."""
    import ray

    return ray.remote(num_cpus=0)(ImageCounter).remote()


def say(text: str) -> None:
    """One phase line on stderr, above the bar if one is drawn; while `ray.init` runs with the process's stderr held
    in a file (pipeline/cluster/ray_session.py), straight to the terminal, so Ray's start is not silent."""
    from pipeline.cluster import ray_session

    held = ray_session.HELD_STDERR
    if held is not None:
        os.write(held, f"fluxbatch: {text}\n".encode())
        return
    tqdm.write(f"fluxbatch: {text}", file=sys.stderr)


class RunProgress:
    """The phase lines and the bar of one run; `rendering()` covers the render stage, `close()` ends the watch.

    A watcher thread runs from the start: when nothing was shown for QUIET_SECONDS (Ray starting, a model loading,
    a long batch), it redraws the bar, or says which phase is still under way and for how long."""

    def __init__(self, bar: bool):
        self.show_bar = bar
        self.started = time.monotonic()
        self.last_output = self.started
        self.phase, self.phase_started = "starting", self.started
        self.stage: RenderBar | None = None
        self.stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch, name="fluxbatch-progress", daemon=True)
        self.watcher.start()

    def say(self, text: str, phase: str | None = None) -> None:
        say(text)
        self.last_output = time.monotonic()
        if phase:
            self.phase, self.phase_started = phase, self.last_output

    def close(self) -> None:
        self.stop.set()
        self.watcher.join(timeout=5)

    def _watch(self) -> None:
        while not self.stop.wait(POLL_SECONDS):
            try:
                if self.stage is not None:
                    self.stage.poll()
                if time.monotonic() - self.last_output >= QUIET_SECONDS:
                    self._still()
            except Exception as error:  # noqa: BLE001 - progress must never stop a run
                log.debug("progress poll failed: %s", error)

    def _still(self) -> None:
        """Something on stderr after QUIET_SECONDS of nothing: the bar redrawn, else what is still under way."""
        stage = self.stage
        if stage is not None and stage.redraw():
            self.last_output = time.monotonic()
            return
        waited = time.monotonic() - self.phase_started
        detail = f": {stage.status()}" if stage is not None else ""
        self.say(f"{self.phase} ...{detail} ({waited:.0f} s)")

    @contextmanager
    def rendering(self, total: int, actors: int, count: Any = None) -> Iterator[RenderBar]:
        """The render stage of `total` images on a pool of `actors`: the bar (once the first image is written) and
        the actors' readiness; `count`, an `ImageCounter` the renderers count written images on."""
        self.say(f"loading the model on {actors} actor{'s' if actors != 1 else ''} ...", phase="loading the model")
        stage = RenderBar(self, total, actors, count)
        self.stage = stage
        try:
            yield stage
        finally:
            self.stage = None
            stage.close()


class RenderBar:
    """The bar of a render stage, moved by committed batches (`done`) and by the renderers' own count."""

    def __init__(self, progress: RunProgress, total: int, actors: int, count: Any):
        self.progress, self.total, self.actors, self.count = progress, total, actors, count
        self.ready = 0
        self.done_images = 0
        self.lock = threading.Lock()
        self.bar: tqdm | None = None
        self.stage_started = time.monotonic()

    def done(self, images: int) -> None:
        """`images` of the stage's images are back (committed or failed): the bar is at least there."""
        self._advance(images)

    def _advance(self, images: int) -> None:
        with self.lock:
            images = min(images, self.total)
            if images <= self.done_images:
                return
            if not self.done_images:
                self.progress.say("rendering", phase="rendering")
            self.done_images = images
            if not self.progress.show_bar:
                return
            if self.bar is None:
                # Rate and ETA count from the first finished image: the start-up above had its own lines.
                self.bar = tqdm(total=self.total, unit="img", desc="render", dynamic_ncols=True, file=sys.stderr)
            self.bar.update(images - self.bar.n)
            self.progress.last_output = time.monotonic()

    def poll(self) -> None:
        """Each second, from the watcher: actors ready (said as it changes) and the renderers' count of images."""
        import ray

        from pipeline.cluster import ray_private

        if self.ready < self.actors:
            ready = sum(1 for a in ray_private.actors_of_this_job()
                        if a.state == "ALIVE" and a.renders)
            if ready > self.ready:
                self.ready = min(ready, self.actors)
                waited = time.monotonic() - self.stage_started
                self.progress.say(f"actors ready {self.ready}/{self.actors} ({waited:.0f} s)")
        if self.count is not None:
            self._advance(ray.get(self.count.count.remote(), timeout=5))

    def redraw(self) -> bool:
        """Redraw the bar (its elapsed time moves while a long batch renders); False while there is none."""
        with self.lock:
            if self.bar is None:
                return False
            self.bar.refresh()
            return True

    def status(self) -> str:
        return f"actors ready {self.ready}/{self.actors}, {self.done_images}/{self.total} images"

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
