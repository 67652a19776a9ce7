"""PyPI resolution on the fixture index: tags, markers, extras, yanked, pre-releases,
requires-python, backtracking, conflicts, metadata fallbacks and mixed conda + PyPI envs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import fixture_options

from envmgr.cache.local import LocalStore
from envmgr.errors import EnvmgrError
from envmgr.resolve.pypi.resolve import PypiConflictError
from envmgr.resolve.resolution_cache import resolve_specs
from envmgr.specs.deps import CondaDep, PypiDep
from envmgr.specs.model import EnvSpec
from fixtures.pypi_index import PypiIndexServer
from fixtures.wheelmaker import make_sdist, make_wheel
from fixtures.wheels import fetch_wheels

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    house = tmp_path_factory.mktemp("wheelhouse")
    for wheel in fetch_wheels().glob("*.whl"):
        os.link(wheel, house / wheel.name)
    w = lambda *a, **k: make_wheel(house, *a, **k)  # noqa: E731
    w(
        "app",
        "1.0",
        requires=[
            "linux-helper; sys_platform == 'linux'",
            "mac-helper; sys_platform == 'darwin'",
            "tabulate",
        ],
    )
    w("linux-helper", "1.0")
    w("mac-helper", "1.0")
    w("yank-me", "1.0")
    w("yank-me", "2.0")
    w("pre", "1.0")
    w("pre", "2.0b1")
    w("newpy", "1.0", requires_python=">=3.8")
    w("newpy", "2.0", requires_python=">=3.12")
    w("bt-a", "1.0")
    w("bt-a", "2.0", requires=["bt-c<2"])
    w("bt-b", "1.0", requires=["bt-c>=2"])
    w("bt-c", "1.0")
    w("bt-c", "2.0")
    w("cf-a", "1.0", requires=["cf-c<2"])
    w("cf-b", "1.0", requires=["cf-c>=2"])
    w("cf-c", "1.0")
    w("chain-top", "1.0", requires=["cf-a"])
    w("cf-c", "2.0")
    w("binpkg", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    w("binpkg", "1.0", tag="cp311-cp311-macosx_11_0_arm64")
    w("newglibc", "1.0", tag="cp311-cp311-manylinux_2_34_x86_64")
    w("newmac", "1.0", tag="cp311-cp311-macosx_14_0_arm64")
    w("newmac", "1.0", tag="cp311-cp311-macosx_10_9_x86_64")
    w("mac12", "1.0", tag="cp311-cp311-macosx_12_0_arm64")
    w("needs-numpy", "1.0", requires=["numpy>=1.20"])
    w("old-numpy-user", "1.0", requires=["numpy<2"])
    w("extra-host", "1.0", extras=["fast"], requires=["six", "colorama; extra == 'fast'"])
    make_sdist(house, "sdist-only", "1.0", requires=["six"])
    w("mixedpkg", "1.0")
    make_sdist(house, "mixedpkg", "2.0")
    server = PypiIndexServer(house).start()
    yield server
    server.stop()


@pytest.fixture
def resolve(index, conda_channel, tmp_path):
    """Resolve one spec (PyPI lines, optional conda specs) and return {name: package}."""
    index.reset()

    def run(pypi, conda=(), platform="linux-64", env=None, python="3.11"):
        options = fixture_options(
            tmp_path, conda_channel.url, index.url, platforms=(platform,), env=env or {}, force=True
        )
        spec = EnvSpec(
            python=f"{python}.*",
            pypi=tuple(PypiDep.parse(p) for p in pypi),
            conda=tuple(CondaDep.parse(c) for c in conda),
        )
        lock = resolve_specs({"train": spec}, options)[0].lock
        return {(p.name if p.manager == "pypi" else f"conda:{p.name}"): p for p in lock.packages}

    return run


def versions(found):
    return {name: p.version for name, p in found.items() if not name.startswith("conda:")}


def test_requests_with_socks_extra(resolve):
    found = resolve(["requests[socks]>=2.31", "python-dateutil"])
    assert versions(found) == {
        "requests": "2.32.3",
        "pysocks": "1.7.1",
        "certifi": "2024.8.30",
        "charset-normalizer": "3.4.0",
        "idna": "3.10",
        "urllib3": "2.2.3",
        "python-dateutil": "2.9.0.post0",
        "six": "1.17.0",
    }
    assert {"conda:python", "conda:pip"} <= set(found)
    assert all(
        len(p.sha256) == 64 and p.url.startswith("http://127.0.0.1")
        for p in found.values()
        if p.manager == "pypi"
    )
    assert "six >=1.5" in found["python-dateutil"].depends


def test_extras_only_when_asked(resolve):
    assert "colorama" in resolve(["extra-host[fast]"])
    plain = resolve(["extra-host"])
    assert "colorama" not in plain and "six" in plain


@pytest.mark.parametrize(
    ("platform", "kept", "dropped"),
    [
        ("linux-64", "linux-helper", "mac-helper"),
        ("osx-arm64", "mac-helper", "linux-helper"),
    ],
)
def test_markers_are_evaluated_for_the_target(resolve, platform, kept, dropped):
    found = resolve(["app"], platform=platform)
    assert kept in found and dropped not in found and "tabulate" in found


def test_yanked_only_when_pinned(resolve, index):
    with index.behaving(yanked={"yank_me-2.0-py3-none-any.whl": "broken build"}):
        assert versions(resolve(["yank-me"]))["yank-me"] == "1.0"
        assert versions(resolve(["yank-me==2.0"]))["yank-me"] == "2.0"
    assert versions(resolve(["yank-me"]))["yank-me"] == "2.0"


def test_prereleases_only_when_asked(resolve):
    assert versions(resolve(["pre"]))["pre"] == "1.0"
    assert versions(resolve(["pre>=2.0b1"]))["pre"] == "2.0b1"


def test_requires_python_follows_the_target_python(resolve):
    assert versions(resolve(["newpy"]))["newpy"] == "1.0"


def test_backtracking(resolve):
    assert versions(resolve(["bt-a", "bt-b"])) == {"bt-a": "1.0", "bt-b": "1.0", "bt-c": "2.0"}


def test_conflict_is_explained(resolve):
    with pytest.raises(PypiConflictError) as info:
        resolve(["cf-a", "cf-b"])
    text = str(info.value)
    assert "step 'train'" in text and "linux-64" in text
    assert "cf-c<2 (required by cf-a 1.0 ← the step)" in text
    assert "cf-c>=2 (required by cf-b 1.0 ← the step)" in text
    with pytest.raises(PypiConflictError) as deep:
        resolve(["chain-top", "cf-b"])
    assert "cf-c<2 (required by cf-a 1.0 ← chain-top 1.0 ← the step)" in str(deep.value)


def test_wheels_are_chosen_by_target_tags(resolve):
    assert "manylinux_2_17_x86_64" in resolve(["binpkg"])["binpkg"].url
    assert "macosx_11_0_arm64" in resolve(["binpkg"], platform="osx-arm64")["binpkg"].url
    with pytest.raises(PypiConflictError, match="no wheel of newglibc fits linux-64"):
        resolve(["newglibc"])
    assert "newglibc" in resolve(["newglibc"], env={"CONDA_OVERRIDE_GLIBC": "2.34"})


def test_unknown_project(resolve):
    with pytest.raises(PypiConflictError, match="no project named 'no-such-dist'"):
        resolve(["no-such-dist"])


@pytest.mark.parametrize("served", [False, True], ids=["none", "served-unadvertised"])
def test_metadata_from_ranges_when_no_metadata_files(resolve, index, tmp_path, served):
    """Without PEP 658 files in the pages, metadata comes from ranged reads of the wheels, and
    no ``.metadata`` URL is asked for, even where the index would answer one (as pip and uv:
    a mirror here answered each miss in 120-200 ms, a range in 2-35 ms)."""
    expected = versions(resolve(["requests", "python-dateutil"]))
    shutil.rmtree(tmp_path / "cache" / "pypi")
    with index.behaving(metadata=served, advertise=False):
        assert versions(resolve(["requests", "python-dateutil"])) == expected
        files = [r for r in index.requests if r.path.startswith("/files/")]
        assert files and not [r for r in files if r.path.endswith(".metadata")]
        assert all(r.range is not None and r.status == 206 for r in files)


def test_metadata_from_downloads_when_no_ranges(resolve, index, tmp_path):
    expected = versions(resolve(["requests", "python-dateutil"]))
    shutil.rmtree(tmp_path / "cache" / "pypi")
    with index.behaving(metadata=False, ranges=False):
        assert versions(resolve(["requests", "python-dateutil"])) == expected
        downloads = [
            r
            for r in index.requests
            if r.path.startswith("/files/") and not r.path.endswith(".metadata")
        ]
        assert downloads and all(r.status == 200 for r in downloads)


def test_mixed_env_takes_numpy_from_conda_once(resolve):
    found = resolve(["needs-numpy"], conda=["numpy"])
    assert "conda:numpy" in found and "numpy" not in found
    assert found["conda:numpy"].version == "2.1.3" and "needs-numpy" in found
    pypi_only = resolve(["needs-numpy"])
    assert pypi_only["numpy"].manager == "pypi"


def test_mixed_conflict_names_both_sides(resolve):
    with pytest.raises(PypiConflictError) as info:
        resolve(["old-numpy-user"], conda=["numpy"])
    text = str(info.value)
    assert "conda provides numpy 2.1.3" in text
    assert "numpy<2 (required by old-numpy-user 1.0 ← the step)" in text


def test_index_failures_are_retried_then_reported(resolve, index):
    with index.behaving(fail_next=2, fail_status=503):
        assert "tabulate" in resolve(["tabulate"])
    with index.behaving(fail_next=100, fail_status=500), pytest.raises(EnvmgrError) as info:
        resolve(["tabulate"])
    assert "127.0.0.1" in str(info.value)


def test_cli_requirements_file_and_flow(index, conda_channel, tmp_path, monkeypatch):
    monkeypatch.setenv("ENVMGR_STORE", (tmp_path / "store").as_uri())
    monkeypatch.setenv("ENVMGR_CACHE_DIR", str(tmp_path / "cache"))
    index.reset()
    req = tmp_path / "requirements.txt"
    req.write_text("tabulate<0.9\nrequests[socks]\n")
    cmd = [sys.executable, "-c", "from envmgr.cli.app import main; main()", "resolve"]
    common = ["--channel", conda_channel.url, "--index-url", index.url]
    out = tmp_path / "lock.yml"
    result = subprocess.run(
        [*cmd, "-r", str(req), "--python", "3.11", *common, "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "manager: pip" in text and "tabulate-0.8.10-py3-none-any.whl" in text
    flow = subprocess.run(
        [*cmd, str(ROOT / "fixtures" / "flows" / "envflow.py"), *common, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert flow.returncode == 0, flow.stderr
    assert '"fetch"' in flow.stdout and '"report"' in flow.stdout
    shutil.rmtree(tmp_path / "store")


@pytest.mark.online
def test_real_data_science_set_against_the_configured_index(conda_channel, tmp_path):
    options = fixture_options(tmp_path, conda_channel.url)  # the index pip is configured with
    spec = EnvSpec(
        python="3.11.*",
        pypi=tuple(
            PypiDep.parse(p)
            for p in (
                "pandas>=2.2",
                "scikit-learn",
                "scipy",
                "matplotlib",
                "seaborn",
                "statsmodels",
            )
        ),
    )
    lock = resolve_specs({"online": spec}, options)[0].lock
    names = {p.name for p in lock.packages if p.manager == "pypi"}
    assert {"pandas", "numpy", "scikit-learn", "scipy", "matplotlib"} <= names
    assert all(
        "manylinux" in p.url or p.url.endswith("-none-any.whl")
        for p in lock.packages
        if p.manager == "pypi"
    )


def test_index_credentials_never_reach_the_lock_or_the_store(
    index, conda_channel, tmp_path, monkeypatch
):
    monkeypatch.setenv("INDEX_TOKEN", "tok-s3cret")
    url = index.url.replace("http://", "http://user:${INDEX_TOKEN}@")
    options = fixture_options(tmp_path, conda_channel.url, url)
    spec = EnvSpec(python="3.11.*", pypi=(PypiDep.parse("six"),))
    lock = resolve_specs({"s": spec}, options)[0].lock
    assert lock.names()["six"].url.startswith("http://127.0.0.1")
    for path in [*(tmp_path / "store").rglob("*"), *(tmp_path / "cache").rglob("*")]:
        if path.is_file():
            assert b"tok-s3cret" not in path.read_bytes(), path


def test_sdist_is_built_for_the_host_and_its_wheel_kept_in_the_store(
    index, conda_channel, tmp_path
):
    from envmgr.build.once import BuildOptions, build_and_store

    store = LocalStore(tmp_path / "store")
    options = fixture_options(tmp_path, conda_channel.url, index.url, store=store)
    spec = EnvSpec(python="3.11.*", pypi=(PypiDep.parse("sdist-only"),))
    lock = resolve_specs({"train": spec}, options)[0].lock
    names = lock.names()
    assert names["sdist-only"].url.endswith("sdist_only-1.0.tar.gz") and "six" in names
    prefix = f"wheels/{names['sdist-only'].sha256}/"
    assert not [k for k in store.list(prefix) if k.endswith(".whl")]  # resolving builds nothing
    built = build_and_store(lock, BuildOptions(store=store, cache_dir=tmp_path / "builder"))
    stored = [k for k in store.list(prefix) if k.endswith(".whl")]
    assert len(stored) == 1 and stored[0].rsplit("/", 1)[1].startswith("sdist_only-1.0-")
    assert stored[0].endswith("-none-any.whl")
    from envmgr.worker.hydrate import hydrate

    env = hydrate(built.env_id, store, tmp_path / "worker", platform="linux-64").prefix
    out = subprocess.run(
        [
            str(env / "bin" / "python"),
            "-c",
            "import sdist_only, six; print(sdist_only.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "1.0"


def test_a_newer_sdist_only_release_beats_an_older_wheel_on_every_target(resolve):
    """uv 0.13 and pip pick mixedpkg 2.0 (sdist only) over 1.0 (a wheel); it is pure Python,
    so it locks for another platform too."""
    for platform in ("linux-64", "osx-arm64"):
        found = resolve(["mixedpkg"], platform=platform)["mixedpkg"]
        assert found.version == "2.0" and found.url.endswith("mixedpkg-2.0.tar.gz")
    assert versions(resolve(["mixedpkg<2"], platform="osx-arm64"))["mixedpkg"] == "1.0"


def test_macos_targets_default_like_uv_and_name_the_release_wheels_need(resolve):
    """scipy's arm64 wheels need macOS 12: the default target is 12.0 (uv's), and a wheel
    that needs a newer release is named with that release and the variables that set it."""
    assert "macosx_12_0_arm64" in resolve(["mac12"], platform="osx-arm64")["mac12"].url
    with pytest.raises(PypiConflictError) as info:
        resolve(["newmac"], platform="osx-arm64")
    text = str(info.value)
    assert "its arm64 wheels need macOS 14.0 or newer and the target is macOS 12.0" in text
    assert "MACOSX_DEPLOYMENT_TARGET=14.0" in text
    for env in ({"MACOSX_DEPLOYMENT_TARGET": "14"}, {"CONDA_OVERRIDE_OSX": "14.2"}):
        assert (
            "macosx_14_0_arm64" in resolve(["newmac"], platform="osx-arm64", env=env)["newmac"].url
        )
    # The conda side assumes the same release.
    from envmgr.platforms import virtual_packages

    osx = {v.name: v.version for v in virtual_packages("osx-arm64", env={})}
    assert osx["__osx"] == "12.0"
    env = {"MACOSX_DEPLOYMENT_TARGET": "13", "CONDA_OVERRIDE_OSX": "15.1"}
    assert {v.name: v.version for v in virtual_packages("osx-arm64", env=env)}["__osx"] == "15.1"


def _static_index(root: Path, wheels: Path) -> Path:
    """A PEP 503 index as plain files (what `pip download` + a script leaves on a share)."""
    import hashlib
    import html

    from packaging.utils import canonicalize_name, parse_wheel_filename

    files = root / "files"
    files.mkdir(parents=True)
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        os.link(wheel, files / wheel.name)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        projects.setdefault(name, []).append(
            f'<a href="../../files/{html.escape(wheel.name)}#sha256={digest}">{wheel.name}</a>'
        )
    for name, links in projects.items():
        page = root / "simple" / name / "index.html"
        page.parent.mkdir(parents=True)
        page.write_text("<html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    return root / "simple"


def test_a_file_index_resolves_and_builds(conda_channel, tmp_path):
    """It failed with a bare InvalidSchema: metadata of a wheel on a file:// index is read
    from the wheel where it lies, and the build installs it from there."""
    from envmgr.build.once import BuildOptions, build_and_store
    from envmgr.cache.local import LocalStore
    from envmgr.worker.hydrate import hydrate

    simple = _static_index(tmp_path / "share", fetch_wheels())
    options = fixture_options(tmp_path, conda_channel.url, simple.as_uri() + "/", force=True)
    spec = EnvSpec(python="3.11.*", pypi=(PypiDep.parse("python-dateutil"),))
    lock = resolve_specs({"s": spec}, options)[0].lock
    found = {p.name: p for p in lock.packages}
    assert found["python-dateutil"].url.startswith("file://")
    assert found["six"].version == "1.17.0"  # its dependency, from the same index
    store = LocalStore(tmp_path / "store")
    build_and_store(lock, BuildOptions(store=store, cache_dir=tmp_path / "b"))
    python = hydrate(lock.env_id, store, tmp_path / "envs").python
    ran = subprocess.run(
        [str(python), "-c", "import dateutil; print(dateutil.__version__)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ran.stdout.strip() == "2.9.0.post0", ran.stderr


def test_a_hash_pin_that_matches_no_file_says_hash_mismatch(index, conda_channel, tmp_path):
    """It said 'no wheel of six fits linux-64 ... (its wheels are for: any)'."""
    options = fixture_options(tmp_path, conda_channel.url, index.url, force=True)
    bad = PypiDep.parse("six==1.17.0", hashes=[f"sha256:{'0' * 64}"])
    with pytest.raises(PypiConflictError) as info:
        resolve_specs({"train": EnvSpec(python="3.11.*", pypi=(bad,))}, options)
    text = str(info.value)
    assert "hash mismatch: no file of six" in text and "000000000000…" in text
    assert "fits" not in text


def test_an_https_index_is_verified_and_its_ca_bundle_loaded_once(
    conda_channel, tmp_path, monkeypatch
):
    """An index behind TLS with a private CA: trusted through REQUESTS_CA_BUNDLE (as pip and
    requests do), refused in one line without it; every connection shares one TLS context
    (requests would load the bundle again for each new connection)."""
    from envmgr.resolve.pypi.index import IndexClient
    from fixtures.tls import make_ca

    ca = make_ca(tmp_path / "ca")
    server = PypiIndexServer(fetch_wheels(), tls=ca.server_context()).start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        spec = EnvSpec(python="3.11.*", pypi=(PypiDep.parse("requests"),))

        def resolve_with(cache: str) -> dict[str, str]:
            options = fixture_options(
                tmp_path / cache, conda_channel.url, server.url, platforms=("linux-64",)
            )
            lock = resolve_specs({"s": spec}, options)[0].lock
            return {p.name: p.version for p in lock.packages if p.manager == "pypi"}

        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        with pytest.raises(EnvmgrError, match="TLS certificate is not trusted") as refused:
            resolve_with("untrusted")
        assert "REQUESTS_CA_BUNDLE" in str(refused.value)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_file))
        assert {"requests", "urllib3", "idna", "certifi"} <= set(resolve_with("trusted"))

        client = IndexClient([server.url], tmp_path / "client")
        for name in ("six", "idna", "certifi", "urllib3", "tabulate"):
            assert client.project_files(name), name
        adapter = client.session.get_adapter(server.url)
        assert list(adapter._contexts) == [str(ca.ca_file)]
        pools = list(adapter.poolmanager.pools._container.values())
        assert pools and all(pool.ca_certs is None for pool in pools)
    finally:
        server.stop()


def test_the_index_client_opens_at_most_its_pool_of_connections(index, tmp_path):
    """Twenty threads asking at once share the client's eight connections per host instead of
    opening one each: every new connection is a handshake, and a slow connect stalls its
    request (here about one in twenty new connections took 5 s)."""
    from concurrent.futures import ThreadPoolExecutor

    from envmgr.resolve.pypi.index import IndexClient

    client = IndexClient([index.url], tmp_path / "client")
    urls = [f"{index.url}{name}/" for name in ("six", "idna", "certifi", "tabulate")] * 5
    with index.behaving(latency=0.05), ThreadPoolExecutor(max_workers=len(urls)) as pool:
        answers = list(pool.map(client._get, urls))
    assert [a.status_code for a in answers] == [200] * len(urls)
    pools = list(client.session.get_adapter(index.url).poolmanager.pools._container.values())
    assert len(pools) == 1 and 1 < pools[0].num_connections <= 8
