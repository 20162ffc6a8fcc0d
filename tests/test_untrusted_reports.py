"""Old reports are untrusted input: `verify --compare OLD` and the report.json already in
`--report DIR` are read within bounds (config/bounded.py) and against the shape the comparison reads,
and a hostile one is one line, exit 3, before any host is touched."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from provisioner.config import bounded
from provisioner.report import read_previous, write_report
from tests.test_cli import minimal, run, write
from tests.test_report import fleet_report


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="not a regular file \\(a FIFO\\)"):
        bounded.read_regular(fifo(tmp_path / "f"), 1 << 20)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_or_a_link_to_one_is_refused_unread(tmp_path: Path, device: str) -> None:
    (tmp_path / "link").symlink_to(device)
    for path in (device, tmp_path / "link"):
        with pytest.raises(ValueError, match="character device"):
            bounded.read_regular(path, 1 << 20)


def test_a_file_over_the_cap_and_a_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than the 10"):
        bounded.read_regular(write(tmp_path / "big", "x" * 11), 10)
    with pytest.raises(ValueError, match="a folder"):
        bounded.read_regular(tmp_path, 10)
    assert bounded.read_regular(write(tmp_path / "ok", "x" * 10), 10) == b"x" * 10


@pytest.mark.parametrize(("text", "why"), [
    ("[" * 100_000 + "]" * 100_000, "nested 100000 deep"),
    ('{"a": ' * 65 + "1" + "}" * 65, "nested 65 deep"),
    ('{"v": NaN}', "NaN is not a JSON number"),
    ('{"v": -Infinity}', "-Infinity is not a JSON number"),
    ('{"v": 1e999}', "beyond a float"),
    ("{", "not JSON"),
])
def test_json_beyond_its_bounds_is_a_value_error(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("(", "\\(")):
        bounded.loads(text.encode())


def test_brackets_inside_strings_are_not_nesting() -> None:
    assert bounded.loads(json.dumps({"a": "[" * 1000})) == {"a": "[" * 1000}
    with pytest.raises(ValueError, match="not UTF-8"):
        bounded.loads(b'"\xff"')


def test_a_previous_report_of_the_wrong_shape_is_not_compared() -> None:
    # Each of these crashed the comparison (a list where a host name is: after verifying the fleet).
    for report in ({"version": 4, "hosts": [{"host": ["a", "b"]}]},
                   {"version": 4, "hosts": [{"host": "a", "figures": {"warm_median_s": "fast"}}]},
                   {"version": 4, "hosts": [{"host": "a", "checks": [["x"]]}]},
                   {"version": 4, "hosts": [{"host": "a", "fingerprint": {"models": ["x"]}}]},
                   {"version": 4, "hosts": [], "node_sets": {"h": [1]}}):
        previous, why = read_previous(json.dumps(report).encode())
        assert previous is None and "not compared" in why, report


@pytest.fixture
def down(tmp_path: Path) -> Path:
    """A profile whose one host refuses connections: verification reaching it would say so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inventory = write(tmp_path / "inv.yaml", f"all:\n  hosts:\n    down:\n      ansible_host: 127.0.0.1\n"
                                             f"      ansible_port: {port}\n")
    return minimal(tmp_path / "p.yaml", inventory)


def hostile_reports(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "zero").symlink_to("/dev/zero")
    return {
        "/dev/zero": Path("/dev/zero"), "/dev/urandom": Path("/dev/urandom"), "a link to /dev/zero": tmp_path / "zero",
        "a FIFO": fifo(tmp_path / "fifo"),
        "deep": write(tmp_path / "deep.json", "[" * 200_000 + "]" * 200_000),
        "a list as a host name": write(tmp_path / "list.json", json.dumps(
            {"version": 4, "hosts": [{"host": ["down"], "status": "passed"}]})),
        "Infinity": write(tmp_path / "inf.json", '{"version": 4, "hosts": [{"host": "down", '
                                                 '"figures": {"warm_median_s": Infinity}}]}'),
        "NaN": write(tmp_path / "nan.json", '{"version": 4, "hosts": [], "x": NaN}'),
        "not JSON": write(tmp_path / "text.json", "hello"),
        "a folder": tmp_path,
    }


def test_verify_compare_with_a_hostile_old_report_is_exit_3_before_any_host(tmp_path: Path, down: Path) -> None:
    for name, path in hostile_reports(tmp_path).items():
        started = time.monotonic()
        code, out = run("verify", str(down), "--compare", str(path), "--known-hosts", str(tmp_path / "kh"))
        lines = out.strip().splitlines()
        assert code == 3 and len(lines) == 1 and "--compare" in lines[0], (name, out)
        assert "refused" not in out and "Traceback" not in out and "internal error" not in out, (name, out)
        assert time.monotonic() - started < 5, name


def test_verify_report_dir_holding_a_fifo_is_exit_3_before_any_host(tmp_path: Path, down: Path) -> None:
    report = tmp_path / "report"
    report.mkdir()
    fifo(report / "report.json")
    for extra in ((), ("--promote-reference", "down")):
        code, out = run("verify", str(down), "--report", str(report), *extra, "--known-hosts", str(tmp_path / "kh"))
        assert code == 3 and "not a regular file (a FIFO)" in out and "move it away" in out, out
        assert "refused" not in out and len(out.strip().splitlines()) == 1, out


def test_a_report_dir_whose_report_turned_into_a_device_is_refused_when_written(tmp_path: Path) -> None:
    (tmp_path / "report.json").symlink_to("/dev/zero")
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: result.append(_raises(lambda: write_report(tmp_path, fleet_report()))))
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and "character device" in str(result[0])


def test_a_deep_previous_report_in_the_report_dir_is_not_compared_and_not_a_crash(tmp_path: Path) -> None:
    write(tmp_path / "report.json", "[" * 100_000 + "]" * 100_000)
    paths = write_report(tmp_path, fleet_report())
    assert "nested 100000 deep" in paths.report.comparison_note


def _raises(call) -> BaseException:  # type: ignore[no-untyped-def]
    try:
        call()
    except BaseException as err:  # noqa: BLE001 - the test reads what was raised
        return err
    return AssertionError("nothing raised")


def test_the_references_index_is_read_within_bounds_and_its_files_stay_in_the_store(tmp_path: Path) -> None:
    from provisioner.errors import ProvisionError
    from provisioner.report.references import ReferenceStore
    from provisioner.verify.agreement import Reference

    store = tmp_path / "references"
    store.mkdir()
    for hostile in ("[" * 5000 + "]" * 5000, '{"references": {"x": NaN}}'):
        (store / "index.json").write_text(hostile)
        with pytest.raises(ProvisionError, match="move it away"):
            ReferenceStore(tmp_path).entries()         # before: a RecursionError for the deep one
    (store / "index.json").unlink()
    fifo(store / "index.json")
    with pytest.raises(ProvisionError, match="FIFO"):
        ReferenceStore(tmp_path).entries()             # before: an empty store, silently
    (store / "index.json").unlink()
    secret = write(tmp_path / "secret.png", "not a reference")
    entry = {**Reference("RTX 3090", "k", "h", "now").to_json(), "file": "../secret.png"}
    (store / "index.json").write_text(json.dumps({"version": 1, "references": {"rtx-3090/k": entry}}))
    assert secret.exists() and ReferenceStore(tmp_path).get("RTX 3090", "k") is None
