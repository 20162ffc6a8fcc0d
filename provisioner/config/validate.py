"""`provision validate`: every problem of profiles and inventories, without contacting any host."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from provisioner.config.inventory import load_inventory
from provisioner.config.inventory_forms import from_listing, inventory_form, is_listing
from provisioner.config.load import load_profile, profile_for_host
from provisioner.config.marks import Document, problem, read_yaml
from provisioner.config.schema import schema
from provisioner.errors import ConfigError, Problem, ProvisionError, UsageError


def _looks_like_inventory(data: Any) -> bool:
    """A file whose top level is only Ansible groups (`all:` …, or a listing's `_meta`) and no profile key."""
    profile_keys = set(schema("profile")["properties"])
    return isinstance(data, Mapping) and ("all" in data or "_meta" in data) and not profile_keys & set(data)


def _profile_problems(file: str, document: Document) -> list[Problem]:
    """The profile, then its inventory, its hosts pattern and each selected host's overlay."""
    loaded = load_profile(file, document)
    profile = loaded.profile
    if not profile.inventory:  # the hosts come from `-i` at run time
        return []
    try:
        inventory = load_inventory(profile.inventory)
    except ConfigError as err:
        return list(err.problems)
    out: list[Problem] = []
    try:
        hosts = inventory.select(profile.hosts)
    except UsageError as err:
        return [problem(loaded.marks, file, ("hosts",), str(err))]
    for host in hosts:
        try:
            profile_for_host(loaded, host)
        except ConfigError as err:
            out += err.problems
    return out


def validate_files(paths: Sequence[str | os.PathLike[str]]) -> list[Problem]:
    """Every problem of every file (profiles, or inventories), without contacting any host.

    Never raises for bad input: unreadable, empty, binary or malformed files are problems too.
    """
    found: list[Problem] = []
    for path in paths:
        file = os.fspath(path)
        try:
            if inventory_form(file) != "yaml":  # INI, or a script
                load_inventory(file)
                continue
            document = read_yaml(file)  # once: parsing is most of the time a large file costs
            if is_listing(document.data) and _looks_like_inventory(document.data):
                load_inventory(file, from_listing(document.data, document.marks, file))
            elif _looks_like_inventory(document.data):
                load_inventory(file, document)
            else:
                found += _profile_problems(file, document)
        except ConfigError as err:
            found += err.problems
        except ProvisionError as err:
            found.append(Problem(file, 0, 0, "", str(err)))
        except RecursionError:
            found.append(Problem(file, 0, 0, "", "nested too deeply to read"))
    return list(dict.fromkeys(found))
