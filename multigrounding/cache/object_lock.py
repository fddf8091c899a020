"""The writer lock of a store on an object store, where flock does not exist.

The lock is one small JSON object, ``.lock.json`` at the store's root, and every change to it is
a conditional write, which S3 (and GCS, Azure) make atomic:

* **take**: a put with ``If-None-Match: *`` — it succeeds only where no lock object exists;
* **heartbeat**: every ``heartbeat`` seconds (default a tenth of ``timeout``) the holder rewrites
  the object with ``If-Match: <its last ETag>``; if that fails, someone took the lock over, and
  the holder's ``check()`` raises from then on;
* **take over a stale lock**: a lock is stale when its heartbeat is older than ``timeout``
  (default 10 minutes), or at once when it was written on this same machine (hostname and boot
  id) by a process that no longer exists (a writer killed with SIGKILL, rerun here). A stale lock
  is replaced with ``If-Match: <the ETag that was read>``, so of two takers only one can win;
* **release**: the holder stops the heartbeat and deletes the object if it is still its own.

The record names the owner (user), host, pid, when the lock was taken and the last heartbeat,
so a refused writer is told who holds it. Heartbeat ages are judged with this machine's clock
against the holder's: hosts must agree to well within ``timeout`` (NTP does). obstore sends the
conditional writes: one API for S3, GCS and Azure, with both ``mode="create"`` and
``UpdateVersion`` (s3fs can only create, boto3 speaks only S3).
"""
from __future__ import annotations

import datetime
import getpass
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass

from multigrounding.cache.errors import CacheLockedError
from multigrounding.cache.location import Location

log = logging.getLogger(__name__)

LOCK_KEY = ".lock.json"
DEFAULT_TIMEOUT = 600.0      # seconds without a heartbeat before a lock may be taken over


@dataclass
class LockRecord:
    """What the lock object holds (JSON)."""

    owner: str
    host: str
    boot_id: str
    pid: int
    created: str       # ISO 8601, UTC
    heartbeat: str     # ISO 8601, UTC; rewritten by the holder
    token: str         # unique per acquisition

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LockRecord | None":
        """The record, or None when the object is not one of ours."""
        try:
            value = json.loads(data)
            return cls(**{name: value[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return (f"{self.owner} on {self.host} (pid {self.pid}), since {self.created}, "
                f"last heartbeat {_age(self.heartbeat):.0f} s ago")


class ObjectStoreLock:
    """``with ObjectStoreLock(location):`` — hold the store's writer lock; a second writer is
    refused at once with CacheLockedError naming the holder."""

    def __init__(self, location: Location | str, timeout: float = DEFAULT_TIMEOUT,
                 heartbeat: float | None = None):
        self.location = Location.parse(location)
        self.store = self.location.obstore()
        if self.store is None:
            raise CacheLockedError(
                f"{self.location}: cannot lock a store on {self.location.scheme}:// (no "
                "conditional writes there); write the cache to a local folder or to s3://")
        self.timeout = float(timeout)
        self.heartbeat = float(heartbeat) if heartbeat is not None else self.timeout / 10
        self.record: LockRecord | None = None
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def acquire(self) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError

        now = _now()
        record = LockRecord(owner=_user(), host=socket.gethostname(), boot_id=_boot_id(),
                            pid=os.getpid(), created=now, heartbeat=now, token=uuid.uuid4().hex)
        for _ in range(5):   # the lock may vanish between a refused create and the read
            try:
                result = obstore.put(self.store, LOCK_KEY, record.to_bytes(), mode="create")
                break
            except AlreadyExistsError:
                pass
            seen = self._read()
            if seen is None:
                continue
            reason = self._stale_reason(seen)
            if reason is None:
                raise CacheLockedError(self._refusal(seen.record))
            try:
                result = obstore.put(self.store, LOCK_KEY, record.to_bytes(),
                                     mode={"e_tag": seen.etag})
            except (PreconditionError, FileNotFoundError, NotFoundError):
                seen = self._read()  # another taker won, or the holder came back to life
                if seen is None:
                    continue
                raise CacheLockedError(self._refusal(seen.record)) from None
            log.warning("%s: took over a stale lock (%s)", self.location, reason)
            break
        else:
            raise CacheLockedError(f"{self.location}: the lock object {LOCK_KEY} keeps "
                                   "appearing and vanishing; another writer is starting")
        self.record, self._etag, self._lost = record, result["e_tag"], None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="object-store-lock",
                                        daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise CacheLockedError if the lock was taken over while held (call between shards)."""
        if self._lost is not None:
            raise CacheLockedError(f"{self.location}: lost the writer lock: {self._lost}")

    def release(self) -> None:
        """Stop the heartbeat; delete the lock object if it is still ours."""
        import obstore

        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.record is None or self._lost is not None:
            return
        from obstore.exceptions import BaseError

        try:
            seen = self._read()
            if seen is not None and seen.etag == self._etag:
                obstore.delete(self.store, LOCK_KEY)
        except BaseError as exc:  # the run's work is done; the lock goes stale by the rule above
            log.warning("%s: could not remove the lock object %s (%s); it is taken over once "
                        "stale", self.location, LOCK_KEY, str(exc).splitlines()[0])
        self.record = None

    def __enter__(self) -> "ObjectStoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _beat(self) -> None:
        import obstore
        from obstore.exceptions import NotFoundError, PreconditionError

        while not self._stop.wait(self.heartbeat):
            self.record.heartbeat = _now()
            try:
                result = obstore.put(self.store, LOCK_KEY, self.record.to_bytes(),
                                     mode={"e_tag": self._etag})
            except (PreconditionError, FileNotFoundError, NotFoundError):
                seen = self._read()
                holder = seen.record.describe() if seen and seen.record else "nobody"
                self._lost = f"the lock object changed under us (now held by {holder})"
                log.error("%s: %s", self.location, self._lost)
                return
            except Exception as exc:  # a network error: retry at the next beat
                log.warning("%s: lock heartbeat failed (%s); retrying", self.location, exc)
                continue
            self._etag = result["e_tag"]

    def _read(self) -> "_Seen | None":
        """The lock object as it is now, or None if there is none."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            got = obstore.get(self.store, LOCK_KEY)
            data = bytes(got.bytes())
        except (FileNotFoundError, NotFoundError):
            return None
        return _Seen(LockRecord.from_bytes(data), got.meta["e_tag"], got.meta["last_modified"])

    def _stale_reason(self, seen: "_Seen") -> str | None:
        """Why the lock may be taken over, or None while it is alive."""
        held = seen.record
        if held is None:
            age = (datetime.datetime.now(datetime.timezone.utc) - seen.modified).total_seconds()
            if age > self.timeout:
                return f"an unreadable lock object, last written {age:.0f} s ago"
            return None
        if held.host == socket.gethostname() and held.boot_id == _boot_id() \
                and not _pid_alive(held.pid):
            return f"its process {held.pid} on this machine is gone"
        age = _age(held.heartbeat)
        if age > self.timeout:
            return f"no heartbeat for {age:.0f} s (> {self.timeout:.0f} s) from {held.describe()}"
        return None

    def _refusal(self, held: LockRecord | None) -> str:
        if held is None:
            return (f"{self.location}: {LOCK_KEY} is there but unreadable; if no extraction is "
                    f"writing to this cache, delete it")
        return (f"{self.location}: another extraction is writing to this cache: "
                f"{held.describe()}; wait for it to finish (a lock with no heartbeat for "
                f"{self.timeout:.0f} s is taken over)")


@dataclass
class _Seen:
    record: LockRecord | None     # None: the object is not a lock record
    etag: str
    modified: datetime.datetime   # the store's own time of the last write


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _age(stamp: str) -> float:
    """Seconds since an ISO 8601 time (huge for an unparseable one)."""
    try:
        then = datetime.datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        return float("inf")
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in a bare container
        return f"uid {os.getuid()}"


def _boot_id() -> str:
    """This boot of this machine (Linux); with the hostname it says 'the same machine'."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
