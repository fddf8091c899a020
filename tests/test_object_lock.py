"""The object-store writer lock against a real S3 server (moto on 127.0.0.1)."""
from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import obstore
import pytest

from multigrounding.cache.location import Location
from multigrounding.cache.object_lock import LOCK_KEY, LockRecord, ObjectStoreLock
from multigrounding.cache.store import CacheLockedError


@pytest.fixture
def location(s3_server, s3_bucket):
    return Location.parse(f"s3://{s3_bucket}/cache", s3_server.storage_options)


def _held(location) -> dict:
    return json.loads(location.read_bytes(LOCK_KEY))


def _plant(location, host="elsewhere", pid=4242, heartbeat_age=0.0) -> None:
    """Write a lock record as another writer would have left it."""
    beat = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=heartbeat_age)
    record = LockRecord(owner="someone", host=host, boot_id="another-boot", pid=pid,
                        created=beat.isoformat(), heartbeat=beat.isoformat(), token="planted")
    location.write_bytes(LOCK_KEY, record.to_bytes())


def test_a_second_writer_is_refused_naming_the_holder(location):
    with ObjectStoreLock(location):
        with pytest.raises(CacheLockedError) as refused:
            ObjectStoreLock(location).acquire()
    message = str(refused.value)
    assert str(location) in message
    assert socket.gethostname() in message and f"pid {os.getpid()}" in message


def test_the_record_names_owner_host_and_pid_and_release_removes_it(location):
    with ObjectStoreLock(location):
        held = _held(location)
        assert held["host"] == socket.gethostname()
        assert held["pid"] == os.getpid()
        assert held["owner"] and held["created"] and held["heartbeat"]
    assert not location.exists(LOCK_KEY)
    with ObjectStoreLock(location):   # free again
        pass


def test_the_heartbeat_advances(location):
    with ObjectStoreLock(location, heartbeat=0.2) as lock:
        first = _held(location)["heartbeat"]
        time.sleep(0.9)
        later = _held(location)["heartbeat"]
        lock.check()
    assert datetime.datetime.fromisoformat(later) > datetime.datetime.fromisoformat(first)


def test_a_live_lock_of_another_host_is_refused(location):
    _plant(location, heartbeat_age=5)
    with pytest.raises(CacheLockedError, match="someone on elsewhere"):
        ObjectStoreLock(location, timeout=600).acquire()
    assert _held(location)["token"] == "planted"


def test_a_stale_lock_is_taken_over(location):
    _plant(location, heartbeat_age=3600)
    with ObjectStoreLock(location, timeout=600):
        held = _held(location)
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    assert not location.exists(LOCK_KEY)


def test_a_killed_writer_on_this_machine_does_not_block_a_rerun(location):
    """kill -9 leaves the lock object behind; a rerun on the same machine takes it at once."""
    script = ("import sys, time\n"
              "from multigrounding.cache.location import Location\n"
              "from multigrounding.cache.object_lock import ObjectStoreLock\n"
              "lock = ObjectStoreLock(Location.parse(sys.argv[1], __import__('json').loads(sys.argv[2])))\n"
              "lock.acquire(); print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script, location.url,
                              json.dumps(dict(location.storage_options))],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError, match=f"pid {child.pid}"):
            ObjectStoreLock(location).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert _held(location)["pid"] == child.pid          # left behind
    with ObjectStoreLock(location, timeout=600):        # well within the timeout
        assert _held(location)["pid"] == os.getpid()


def _race(location, takers: int) -> list:
    """``takers`` threads acquire at once; returns the locks that won."""
    barrier = threading.Barrier(takers)
    won, refused = [], []

    def take():
        lock = ObjectStoreLock(location, timeout=600)
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except CacheLockedError:
            refused.append(lock)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) + len(refused) == takers
    return won


@pytest.mark.parametrize("stale", [False, True], ids=["no-lock", "stale-lock"])
def test_of_racing_writers_exactly_one_wins(s3_server, s3_bucket, stale):
    for trial in range(8):
        location = Location.parse(f"s3://{s3_bucket}/race{trial}", s3_server.storage_options)
        if stale:
            _plant(location, heartbeat_age=3600)
        won = _race(location, takers=4)
        assert len(won) == 1, f"trial {trial}: {len(won)} writers hold the lock"
        assert _held(location)["token"] == won[0].record.token
        won[0].release()


def test_a_lock_taken_over_while_held_is_noticed_and_not_deleted(location):
    lock = ObjectStoreLock(location, heartbeat=0.2)
    lock.acquire()
    try:
        # another writer judged it stale and replaced it (as after a long pause of this one)
        _plant(location, host="taker", heartbeat_age=0)
        deadline = time.monotonic() + 10
        while lock._lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(CacheLockedError, match="lost the writer lock.*someone on taker"):
            lock.check()
    finally:
        lock.release()
    assert _held(location)["host"] == "taker"      # the new holder's lock survives


def test_an_unreadable_fresh_lock_object_is_refused(location):
    location.write_bytes(LOCK_KEY, b"not json")
    with pytest.raises(CacheLockedError, match="unreadable"):
        ObjectStoreLock(location).acquire()


def test_schemes_without_conditional_writes_are_refused():
    with pytest.raises(CacheLockedError, match="memory://"):
        ObjectStoreLock(Location.parse("memory://somewhere/cache"))


def test_the_conditional_writes_reach_the_server(location):
    """The lock's guarantees rest on these two: a create over an object, and a replace with a
    stale ETag, are both refused by the server."""
    store = location.obstore()
    first = obstore.put(store, "probe", b"1", mode="create")
    with pytest.raises(obstore.exceptions.AlreadyExistsError):
        obstore.put(store, "probe", b"2", mode="create")
    obstore.put(store, "probe", b"3", mode={"e_tag": first["e_tag"]})
    with pytest.raises(obstore.exceptions.PreconditionError):
        obstore.put(store, "probe", b"4", mode={"e_tag": first["e_tag"]})
    assert location.read_bytes("probe") == b"3"
