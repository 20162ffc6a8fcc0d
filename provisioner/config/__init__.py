"""Profiles and their validation: `load_profile`, `profile_for_host`, `validate_files`, `schema_text`."""

from __future__ import annotations

from provisioner.config.load import LoadedProfile, load_profile, profile_for_host
from provisioner.config.schema import schema_text
from provisioner.config.validate import validate_files

__all__ = ["LoadedProfile", "load_profile", "profile_for_host", "schema_text", "validate_files"]
