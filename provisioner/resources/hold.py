"""The pip constraints file that holds torch, torchvision, torchaudio, triton and nvidia-* at their
installed versions: passed with `-c` to every pip install a plan runs, so no requirement (a newer
accelerate, a plugin's dependency) can swap the CUDA build the nunchaku wheel was compiled against.
"""

from __future__ import annotations

import posixpath

from packaging.version import InvalidVersion, Version

from provisioner.catalog.requirements import is_held
from provisioner.config.model import Profile
from provisioner.facts.model import PythonEnv
from provisioner.resources.base import Put


def constraints_path(profile: Profile) -> str:
    return posixpath.join(profile.comfyui.state_dir, "constraints.txt")


def constraints(env: PythonEnv) -> str:
    """`torch==2.6.0+cu124` lines for every held distribution installed, as pip knows their versions."""
    lines = []
    for key, dist in sorted(env.distributions.items()):
        if not is_held(key):
            continue
        try:
            Version(dist.version)
        except InvalidVersion:
            continue                    # pip cannot pin a legacy version; it will not pick one either
        lines.append(f"{key}=={dist.version}")
    head = "# Written by provision before each pip install: the torch family stays as installed.\n"
    return head + "".join(line + "\n" for line in lines)


def hold_step(profile: Profile, env: PythonEnv) -> tuple[Put, str]:
    """The step writing the constraints file (atomically), and its path for `pip install -c`."""
    path = constraints_path(profile)
    return Put(path, constraints(env).encode(), what=f"hold torch and its CUDA build ({path})"), path
