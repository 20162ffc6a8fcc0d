"""Reference images beside the reports, and each host's images judged against its GPU class's.

`DIR/references/<gpu-class>/<key>.png` holds one reference per GPU class and image key (prompt,
seed, workflow: `verify.agreement.image_key`); `DIR/references/index.json` says where each came
from. A class without a reference for a key gets one from this run: among the hosts of that class
that passed every other check, the image the others agree with most (`agreement.medoid`; one host:
its own). `--promote-reference HOST` replaces the references of HOST's class with HOST's images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from provisioner.config import bounded
from provisioner.config.model import AgreementSpec
from provisioner.errors import ProvisionError
from provisioner.report.files import write_atomic
from provisioner.verify import checks
from provisioner.verify.agreement import (
    Agreement,
    KeyedImage,
    NotAnImage,
    Reference,
    Sketch,
    compare,
    compare_same,
    decode,
    medoid,
    sketch_of,
)
from provisioner.verify.checks import HostVerification
from provisioner.verify.fingerprint import class_slug

FOLDER, INDEX, INDEX_VERSION = "references", "index.json", 1
INDEX_CAP = 16 << 20        # bytes of index.json read (one entry is about 300)
PNG_CAP = 256 << 20         # bytes of one reference image read
NO_STORE = "no reference store; pass --report DIR"


class ReferenceStore:
    """The references of one report directory."""

    def __init__(self, report_dir: str | Path, *, root: str | Path | None = None, read_only: bool = False) -> None:
        """`report_dir`'s references, or those in `root` (`--references DIR`, shared by job slices:
        `read_only` there, since only `provision report merge` judges the whole fleet and writes)."""
        self.root = Path(root) if root is not None else Path(report_dir) / FOLDER
        self.read_only = read_only
        self._entries: dict[str, dict[str, Any]] | None = None
        self._unwritten: dict[str, bytes] = {}          # read-only: references made for this run only

    @staticmethod
    def _id(gpu_class: str, key: str) -> str:
        return f"{class_slug(gpu_class)}/{key}"

    def entries(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            path = self.root / INDEX
            try:
                raw = bounded.load_file(path, INDEX_CAP) if os.path.lexists(path) else {}
            except ValueError as err:           # a FIFO, a device, too big or too deep: bounded's why
                raise ProvisionError(f"cannot read {path}: {err} (move it away to start the references "
                                     "afresh)") from None
            found = raw.get("references") if isinstance(raw, dict) else None
            self._entries = {k: v for k, v in (found or {}).items() if isinstance(v, dict)}
        return self._entries

    def get(self, gpu_class: str, key: str) -> tuple[Reference, bytes] | None:
        """The reference and its PNG, or None (none yet, or its file is gone)."""
        ident = self._id(gpu_class, key)
        entry = self.entries().get(ident)
        if entry is None:
            return None
        if ident in self._unwritten:
            return Reference.from_json(entry), self._unwritten[ident]
        try:
            path = (self.root / str(entry["file"])).resolve()
            if not path.is_relative_to(self.root.resolve()):    # an edited index: not a reference
                return None
            png = bounded.read_regular(path, PNG_CAP)
        except (OSError, KeyError, ValueError):
            return None
        return Reference.from_json(entry), png

    def put(self, reference: Reference, png: bytes, report: str) -> None:
        """Write the PNG, then the index (both by rename: a reader sees the old or the new)."""
        ident = self._id(reference.gpu_class, reference.key)
        path = self.root / f"{ident}.png"
        if self.read_only:
            self.entries()[ident] = reference.to_json()
            self._unwritten[ident] = png
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, png)
            with Image.open(path) as img:
                size = img.size
            self.entries()[ident] = {**reference.to_json(), "file": f"{ident}.png", "report": report,
                                     "sha256": hashlib.sha256(png).hexdigest(), "width": size[0], "height": size[1]}
            index = {"version": INDEX_VERSION, "references": dict(sorted(self.entries().items()))}
            write_atomic(self.root / INDEX, (json.dumps(index, indent=2) + "\n").encode())
        except OSError as err:
            raise ProvisionError(f"cannot write the reference {path}: {err.strerror or err} "
                                 "(choose a writable --report directory)") from None


@dataclass(frozen=True)
class Outcome:
    verifications: dict[str, HostVerification]       # with `image_agreement` and their comparisons
    notes: tuple[str, ...]                            # references made or promoted, for the console
    problems: tuple[str, ...]                         # a promotion that could not be done


def _image(verification: HostVerification, key: str) -> KeyedImage | None:
    return next((i for i in verification.images if i.key == key), None)


def _choose(key: str, holders: Sequence[tuple[str, HostVerification]]) -> str | None:
    """The host whose image becomes the class's first reference for `key`: among the hosts that
    passed every check, the one the others agree with most."""
    candidates = []
    for name, ver in holders:
        image = _image(ver, key)
        if image is None or not ver.passed:
            continue
        try:
            seen = sketch_of(image)
        except NotAnImage:
            continue
        candidates.append((name, seen.shape, seen.small))
    if not candidates:
        return None
    shapes = [c[1] for c in candidates]
    common = max(set(shapes), key=lambda s: (shapes.count(s), s))       # the size most hosts made
    return medoid([(n, small) for n, shape, small in candidates if shape == common])


def agree(verifications: Mapping[str, HostVerification], store: ReferenceStore | None,
          specs: Mapping[str, AgreementSpec], *, now: str, promote: str | None = None) -> Outcome:
    """Each host's kept images against its GPU class's references; `image_agreement` added to
    every host that kept any. `specs`: each host's `verify.agreement`."""
    out = dict(verifications)
    notes: list[str] = []
    problems: list[str] = []
    with_images = {n: v for n, v in verifications.items() if v.images and v.fingerprint is not None}
    if store is None:
        for name, ver in with_images.items():
            out[name] = replace(ver, checks=ver.checks + (checks.image_agreement((), NO_STORE),))
        return Outcome(out, (), ())
    if promote is not None and promote in verifications and not verifications[promote].passed:
        failed = next((c for c in verifications[promote].checks if not c.passed), None)
        problems.append(f"{promote}'s images were not promoted: it failed verification"
                        + (f" ({failed.name}: {failed.detail})" if failed else " (no generation ran)"))
    elif promote is not None and promote not in with_images:
        problems.append(f"{promote}'s images were not promoted: it kept no image (did its generations run?)")
    found: dict[str, list[Agreement]] = {n: [] for n in with_images}
    classes: dict[str, list[tuple[str, HostVerification]]] = {}
    for name, ver in sorted(with_images.items()):
        assert ver.fingerprint is not None
        classes.setdefault(ver.fingerprint.gpu_class, []).append((name, ver))
    for gpu_class, holders in classes.items():
        keys = list(dict.fromkeys(i.key for _, v in holders for i in v.images))
        for key in keys:
            current = store.get(gpu_class, key)
            maker = None
            if promote is not None and not problems and any(n == promote for n, _ in holders) \
                    and _image(with_images[promote], key) is not None:
                maker = promote
            elif current is None:
                maker = _choose(key, holders)
            if maker is not None:
                image = _image(with_images[maker], key)
                assert image is not None
                made = Reference(gpu_class, key, maker, now, promoted=maker == promote)
                store.put(made, image.png, now)
                current = (made, image.png)
                notes.append(f"reference for {gpu_class}, {image.prompt!r} seed {image.seed}: "
                             f"{'promoted' if made.promoted else 'made'} from {maker}'s image"
                             + (" for this slice only (`provision report merge` makes the fleet's)"
                                if store.read_only else ""))
            reference = None
            # Not decoded when every holder's image is the reference's own bytes, sketched while its
            # host was verified (decodable, then, and judged from the sketch).
            if current is not None and not all(_same_sketched(image, current[1]) for _, ver in holders
                                                  if (image := _image(ver, key)) is not None):
                try:
                    reference = decode(current[1])
                except NotAnImage:
                    problems.append(f"the reference {store.root / class_slug(gpu_class) / key}.png is not an "
                                    "image: promote a host's images to replace it")
            panel: list[bytes] = []         # the reference's report panel, made once for every holder
            for name, ver in holders:
                image = _image(ver, key)
                if image is None:
                    continue
                found[name].append(_judge(image, reference, current, specs.get(name), panel))
    for name, agreements in found.items():
        ver = out[name]
        out[name] = replace(ver, checks=ver.checks + (checks.image_agreement(agreements),),
                            agreement=tuple(agreements))
    return Outcome(out, tuple(notes), tuple(problems))


def _same_sketched(image: KeyedImage, reference_png: bytes) -> bool:
    return isinstance(image.sketch, Sketch) and image.png == reference_png


def _judge(image: KeyedImage, reference: np.ndarray | None, current: tuple[Reference, bytes] | None,
           spec: AgreementSpec | None, panel: list[bytes]) -> Agreement:
    """`image` against the `reference` decoded from `current`'s PNG (None: not decoded, or not an
    image); `panel`: the reference's report panel once a host's comparison made it (filled here
    for the next)."""
    if current is None or (reference is None and not _same_sketched(image, current[1])):
        return Agreement(image.key, image.prompt, image.seed, None, True,
                         "no reference yet: no host of this GPU class passed every other check")
    source, reference_png = current
    seen = image.sketch if isinstance(image.sketch, Sketch) else None
    thresholds = spec or AgreementSpec()
    if seen is not None and image.png == reference_png:    # the host it was made from, or its twin
        found = compare_same(seen, thresholds, key=image.key, prompt=image.prompt, seed=image.seed, source=source)
    else:
        assert reference is not None
        try:
            rgb = reference if image.png == reference_png else decode(image.png)
        except NotAnImage as err:
            return Agreement(image.key, image.prompt, image.seed, source, False, f"not a readable image ({err})")
        found = compare(reference, rgb, thresholds, key=image.key, prompt=image.prompt, seed=image.seed,
                        source=source, reference_panel=panel[0] if panel else None,
                        image_panel=seen.panel if seen is not None else None)
    if not panel:
        panel.append(found.panels[0])
    return found
