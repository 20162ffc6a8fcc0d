"""The host's apply lock (remote/lock.py) as the apply's generation: what its file says while an
apply holds it and after, what the next holder is told it found, and the rule that spares an apply
its second facts gather (remote.lock_untouched). Run for real, as a host runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from provisioner import remote


def take(lock: Path, owner: str) -> tuple[subprocess.Popen[bytes], str]:
    """A holder of `lock`, and the text it says it found there."""
    holder = subprocess.Popen(remote.argv("lock", str(lock), "5", owner, python=sys.executable),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    line = holder.stdout.readline().decode()
    assert line.startswith("locked "), line
    return holder, json.loads(line[7:])


def test_the_lock_file_says_who_holds_it_then_that_it_was_released(tmp_path: Path) -> None:
    lock = tmp_path / ".provision" / "lock"
    alice, found = take(lock, "apply by alice")
    assert found is None                   # it made .provision/: the facts before it saw none there
    owner, token, state = lock.read_text().splitlines()
    assert (owner, state) == ("apply by alice", "held") and len(token) == 16
    held = lock.read_text()
    alice.communicate(b"", timeout=10)
    assert lock.read_text() == held.replace("held", "released")
    seen = lock.read_text()                                   # what a facts gather reads now
    bob, found = take(lock, "apply by bob")
    try:
        assert found == seen and remote.lock_untouched(seen, found)
        assert lock.read_text().splitlines()[1] != token      # every holder its own token
    finally:
        bob.communicate(b"", timeout=10)
    carol, found = take(lock, "apply by carol")
    carol.communicate(b"", timeout=10)
    assert not remote.lock_untouched(seen, found)             # bob held it since: gather again
    lock.unlink()                          # provision's folder there, its lock file not yet
    dave, found = take(lock, "apply by dave")
    dave.communicate(b"", timeout=10)
    assert found == "" and remote.lock_untouched(None, found)


def test_facts_that_read_a_holder_at_work_are_never_taken_as_current() -> None:
    at_work = "apply by alice\n0123456789abcdef\nheld\n"
    released = "apply by alice\n0123456789abcdef\nreleased\n"
    assert remote.lock_untouched(released, released)
    assert remote.lock_untouched(None, "") and remote.lock_untouched("", "")     # never locked
    assert not remote.lock_untouched(at_work, at_work)        # alice was at work (or was killed)
    older = "host-a pid 4242 since 10:00:00"                  # an older provision's holder: no state
    assert not remote.lock_untouched(older, older)
    assert not remote.lock_untouched(None, released)          # no file then, or it was unreadable
    assert not remote.lock_untouched(released, None)          # the holder's answer was unreadable
