"""Where nunchaku wheels can be had: list each WheelSource's wheels for a version (control machine, plan time)."""

from __future__ import annotations

import hashlib
import json
import posixpath
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from packaging.version import Version

from provisioner import secrets
from provisioner.catalog.wheels import release_tag, wheel_combo
from provisioner.config.model import HubSpec, WheelSource
from provisioner.resources.memo import SingleFlight

TIMEOUT_S = 20.0
GITHUB_TOKEN_ENV = "GITHUB_TOKEN"   # optional: lifts the API's 60 requests/hour anonymous limit


@dataclass(frozen=True)
class Asset:
    """One wheel a source offers: the host fetches `url`, or the control machine pushes `local_path`."""

    name: str
    url: str = ""
    size: int | None = None
    sha256: str | None = None
    local_path: str | None = None


@dataclass(frozen=True)
class Listing:
    """What one source offers for one version; `error` says why it offers nothing (404, unreachable)."""

    source: WheelSource
    where: str                       # the URL or directory that was asked, for messages
    assets: tuple[Asset, ...] = ()
    error: str | None = None


Lister = Callable[..., Listing]     # (source, version, filename, *, hub, base_dir) -> Listing


def github_api_url(repo_url: str, tag: str) -> str:
    """github.com -> api.github.com; any other host is GitHub Enterprise (`/api/v3`)."""
    u = urllib.parse.urlsplit(repo_url.rstrip("/").removesuffix(".git"))
    owner_repo = u.path.strip("/")
    base = "https://api.github.com" if u.netloc.lower() == "github.com" else f"{u.scheme}://{u.netloc}/api/v3"
    return f"{base}/repos/{owner_repo}/releases/tags/{urllib.parse.quote(tag)}"


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None):
    import urllib.request   # here: its http.client, email and ssl are a no-op run's 20 ms, never used there

    req = urllib.request.Request(url, method=method, headers={"User-Agent": "provision", **(headers or {})})
    return urllib.request.urlopen(req, timeout=TIMEOUT_S)  # follows GitHub's 301/302 redirects


def _http_error(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        if err.code == 403 and err.headers.get("X-RateLimit-Remaining") == "0":
            return f"GitHub API rate limit reached (set {GITHUB_TOKEN_ENV})"
        return f"HTTP {err.code}"
    reason = getattr(err, "reason", err)
    return f"unreachable ({reason})"


def _list_github(source: WheelSource, version: str) -> Listing:
    tag = release_tag(version)
    api = github_api_url(source.value, tag)
    headers = {"Accept": "application/vnd.github+json"}
    token = secrets.read(GITHUB_TOKEN_ENV)
    if token and urllib.parse.urlsplit(api).netloc == "api.github.com":
        headers["Authorization"] = f"Bearer {token}"       # never sent to another host
    try:
        with _request(api, headers=headers) as resp:
            release = json.load(resp)
    except urllib.error.HTTPError as err:
        why = f"no release {tag}" if err.code == 404 else _http_error(err)
        return Listing(source, api, error=why)
    except (urllib.error.URLError, OSError, ValueError) as err:
        return Listing(source, api, error=_http_error(err))
    assets = []
    for a in release.get("assets") or ():
        digest = a.get("digest") or ""
        assets.append(Asset(
            a["name"], a["browser_download_url"], a.get("size"),
            digest.removeprefix("sha256:") if digest.startswith("sha256:") else None,
        ))
    return Listing(source, api, tuple(assets))


def _probe_mirror(source: WheelSource, version: str, filename: str) -> Listing:
    url = source.value.format(version=Version(version).public, tag=release_tag(version), filename=filename)
    try:
        with _request(url, method="HEAD") as resp:
            size = resp.headers.get("Content-Length")
    except (urllib.error.URLError, OSError) as err:
        why = "not found" if isinstance(err, urllib.error.HTTPError) and err.code == 404 else _http_error(err)
        return Listing(source, url, error=why)
    return Listing(source, url, (Asset(filename, url, int(size) if size else None),))


def _list_huggingface(source: WheelSource, hub: HubSpec) -> Listing:
    from huggingface_hub import HfApi, RepoFile
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = hub.endpoint.rstrip("/")
    api = HfApi(endpoint=endpoint, token=secrets.read(hub.token_env) or False)
    where = f"{endpoint}/{source.value}"
    try:
        entries = list(api.list_repo_tree(source.value, recursive=True))
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        return Listing(source, where, error=f"HTTP {status}" if status else str(err).splitlines()[0])
    except Exception as err:  # noqa: BLE001 - transport errors: httpx (hub 1.x) or httpx2 (hub 2.x)
        return Listing(source, where, error=f"unreachable ({type(err).__name__}: {err})")
    assets = []
    for e in entries:
        if not e.path.endswith(".whl") or not isinstance(e, RepoFile):   # a RepoFolder has no size
            continue
        lfs = getattr(e, "lfs", None)
        sha = lfs.sha256 if lfs is not None else None
        url = f"{endpoint}/{source.value}/resolve/main/{urllib.parse.quote(e.path)}"
        assets.append(Asset(posixpath.basename(e.path), url, e.size, sha))
    return Listing(source, where, tuple(assets))


def _list_wheelhouse(source: WheelSource, base_dir: str) -> Listing:
    folder = Path(base_dir, source.value).resolve()
    if not folder.is_dir():
        return Listing(source, str(folder), error="no such directory on the control machine")
    assets = tuple(Asset(p.name, size=p.stat().st_size, local_path=str(p))
                   for p in sorted(folder.glob("*.whl")) if p.is_file())
    return Listing(source, str(folder), assets)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_listings: SingleFlight[Listing] = SingleFlight()


def _memo(key: tuple, make: Callable[[], Listing]) -> Listing:
    # One plan covers a whole fleet: ask each source once per run, not once per host.
    return _listings.get(key, make)


def clear_cache() -> None:
    _listings.clear()


def list_wheels(source: WheelSource, version: str, filename: str, *,
                hub: HubSpec = HubSpec(), base_dir: str = ".") -> Listing:
    """The nunchaku wheels `source` offers for `version`.

    A source that can list (github, huggingface, wheelhouse) gives all its wheels, so a plan that
    finds none for the host can say which combinations exist; a mirror can only be asked about
    `filename` itself (HEAD). Network and 404 answers become `Listing.error`, never exceptions:
    the caller tries the next source.
    """
    kind = source.kind
    if kind == "github":
        listing = _memo(("github", source.value, release_tag(version)), lambda: _list_github(source, version))
    elif kind == "mirror":
        return _memo(("mirror", source.value, version, filename), lambda: _probe_mirror(source, version, filename))
    elif kind == "huggingface":
        listing = _memo(("hf", source.value, hub.endpoint), lambda: _list_huggingface(source, hub))
    elif kind == "wheelhouse":
        listing = _memo(("dir", source.value, base_dir), lambda: _list_wheelhouse(source, base_dir))
    else:
        return Listing(source, source.value, error=f"unknown wheel source kind {kind!r}")
    wheels = tuple(a for a in listing.assets if wheel_combo(a.name, version))
    return Listing(source, listing.where, wheels, listing.error)
