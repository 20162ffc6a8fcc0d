"""The Hub stand-in speaks enough of the real protocol for huggingface_hub itself."""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from provisioner.sandbox.hf_server import HfServer, start_hf_server

REPO, GATED = "Comfy-Org/Qwen-Image_ComfyUI", "org/gated"
VAE = "split_files/vae/qwen_image_vae.safetensors"
DATA = bytes(range(256)) * 1000
SHA = hashlib.sha256(DATA).hexdigest()
TOKEN = "hf_stand_in_token"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HfServer]:
    on_disk = tmp_path / "readme.md"
    on_disk.write_text("# model card\n")
    files = {(REPO, VAE): DATA, (REPO, "README.md"): on_disk, (GATED, "w.safetensors"): b"gated bytes"}
    with start_hf_server(files, gated={GATED}, token=TOKEN, commit="c" * 40) as server:
        yield server


def test_hf_hub_download_follows_the_cdn_redirect(hub: HfServer, tmp_path: Path) -> None:
    path = hf_hub_download(REPO, VAE, endpoint=hub.url, cache_dir=tmp_path / "cache", token=TOKEN)
    assert Path(path).read_bytes() == DATA
    assert "c" * 40 in path                                        # snapshot folder named by X-Repo-Commit
    head, get = hub.requests
    assert (head.origin, head.method, head.status) == ("hub", "HEAD", 302)
    assert (get.origin, get.method, get.status, get.body_bytes) == ("cdn", "GET", 200, len(DATA))
    assert head.headers["Authorization"] == f"Bearer {TOKEN}" and "Authorization" not in get.headers


def test_non_lfs_file_is_served_by_the_hub_itself(hub: HfServer, tmp_path: Path) -> None:
    path = hf_hub_download(REPO, "README.md", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert Path(path).read_text() == "# model card\n"
    assert {r.origin for r in hub.requests} == {"hub"}


def test_file_metadata_carries_commit_linked_etag_and_size(hub: HfServer) -> None:
    meta = get_hf_file_metadata(hf_hub_url(REPO, VAE, endpoint=hub.url), token=False, endpoint=hub.url)
    assert (meta.commit_hash, meta.etag, meta.size) == ("c" * 40, SHA, len(DATA))
    assert meta.location.startswith(hub.cdn_url + "/cdn/" + SHA)


def test_paths_info_gives_lfs_sha256_and_omits_missing_paths(hub: HfServer) -> None:
    infos = HfApi(endpoint=hub.url, token=False).get_paths_info(REPO, [VAE, "README.md", "nope"], revision="main")
    by_path = {i.path: i for i in infos}
    assert set(by_path) == {VAE, "README.md"}
    assert by_path[VAE].lfs is not None and (by_path[VAE].lfs.sha256, by_path[VAE].lfs.size) == (SHA, len(DATA))
    assert by_path["README.md"].lfs is None and by_path["README.md"].size == len("# model card\n")


def test_repo_info_and_tree(hub: HfServer) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    info = api.model_info(REPO, revision="main")
    assert info.sha == "c" * 40 and {s.rfilename for s in info.siblings or []} == {VAE, "README.md"}
    assert {f.path for f in api.list_repo_tree(REPO, path_in_repo="split_files", recursive=True)} == {VAE}


@pytest.mark.parametrize(("repo", "path", "rev", "error"), [
    ("nobody/nothing", VAE, "main", RepositoryNotFoundError),
    (REPO, "missing.safetensors", "main", RemoteEntryNotFoundError),
    (REPO, VAE, "v9", RevisionNotFoundError),
    (GATED, "w.safetensors", "main", GatedRepoError),
])
def test_errors_map_to_huggingface_hub_exceptions(hub: HfServer, repo: str, path: str, rev: str,
                                                  error: type[Exception]) -> None:
    with pytest.raises(error):
        get_hf_file_metadata(hf_hub_url(repo, path, revision=rev, endpoint=hub.url), token=False, endpoint=hub.url)
    api = HfApi(endpoint=hub.url, token=False)
    if error is RemoteEntryNotFoundError:  # like the Hub, paths-info leaves a missing path out
        assert api.get_paths_info(repo, [path], revision=rev) == []
        return
    with pytest.raises(error):
        api.get_paths_info(repo, [path], revision=rev)


def test_gated_repo_opens_with_the_token(hub: HfServer) -> None:
    meta = get_hf_file_metadata(hf_hub_url(GATED, "w.safetensors", endpoint=hub.url), token=TOKEN,
                                endpoint=hub.url)
    assert meta.size == len(b"gated bytes")


def _cdn(hub: HfServer, headers: dict[str, str]) -> urllib.request.Request:
    return urllib.request.Request(f"{hub.cdn_url}/cdn/{SHA}", headers=headers)


def test_cdn_ranges(hub: HfServer) -> None:
    with urllib.request.urlopen(_cdn(hub, {"Range": "bytes=1000-"})) as resp:
        assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 1000-{len(DATA) - 1}/{len(DATA)}"
        assert resp.read() == DATA[1000:]
    with urllib.request.urlopen(_cdn(hub, {"Range": "bytes=-10"})) as resp:
        assert resp.status == 206 and resp.read() == DATA[-10:]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(_cdn(hub, {"Range": f"bytes={len(DATA)}-"}))
    assert err.value.code == 416 and err.value.headers["Content-Range"] == f"bytes */{len(DATA)}"


def test_drop_after_hangs_up_mid_body_once(hub: HfServer) -> None:
    hub.drop_after(5000)
    with urllib.request.urlopen(_cdn(hub, {})) as resp, pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert len(err.value.partial) == 5000
    with urllib.request.urlopen(_cdn(hub, {})) as resp:
        assert resp.read() == DATA                                   # only the next GET was dropped


def test_throttle_caps_the_rate(hub: HfServer) -> None:
    hub.throttle_bps = 1_000_000
    started = time.monotonic()
    with urllib.request.urlopen(_cdn(hub, {"Range": "bytes=0-199999"})) as resp:
        assert len(resp.read()) == 200_000
    assert time.monotonic() - started >= 0.15                        # 200 kB at 1 MB/s: ~0.2 s
