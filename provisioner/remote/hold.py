"""Write the pip constraints file that holds the torch family at the versions a venv has now
(stdlib only, Python >= 3.8).

Run by the VENV's own interpreter as `VENV/bin/python -c SOURCE [PIP ARGS...]`, so importlib.metadata
reads that venv's distributions, with its request as JSON on stdin:
  {"dest": "/opt/ComfyUI/.provision/constraints.txt", "names": ["torch", "torchvision", ...],
   "prefixes": ["nvidia-"]}

Written just before each pip install, so it holds what is installed at that moment (a torch the same
apply has just installed, too). Each held distribution becomes `name==version`; a version pip cannot
pin (not PEP 440) is left out, as pip would never choose one either. The file reaches its path by a
rename: never half written.

With PIP ARGS (`install ... -c DEST ...`), pip then runs with them in this same interpreter, as
`VENV/bin/python -m pip PIP ARGS` would: the hold and the install are one process and one round
trip, and this program exits with pip's code.
"""

import json
import os
import re
import sys
import tempfile
from importlib import metadata

# PEP 440, as packaging.version.VERSION_PATTERN accepts it (abridged: no whitespace, no `v`).
PEP440 = re.compile(r"^([0-9]+!)?[0-9]+(\.[0-9]+)*([-_.]?(a|b|c|rc|alpha|beta|pre|preview)[-_.]?[0-9]*)?"
                    r"((-[0-9]+)|([-_.]?(post|rev|r)[-_.]?[0-9]*))?([-_.]?dev[-_.]?[0-9]*)?"
                    r"(\+[a-z0-9]+([-_.][a-z0-9]+)*)?$", re.IGNORECASE)


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def held(names, prefixes):
    """{canonical name: version} of the held distributions installed (first on sys.path wins)."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if not name:
            continue
        key = canonical(name)
        if key in out or not (key in names or key.startswith(tuple(prefixes))):
            continue
        version = dist.metadata.get("Version") or ""
        if PEP440.match(version):
            out[key] = version
    return out


def main():
    request = json.loads(sys.stdin.read())
    dest = request["dest"]
    pins = held(set(canonical(n) for n in request["names"]), [canonical(p) for p in request["prefixes"]])
    text = "# Written by provision before each pip install: the torch family stays as installed.\n"
    text += "".join("%s==%s\n" % item for item in sorted(pins.items()))
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".constraints-", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    print(json.dumps({"held": pins}), flush=True)
    if len(sys.argv) > 1:
        return pip(sys.argv[1:])
    return 0


def pip(args):
    """`python -m pip ARGS` in this interpreter (pip's __main__ ends it with pip's exit code)."""
    import runpy

    sys.argv = ["pip"] + list(args)
    try:
        runpy.run_module("pip", run_name="__main__", alter_sys=True)
    except ImportError as err:
        if err.name != "pip":
            raise
        print("%s: No module named pip" % sys.executable, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
