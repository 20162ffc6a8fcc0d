"""The schema verdicts recorded on the control machine (config/records.py says where).

A profile or inventory that passed its JSON Schema is recorded as an empty file named by the
sha256 of provision's version, the schema and the document, under `$PROVISION_CACHE_DIR/valid/` (default
`$XDG_CACHE_HOME/provision/valid/`): a run on an unchanged file then skips jsonschema, whose
import alone costs a no-op run about 50 ms. The document is hashed by its repr(), which tells
8188 from 8188.0 and a date from a string as the schema does. Only passes are recorded: a document
with problems is validated on every run, to report them; the semantic checks always run.
"""

from __future__ import annotations

import hashlib
from typing import Any

from provisioner import __version__
from provisioner.config.records import cache_dir

def digest(schema_text: str, data: Any) -> str:
    h = hashlib.sha256(f"{__version__}\0{schema_text}\0".encode())
    h.update(repr(data).encode())
    return h.hexdigest()


def passed(key: str) -> bool:
    return (cache_dir() / "valid" / key).is_file()


def record_pass(key: str) -> None:
    """Best effort: a cache that cannot be written only means validating again next time."""
    folder = cache_dir() / "valid"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / key).touch()
    except OSError:
        pass
