"""The pip constraints file that holds torch, torchvision, torchaudio, triton and nvidia-* at their
installed versions: passed with `-c` to every pip install a plan runs, so no requirement (a newer
accelerate, a plugin's dependency, ComfyUI's requirements.txt) can swap the CUDA build the nunchaku
wheel was compiled against.

The file is written on the host by `remote/hold.py`, run by the venv's own interpreter just before
the install: it holds what is installed at that moment, including a torch the same apply has just
installed into a venv it created (which the facts the plan was made from could not know).
"""

from __future__ import annotations

import posixpath

from provisioner import remote
from provisioner.catalog.requirements import HELD, HELD_PREFIX
from provisioner.config.model import Profile
from provisioner.resources.base import Run


def constraints_path(profile: Profile) -> str:
    return posixpath.join(profile.comfyui.state_dir, "constraints.txt")


def hold_step(profile: Profile) -> tuple[Run, str]:
    """The step writing the constraints file (atomically), and its path for `pip install -c`."""
    path = constraints_path(profile)
    request = remote.hold_request(dest=path, names=sorted(HELD), prefixes=(HELD_PREFIX,))
    return Run(remote.argv("hold", python=profile.comfyui.python), stdin=request,
               what=f"hold torch and its CUDA build as installed ({path})"), path
