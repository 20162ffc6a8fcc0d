"""Host-side apply lock holder (stdlib only, Python >= 3.8), run as `python3 -c SOURCE PATH TIMEOUT OWNER`.

Takes `flock` on PATH (waiting up to TIMEOUT seconds, printing `waiting HOLDER` once), prints
`locked PREVIOUS` (what the file held, as a JSON string; null when this holder made PATH's folder,
which changes what the facts of the host show), writes `OWNER`, a fresh token and `held`
into it (three lines), then holds the lock until its stdin ends: when the controller closes the
channel or dies, the lock goes with it, so it can never go stale; the file then says `released`.
On timeout it prints `busy HOLDER` and exits 75 (EX_TEMPFAIL).

The file's text is the host's apply generation: a facts gather that read the same text, ending in
`released` (or no file at all), before this lock was taken saw the host as it still is (no apply
held the lock since), so the controller need not gather again under it (remote.lock_untouched).
"""

import fcntl
import json
import os
import stat
import sys
import time


def main():
    path, timeout, owner = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    made = not os.path.isdir(os.path.dirname(path))   # a folder (the root, even) no facts saw yet
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.islink(os.path.dirname(path)):       # provision's folder led elsewhere: not ours to write
        print("%s is a link: remove it" % os.path.dirname(path), file=sys.stderr, flush=True)
        return 2
    # Not through a link, and never a FIFO or a device put in its place: the holder's name is read back.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        print("the lock file %s is not a regular file: remove it" % path, file=sys.stderr, flush=True)
        return 2
    deadline, told = time.monotonic() + timeout, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            holder = read(fd).split("\n", 1)[0].strip() or "another apply"
            if time.monotonic() > deadline:
                print("busy " + holder, flush=True)
                return 75
            if not told:
                print("waiting " + holder, flush=True)
                told = True
            time.sleep(0.2)
    previous = read(fd)
    mine = "%s\n%s\n" % (owner.replace("\n", " "), os.urandom(8).hex())
    write(fd, mine + "held\n")
    print("locked " + json.dumps(None if made else previous), flush=True)
    sys.stdin.read()  # hold the lock until the controller closes the channel or goes away
    write(fd, mine + "released\n")
    return 0


def read(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace")


def write(fd, text):
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


if __name__ == "__main__":
    sys.exit(main())
