"""The fixture index speaks PEP 691 JSON, PEP 503 HTML, PEP 658 metadata and HTTP ranges."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
import requests

from fixtures.pypi_index import HTML_TYPE, JSON_TYPE, PypiIndexServer

JSON_ACCEPT = {"Accept": f"{JSON_TYPE}, {HTML_TYPE};q=0.2, text/html;q=0.01"}


def _page(index: PypiIndexServer, project: str) -> dict:
    answer = requests.get(index.url + f"{project}/", headers=JSON_ACCEPT, timeout=10)
    answer.raise_for_status()
    assert answer.headers["Content-Type"] == JSON_TYPE
    return answer.json()


def _file_url(index: PypiIndexServer, project: str, entry: dict) -> str:
    return requests.compat.urljoin(index.url + f"{project}/", entry["url"])


def test_json_page_lists_files_hashes_and_metadata(pypi_index):
    page = _page(pypi_index, "tabulate")
    assert page["meta"]["api-version"].startswith("1.")
    assert page["versions"] == ["0.8.10", "0.9.0"]
    entry = next(f for f in page["files"] if f["filename"].startswith("tabulate-0.9.0"))
    wheel = requests.get(_file_url(pypi_index, "tabulate", entry), timeout=10).content
    assert hashlib.sha256(wheel).hexdigest() == entry["hashes"]["sha256"]
    metadata = requests.get(_file_url(pypi_index, "tabulate", entry) + ".metadata", timeout=10)
    assert hashlib.sha256(metadata.content).hexdigest() == entry["core-metadata"]["sha256"]
    assert entry["data-dist-info-metadata"] == entry["core-metadata"]
    assert b"Name: tabulate" in metadata.content


def test_html_page_and_project_list(pypi_index):
    page = requests.get(pypi_index.url + "six/", timeout=10)
    assert page.headers["Content-Type"] == "text/html"
    assert 'href="../../files/six-1.17.0-py2.py3-none-any.whl#sha256=' in page.text
    assert "data-core-metadata=" in page.text and "data-requires-python=" in page.text
    listing = requests.get(pypi_index.url, headers=JSON_ACCEPT, timeout=10).json()
    assert {"name": "numpy"} in listing["projects"]


def test_names_are_normalised_by_redirect(pypi_index):
    answer = requests.get(pypi_index.url + "Python_Dateutil/", headers=JSON_ACCEPT, timeout=10)
    assert answer.history and answer.history[0].status_code == 301
    assert answer.json()["name"] == "python-dateutil"


def test_etag_revalidation_answers_304(pypi_index):
    first = requests.get(pypi_index.url + "six/", headers=JSON_ACCEPT, timeout=10)
    again = requests.get(
        pypi_index.url + "six/",
        timeout=10,
        headers={**JSON_ACCEPT, "If-None-Match": first.headers["ETag"]},
    )
    assert again.status_code == 304 and again.content == b""


def test_range_requests(pypi_index):
    entry = _page(pypi_index, "numpy")["files"][0]
    url = _file_url(pypi_index, "numpy", entry)
    whole = requests.get(url, timeout=30).content
    tail = requests.get(url, headers={"Range": "bytes=-1000"}, timeout=10)
    assert tail.status_code == 206 and tail.content == whole[-1000:]
    size = len(whole)
    assert tail.headers["Content-Range"] == f"bytes {size - 1000}-{size - 1}/{size}"
    middle = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=10)
    assert middle.content == whole[10:20]
    beyond = requests.get(url, headers={"Range": f"bytes={len(whole)}-"}, timeout=10)
    assert beyond.status_code == 416


def test_switches_degrade_the_server(pypi_index):
    with pypi_index.behaving(metadata=False, ranges=False):
        entry = _page(pypi_index, "six")["files"][0]
        assert "core-metadata" not in entry
        url = _file_url(pypi_index, "six", entry)
        assert requests.get(url + ".metadata", timeout=10).status_code == 404
        answer = requests.get(url, headers={"Range": "bytes=-10"}, timeout=10)
        assert answer.status_code == 200 and len(answer.content) == entry["size"]
    with pypi_index.behaving(fail_next=2, fail_status=503):
        codes = [requests.get(pypi_index.url + "six/", timeout=10).status_code for _ in range(3)]
        assert codes == [503, 503, 200]
        assert [r.status for r in pypi_index.requests] == [503, 503, 200]
    with pypi_index.behaving(latency=0.3):
        start = time.monotonic()
        requests.get(pypi_index.url + "six/", timeout=10)
        assert time.monotonic() - start >= 0.3
    with pypi_index.behaving(yanked={"tabulate-0.8.10-py3-none-any.whl": "broken"}):
        files = {f["filename"]: f["yanked"] for f in _page(pypi_index, "tabulate")["files"]}
        assert files == {
            "tabulate-0.8.10-py3-none-any.whl": "broken",
            "tabulate-0.9.0-py3-none-any.whl": False,
        }
    assert "core-metadata" in _page(pypi_index, "six")["files"][0]  # restored afterwards


def test_pip_installs_from_the_index(pypi_index, tmp_path):
    # pip is a real, demanding client: it must resolve and install through this index alone.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    env = {k: v for k, v in env.items() if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--no-cache-dir",
            "--quiet",
            "--index-url",
            pypi_index.url,
            "--target",
            str(tmp_path / "t"),
            "python-dateutil",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t" / "dateutil").is_dir() and (tmp_path / "t" / "six.py").is_file()


@pytest.mark.parametrize("flag", ["--no-metadata", "--no-ranges"])
def test_command_line_server(flag):
    process = subprocess.Popen(
        [sys.executable, "-m", "fixtures.pypi_index", "--port", "0", flag],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().split()
        assert line[0] == "ready"
        entry = requests.get(line[1] + "six/", headers=JSON_ACCEPT, timeout=10).json()["files"][0]
        assert ("core-metadata" in entry) == (flag != "--no-metadata")
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        process.stdout.close()
