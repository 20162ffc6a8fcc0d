"""The GitHub-releases stand-in, spoken to over real HTTP like github.com would be."""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.sandbox.release_server import ReleaseServer, start_release_server
from provisioner.sandbox.wheels import build_nunchaku_wheel

TAG = "v1.0.1"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ReleaseServer, Path]]:
    wheel = build_nunchaku_wheel(tmp_path, "1.0.1", "2.8", "cp312", "linux_x86_64")
    server = start_release_server({("nunchaku-tech", "nunchaku", TAG): [wheel]})
    yield server, wheel
    server.stop()


def _raw(server: ReleaseServer, method: str, path: str, headers: dict[str, str] | None = None):
    """One request without following redirects: what the server itself answered."""
    host = urllib.parse.urlsplit(server.url).netloc
    conn = http.client.HTTPConnection(host, timeout=5)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def test_download_redirects_to_object_like_github(served: tuple[ReleaseServer, Path]) -> None:
    server, wheel = served
    path = f"/nunchaku-tech/nunchaku/releases/download/{TAG}/{wheel.name}"
    resp, _ = _raw(server, "GET", urllib.parse.quote(path))
    assert resp.status == 302
    location = resp.getheader("Location")
    assert location.startswith(f"{server.url}/objects/")
    assert f"filename={urllib.parse.quote(wheel.name, safe='')}" in location
    # Following the redirect (as pip, curl -L and urllib do) gives the file's bytes.
    with urllib.request.urlopen(server.repo_url("nunchaku-tech", "nunchaku")
                                + f"/releases/download/{TAG}/{urllib.parse.quote(wheel.name)}") as got:
        assert got.read() == wheel.read_bytes()
    assert [r.status for r in server.requests] == [302, 302, 200]


def test_head_answers_size_without_body(served: tuple[ReleaseServer, Path]) -> None:
    server, wheel = served
    resp, body = _raw(server, "HEAD", "/objects/1")
    assert resp.status == 200 and body == b""
    assert int(resp.getheader("Content-Length")) == wheel.stat().st_size
    assert resp.getheader("Accept-Ranges") == "bytes"


@pytest.mark.parametrize(("header", "want"), [("bytes=10-", slice(10, None)), ("bytes=0-9", slice(0, 10)),
                                              ("bytes=-7", slice(-7, None))])
def test_object_serves_ranges(served: tuple[ReleaseServer, Path], header: str, want: slice) -> None:
    server, wheel = served
    resp, body = _raw(server, "GET", "/objects/1", {"Range": header})
    data = wheel.read_bytes()
    assert resp.status == 206
    assert body == data[want]
    start = data.index(body) if want.start is None or want.start >= 0 else len(data) + want.start
    assert resp.getheader("Content-Range") == f"bytes {start}-{start + len(body) - 1}/{len(data)}"
    assert server.requests[-1].range == header


def test_range_past_the_end_is_416(served: tuple[ReleaseServer, Path]) -> None:
    server, wheel = served
    resp, _ = _raw(server, "GET", "/objects/1", {"Range": f"bytes={wheel.stat().st_size}-"})
    assert resp.status == 416
    assert resp.getheader("Content-Range") == f"bytes */{wheel.stat().st_size}"


def test_release_api_is_shaped_like_githubs(served: tuple[ReleaseServer, Path]) -> None:
    server, wheel = served
    url = f"{server.url}/api/v3/repos/nunchaku-tech/nunchaku/releases/tags/{TAG}"
    with urllib.request.urlopen(url) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        release = json.load(resp)
    assert release["tag_name"] == TAG and release["draft"] is False
    (asset,) = release["assets"]
    assert asset["name"] == wheel.name
    assert asset["size"] == wheel.stat().st_size
    assert asset["digest"] == "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert asset["browser_download_url"] == (f"{server.repo_url('nunchaku-tech', 'nunchaku')}"
                                             f"/releases/download/{TAG}/{wheel.name}")
    with urllib.request.urlopen(asset["browser_download_url"].replace("+", "%2B")) as got:
        assert got.read() == wheel.read_bytes()


@pytest.mark.parametrize("path", ["/api/v3/repos/nunchaku-tech/nunchaku/releases/tags/v9.9.9",
                                  "/api/v3/repos/nobody/nothing/releases/tags/v1.0.1"])
def test_unknown_release_is_githubs_404_json(served: tuple[ReleaseServer, Path], path: str) -> None:
    server, _ = served
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + path)
    assert err.value.code == 404
    assert json.load(err.value)["message"] == "Not Found"


def test_unknown_asset_is_404(served: tuple[ReleaseServer, Path]) -> None:
    server, _ = served
    resp, _ = _raw(server, "GET", f"/nunchaku-tech/nunchaku/releases/download/{TAG}/nope.whl")
    assert resp.status == 404


def test_old_org_redirects_to_new_one(served: tuple[ReleaseServer, Path]) -> None:
    server, wheel = served
    old = f"/mit-han-lab/nunchaku/releases/download/{TAG}/{urllib.parse.quote(wheel.name)}"
    resp, _ = _raw(server, "GET", old)
    assert resp.status == 301
    assert resp.getheader("Location") == server.url + old.replace("mit-han-lab", "nunchaku-tech")
    with urllib.request.urlopen(server.url + old) as got:       # 301, then 302, then the bytes
        assert got.read() == wheel.read_bytes()
    api_old = f"{server.url}/api/v3/repos/mit-han-lab/nunchaku/releases/tags/{TAG}"
    with urllib.request.urlopen(api_old) as resp2:
        assert json.load(resp2)["assets"][0]["name"] == wheel.name


def test_assets_added_after_start_are_served(served: tuple[ReleaseServer, Path], tmp_path: Path) -> None:
    server, _ = served
    extra = build_nunchaku_wheel(tmp_path / "extra", "1.0.1", "2.9", "cp313", "linux_aarch64")
    server.add("nunchaku-tech", "nunchaku", TAG, extra)
    url = f"{server.url}/api/v3/repos/nunchaku-tech/nunchaku/releases/tags/{TAG}"
    with urllib.request.urlopen(url) as resp:
        names = [a["name"] for a in json.load(resp)["assets"]]
    assert extra.name in names and len(names) == 2
