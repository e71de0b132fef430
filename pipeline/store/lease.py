"""One driver per OUTPUT: `OUTPUT/_lease.json`, taken before a run writes anything and let go when it ends.

The lease names its holder (host, pid, run id, start) and when it was last renewed. A background thread
renews it every quarter of `expires_after` seconds; a lease not renewed for `expires_after` seconds is stale
(its driver was killed, or its machine lost), and the next driver takes it over. A second driver meeting a
live lease is refused with `LeaseHeldError` before it writes anything.

Every change of the lease is a compare-and-swap, so two drivers can never both believe they took it:
- S3 (and S3-compatible stores with conditional writes): creation is a put with `If-None-Match: *`
  (s3fs `pipe_file(mode="create")`); renewal, takeover of a stale lease and release are conditional on the
  ETag the driver last saw (`If-Match`). The store decides, atomically; of two racing drivers one gets 412.
- Local disk: each read-compare-write of the lease happens under an exclusive `flock` of the lease file
  itself. O_EXCL alone would make creation atomic but not takeover, renewal or release; a kernel lock makes
  all four atomic, is held for milliseconds, and dies with its process, so a crash never leaves it held.
  (On NFS, Linux maps flock to POSIX locks, which NFSv4 servers enforce across machines.)
- Any other fsspec store: read, compare, write; best effort (a warning says so).
A driver killed on this machine (same kernel and PID namespace) is noticed at once: its PID is gone. One on
another machine is noticed when its lease goes stale. Staleness compares the holder's wall clock (renewed_at)
with the reader's, so drivers' clocks must agree to well within `expires_after` (NTP does).

A driver whose lease was taken over (it stalled for longer than `expires_after`, or could not reach storage)
finds out at its next renewal; `Lease.check()` then raises `LeaseLostError`, and the run calls it before
every commit, so it stops committing.

Versions (pipeline/store/ledger.py): a run holds OUTPUT's lease while it picks its version folder (`check_job`
may write `_versions/<n>/_job.json`). A run of a later version then takes that folder's own lease and lets
OUTPUT's go; a run of the first version keeps OUTPUT's lease, so while it runs, runs of other versions
are refused too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from flux_worker.storage import Storage
from schemas.errors import FluxbatchError
from schemas.layout import LEASE_FILE

log = logging.getLogger(__name__)

# Seconds without renewal after which a lease is stale. A killed driver on another machine blocks OUTPUT
# this long; a live one renews every quarter of it, so it survives a few failed renewals.
LEASE_SECONDS = 60.0


class LeaseHeldError(FluxbatchError):
    """Another driver holds OUTPUT's lease: two drivers writing one OUTPUT would render and commit twice."""


class LeaseLostError(FluxbatchError):
    """This driver's lease was taken over (or could not be renewed in time): it must stop committing."""

    exit_code = 1  # the run had started: not a usage mistake


@dataclass
class Holder:
    """What `_lease.json` says: who holds the lease, since when, and until when it counts without renewal."""

    host: str
    pid: int
    run_id: str
    started_at: float  # Unix seconds
    renewed_at: float
    expires_after: float
    machine: str | None = None  # kernel boot id and PID namespace: where `pid` means something

    def stale_at(self) -> float:
        return self.renewed_at + self.expires_after

    def is_stale(self) -> bool:
        return time.time() > self.stale_at()

    def is_live(self) -> bool:
        """The holder may still be writing: renewed lately, and not known dead on this machine."""
        return not self.is_stale() and not self.is_dead_here()

    def is_dead_here(self) -> bool:
        """True when the holder ran on this machine and its process is gone (SIGKILL, OOM kill, reboot-free)."""
        if self.machine is None or self.machine != _machine():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # someone else's live process
            return False
        return False

    def describe(self) -> str:
        return (f"run {self.run_id} on host {self.host} (pid {self.pid}), started {_utc(self.started_at)}; "
                f"its lease goes stale at {_utc(self.stale_at())} unless that driver renews it")

    def to_bytes(self) -> bytes:
        document = {**asdict(self), "started_at_utc": _utc(self.started_at), "renewed_at_utc": _utc(self.renewed_at)}
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder, or None for an empty or unreadable lease (a writer died mid-write): free to take."""
        try:
            document = json.loads(data)
            return cls(**{name: document[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            if data.strip():
                log.warning("unreadable lease %r; treating it as free", data[:200])
            return None


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _machine() -> str | None:
    """This kernel's boot id and this PID namespace: two processes sharing it can see each other's PIDs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


class _LocalSlot:
    """The lease file on local disk; every read and swap happens under an exclusive flock of the file."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:  # else a release unlinked the file while we waited: lock the new one
                    yield fd
                    return
            finally:
                os.close(fd)  # also drops the lock

    @staticmethod
    def _content(fd: int) -> bytes:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)

    def read(self) -> tuple[bytes | None, Any]:
        with self._locked() as fd:
            data = self._content(fd)
        return (data or None), data  # the tag is the content itself

    def swap(self, tag: Any, data: bytes | None) -> Any:
        """Replace the lease (or remove it, data None) if it still is what `tag` says; the new tag, else None."""
        with self._locked() as fd:
            if self._content(fd) != (tag or b""):
                return None
            if data is None:
                os.unlink(self.path)  # under the lock: a waiter sees another inode and retries
                return b""
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            return data


class _ObjectSlot:
    """The lease object on S3: conditional puts and deletes on its ETag, decided by the store."""

    def __init__(self, fs: Storage, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes | None, Any]:
        # ETag first, then the body: a body newer than the ETag only makes the next swap fail and re-read.
        try:
            etag = self.fs.info(self.path, refresh=True)["ETag"]
            data = self.fs.read_bytes(self.path)
        except FileNotFoundError:
            return None, None
        return data, etag

    def swap(self, tag: Any, data: bytes | None) -> Any:
        """Put (or delete) only if the object's ETag is `tag` (None: only if there is none); new ETag, or None."""

        s3 = self.fs.fs  # s3fs itself: conditional puts and deletes are S3's, not fsspec's

        def attempt() -> Any:
            try:
                if data is None:
                    bucket, key, _ = s3.split_path(self.path)
                    s3.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=tag)
                    return ""
                condition = {"IfMatch": tag} if tag else {"mode": "create"}  # If-None-Match: *
                return s3.pipe_file(self.path, data, **condition)["ETag"]
            except FileNotFoundError:  # If-Match on a gone object; a delete retried after it landed is done
                return "" if data is None else None
            except OSError as error:
                if _lost_race(error):
                    return None
                raise

        # A retried put whose first try landed fails its condition; the caller re-reads and finds its own bytes.
        return self.fs.retry(attempt, f"write {self.fs.uri(self.path)}")


def _lost_race(error: BaseException) -> bool:
    """A 412 PreconditionFailed (or AWS's 409 ConditionalRequestConflict): another writer changed the lease."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict")


class _PlainSlot:
    """Any other fsspec store: read, compare, write. Not atomic: two drivers starting within the same moment
    may both get through; one started later is refused."""

    def __init__(self, fs: Storage, path: str):
        self.fs, self.path = fs, path
        log.warning("%s: this store has no conditional writes fluxbatch knows; the lease is best effort",
                    fs.uri(path))

    def read(self) -> tuple[bytes | None, Any]:
        try:
            data = self.fs.read_bytes(self.path)
        except FileNotFoundError:
            return None, None
        return data, data

    def swap(self, tag: Any, data: bytes | None) -> Any:
        if self.read()[1] != tag:
            return None
        if data is None:
            self.fs.rm_file(self.path)
            return ""
        self.fs.write_bytes(self.path, data)
        return data


def _slot(fs: Storage, root: str) -> _LocalSlot | _ObjectSlot | _PlainSlot:
    path = f"{root}/{LEASE_FILE}"
    if fs.local:
        return _LocalSlot(path)
    if fs.protocol in ("s3", "s3a"):
        return _ObjectSlot(fs, path)
    return _PlainSlot(fs, path)


class Lease:
    """This driver's lease on one folder: `acquire()`, then `check()` before each commit, then `release()`."""

    def __init__(self, fs: Storage, root: str, run_id: str, seconds: float = LEASE_SECONDS):
        self.root, self.run_id, self.seconds = root, run_id, seconds
        self._slot = _slot(fs, root)
        self._where = fs.uri(root)
        self._tag: Any = None
        self._started = time.time()
        self._renewed = 0.0  # monotonic time of the last renewal's start
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._previous: bytes | None = None  # the lease as this driver found it (a released or stale one)
        self.restore_on_release = False  # a refused run puts back what it found: OUTPUT byte-identical

    def _record(self) -> bytes:
        now = time.time()
        return Holder(host=socket.gethostname(), pid=os.getpid(), run_id=self.run_id, started_at=self._started,
                      renewed_at=now, expires_after=self.seconds, machine=_machine()).to_bytes()

    def _swap(self, tag: Any, data: bytes | None) -> Any:
        """A swap that also counts as done when a lost reply hid our own success (the lease holds our bytes)."""
        new_tag = self._slot.swap(tag, data)
        if new_tag is None and data is not None:
            current, current_tag = self._slot.read()
            if current == data:
                return current_tag
        return new_tag

    def acquire(self) -> Lease:
        """Take the lease, or raise `LeaseHeldError` naming the live holder; starts renewing it."""
        for _ in range(5):  # each pass either takes the lease or sees another driver change it
            data, tag = self._slot.read()
            holder = Holder.from_bytes(data) if data else None
            if holder is not None and holder.is_live():
                raise held_error(self._where, holder)
            mark = time.monotonic()
            new_tag = self._swap(tag, self._record())
            if new_tag is not None:
                if holder is not None:
                    log.warning("took over the lease on %s from %s (%s)", self._where, holder.describe(),
                                "its process is gone" if holder.is_dead_here() else "stale")
                self._tag, self._renewed, self._held, self._previous = new_tag, mark, True, data
                self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}", daemon=True)
                self._thread.start()
                return self
        raise LeaseHeldError(f"{self._where}: the lease changed hands 5 times while this driver tried to take it; "
                             "another driver is starting on it. Run again when it has finished")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            mark = time.monotonic()
            try:
                tag = self._swap(self._tag, self._record())
            except Exception as error:  # noqa: BLE001 - storage down: retried next time; check() fails once too old
                log.warning("could not renew the lease on %s: %s", self._where, error)
                continue
            if tag is None:
                data, _ = self._slot.read()
                holder = Holder.from_bytes(data) if data else None
                self._lost = (f"{self._where}: this driver's lease was taken over by "
                              f"{holder.describe() if holder else 'nobody (it was removed)'}")
                log.error("%s; committing nothing more", self._lost)
                return
            self._tag, self._renewed = tag, mark

    def check(self) -> None:
        """Raise `LeaseLostError` unless this driver still holds the lease; call before every commit."""
        if self._lost:
            raise LeaseLostError(f"{self._lost}. Nothing more was committed; run again when that run has ended")
        silent = time.monotonic() - self._renewed
        if silent >= self.seconds:
            raise LeaseLostError(f"{self._where}: this driver could not renew its lease for {silent:.0f} s, so "
                                 "another driver may have taken it over. Nothing more was committed; run again")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours (or, with `restore_on_release`, put back the
        lease this driver found there); never raises (it runs in `finally`)."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost:
            return
        try:
            previous = self._previous if self.restore_on_release else None
            if self._slot.swap(self._tag, previous) is None:
                log.warning("the lease on %s was no longer this driver's; left as it is", self._where)
        except Exception as error:  # noqa: BLE001 - a lease left behind goes stale on its own
            log.warning("could not remove the lease on %s (%s); it goes stale in %.0f s", self._where, error,
                        self.seconds)


def held_error(where: str, holder: Holder) -> LeaseHeldError:
    return LeaseHeldError(f"{where} is being written by another fluxbatch driver: {holder.describe()}. Wait for "
                          "that run to end, or render into another OUTPUT")


def refuse_if_held(fs: Storage, root: str) -> None:
    """LeaseHeldError if a live driver holds `root`'s lease; reads only. For a job that writes into OUTPUT before
    its render takes the lease (`synthesize`, `catalog run` write their manifest there): it does not overwrite
    the manifest a running driver reads. Two such jobs started in the same instant can still both pass here; the
    lease then refuses one, which puts its manifest back (jobs/refusal.py)."""
    path = f"{root}/{LEASE_FILE}"
    if not fs.exists(path):
        return
    try:
        holder = Holder.from_bytes(fs.read_bytes(path))
    except FileNotFoundError:
        return  # released since
    if holder is not None and holder.is_live():
        raise held_error(fs.uri(root), holder)


@contextlib.contextmanager
def hold(fs: Storage, root: str, run_id: str, seconds: float = LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the lease on `root` for the block: `LeaseHeldError` if another live driver holds it."""
    lease = Lease(fs, root, run_id, seconds).acquire()
    try:
        yield lease
    finally:
        lease.release()

