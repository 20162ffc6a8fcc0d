"""Plan-time Hugging Face Hub metadata (size, LFS sha256, commit) of one file, via huggingface_hub,
recorded on the control machine (hub_cache.py) so that planning a converged host needs no Hub.

Runs on the control machine only; the host downloads the bytes itself (remote/fetch.py).
Tested against huggingface_hub >=1.0,<3 (2.4 in the dev venv): its transport moved from requests to
httpx (then httpx2) across majors, so transport errors are recognised by module, not by import.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from provisioner.errors import PlanError
from provisioner.resources import hub_cache
from provisioner.resources.memo import SingleFlight

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
DEFAULT_REF = "main"
TIMEOUT_S = 20.0
RETRY_AFTER_S = 0.5      # one more try after a connection the Hub (or a proxy on the way) reset


@dataclass(frozen=True)
class RemoteFile:
    url: str                          # {endpoint}/{repo}/resolve/{commit or revision}/{path}
    size: int
    sha256: str | None                # LFS oid; None for a small non-LFS file
    commit: str | None


Lookup = Callable[..., RemoteFile]
"""`(endpoint, repo, path, revision, token, *, token_env=...) -> RemoteFile`, injectable in tests."""


def is_commit(revision: str | None) -> bool:
    return revision is not None and bool(_COMMIT.match(revision))


def file_metadata(endpoint: str, repo: str, path: str, revision: str | None = None,
                  token: str | None = None, *, token_env: str = "HF_TOKEN") -> RemoteFile:
    """Size, sha256 and commit of `repo/path` at `revision` (None: the repo's main branch).

    Answered from the control machine's record of the Hub (hub_cache.py) when it has one: a
    commit's files never change, and a branch is the commit it was first resolved as. Otherwise
    the Hub is asked and the answer recorded. Memoised per process. Raises a one-line `PlanError`
    for a missing repo, revision or file, a gated repo, an HTTP error, or a Hub that cannot be
    reached (with nothing recorded).
    """
    key = (endpoint.rstrip("/"), repo, path, revision or DEFAULT_REF, token, token_env)
    return _memo.get(key, lambda: _recorded_or_fetched(*key))


def locked(endpoint: str, repo: str, path: str, commit: str, size: int, sha256: str | None) -> RemoteFile:
    """A file as a lock pinned it: no Hub, no record; the URL names the commit."""
    return RemoteFile(_url(endpoint, repo, path, commit), size, sha256, commit)


def _url(endpoint: str, repo: str, path: str, revision: str) -> str:
    """`huggingface_hub.hf_hub_url` for a model repo (a test holds the two equal): a plan answered
    from the record must not pay the library's import (≈ 60 ms) to format a string."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"


def _recorded_or_fetched(endpoint: str, repo: str, path: str, ref: str, token: str | None,
                         token_env: str) -> RemoteFile:
    commit = ref if is_commit(ref) else hub_cache.commit_of(endpoint, repo, ref)
    if commit is not None:
        known = hub_cache.file_at(endpoint, repo, commit, path)
        if known is not None:
            return RemoteFile(_url(endpoint, repo, path, commit), known[0], known[1], commit)
    found = _fetch(endpoint, repo, path, commit or ref, token, token_env)
    if found.commit:
        hub_cache.record(endpoint, repo, ref, found.commit, path, found.size, found.sha256)
    return found


_memo: SingleFlight[RemoteFile] = SingleFlight()


def clear_cache() -> None:
    _memo.clear()


def _fetch(endpoint: str, repo: str, path: str, revision: str, token: str | None,
           token_env: str) -> RemoteFile:
    tries = 0
    while True:
        try:
            return _lookup(endpoint, repo, path, revision, token)
        except Exception as err:  # noqa: BLE001 - every Hub failure becomes one PlanError line below
            tries += 1
            if tries == 2 or not _is_reset(err):
                raise _plan_error(err, endpoint, repo, path, revision, token, token_env) from err
        time.sleep(RETRY_AFTER_S)


def _lookup(endpoint: str, repo: str, path: str, revision: str, token: str | None) -> RemoteFile:
    # Imported here, not at module level: huggingface_hub costs ~150 ms to import, and only a
    # plan needs it (`validate`, `facts`, `schema` and --help do not).
    from huggingface_hub import HfApi, RepoFile, get_hf_file_metadata, hf_hub_url

    # One HEAD answers everything for an LFS file: commit, sha256 (X-Linked-Etag) and size.
    # token=False (not None) so a token stored on the control machine is never sent to an
    # endpoint the profile did not give one for.
    head = get_hf_file_metadata(hf_hub_url(repo, path, revision=revision, endpoint=endpoint),
                                token=token or False, timeout=TIMEOUT_S, endpoint=endpoint)
    commit = head.commit_hash
    sha256 = head.etag if head.etag and _SHA256.match(head.etag) else None
    size = head.size
    if sha256 is None or size is None:
        # Not LFS, or a Hub that did not link the LFS etag: ask paths-info, the authoritative source.
        api = HfApi(endpoint=endpoint, token=token or False)
        infos = api.get_paths_info(repo, [path], revision=commit or revision)
        info = infos[0] if infos else None
        if not isinstance(info, RepoFile):
            raise PlanError(f"{path} in {repo} is a folder, not a model file")
        size = info.lfs.size if info.lfs else info.size
        sha256 = info.lfs.sha256 if info.lfs else None
    url = hf_hub_url(repo, path, revision=commit or revision, endpoint=endpoint)
    return RemoteFile(url=url, size=int(size), sha256=sha256, commit=commit)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


_HTTP_CLIENTS = {"httpx", "httpx2", "httpcore", "requests", "urllib3"}    # huggingface_hub's, across majors


def _from_http_client(err: BaseException) -> bool:
    return type(err).__module__.split(".")[0] in _HTTP_CLIENTS


def _is_transport(err: BaseException) -> bool:
    return _from_http_client(err) or isinstance(err, (ConnectionError, TimeoutError))


def _is_reset(err: BaseException) -> bool:
    """A connection dropped under the request (reset, closed, refused for a moment), as the HTTP
    client reports it: worth one more try. Not a timeout (a Hub that does not answer in TIMEOUT_S
    would only make the plan wait twice), nor huggingface_hub's own refusals (offline mode)."""
    return ((_from_http_client(err) or isinstance(err, ConnectionResetError))
            and "timeout" not in type(err).__name__.lower())


def _plan_error(err: Exception, endpoint: str, repo: str, path: str, revision: str,
                token: str | None, token_env: str) -> PlanError:
    if isinstance(err, PlanError):
        return err
    from huggingface_hub.errors import (FileMetadataError, GatedRepoError, HfHubHTTPError,
                                        OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(err, GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        fix = ("the token in " + token_env + " has no access: accept the repo's terms on the Hub"
               if token else "set " + token_env + " to a token that accepted its terms")
        return PlanError(f"gated repo {repo} at {endpoint}: {fix}")
    if isinstance(err, RevisionNotFoundError):
        return PlanError(f"revision {revision!r} not found in repo {repo} at {endpoint}")
    if isinstance(err, RemoteEntryNotFoundError):
        return PlanError(f"model file {path} not found in repo {repo} at rev {revision}")
    if isinstance(err, RepositoryNotFoundError):
        hint = "" if token else f" (if it is private, set {token_env})"
        return PlanError(f"model repo {repo} not found at {endpoint}{hint}")
    if isinstance(err, OfflineModeIsEnabled):
        return PlanError(f"Hub lookups are off (HF_HUB_OFFLINE is set): cannot read {repo}/{path}")
    if isinstance(err, HfHubHTTPError):
        status = getattr(err.response, "status_code", "?") if err.response is not None else "?"
        if status == 401 and token:
            return PlanError(f"Hub at {endpoint} refused the token in {token_env} (HTTP 401); renew it")
        return PlanError(f"Hub at {endpoint} answered HTTP {status} for {repo}/{path}: {_first_line(err)}")
    if isinstance(err, FileMetadataError):
        return PlanError(f"{endpoint} does not answer like a Hugging Face Hub for {repo}/{path}: "
                         f"{_first_line(err)}")
    if _is_transport(err) or isinstance(err, OSError):
        return PlanError(f"Hub unreachable at {endpoint}: {type(err).__name__}: {_first_line(err)}")
    raise err
