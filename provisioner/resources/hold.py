"""The pip constraints file that holds torch, torchvision, torchaudio, triton and nvidia-* at their
installed versions: passed with `-c` to every pip install a plan runs, so no requirement (a newer
accelerate, a plugin's dependency, ComfyUI's requirements.txt) can swap the CUDA build the nunchaku
wheel was compiled against.

The file is written on the host by `remote/hold.py`, run by the venv's own interpreter, which then
runs the install itself (one process, one round trip): it holds what is installed at that moment,
including a torch the same apply has just installed into a venv it created (which the facts the plan
was made from could not know).
"""

from __future__ import annotations

import posixpath

from provisioner import remote
from provisioner.catalog.requirements import HELD, HELD_PREFIX
from provisioner.config.model import Profile
from provisioner.resources.base import PIP_INSTALL, Run


def constraints_path(profile: Profile) -> str:
    return posixpath.join(profile.comfyui.state_dir, "constraints.txt")


def held_install(profile: Profile, *args: str, what: str, timeout: float) -> Run:
    """One step: write the constraints file (atomically) from the venv as it is at that moment, then
    `pip install -c FILE ARGS` in the same interpreter."""
    path = constraints_path(profile)
    request = remote.hold_request(dest=path, names=sorted(HELD), prefixes=(HELD_PREFIX,))
    return Run(remote.argv("hold", *PIP_INSTALL, "-c", path, *args, python=profile.comfyui.python), stdin=request,
               what=f"{what} (torch and its CUDA build held as installed)", timeout=timeout)
