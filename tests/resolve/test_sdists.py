"""Source distributions in resolution and builds, on an index whose sdists have the traits of
real requirement files (``fixtures/sdists.py``): metadata is read without building (PEP 658,
static PKG-INFO, the PEP 517 hook), sdist-only releases take part in backtracking, pure sdists
lock for every target, only ``build`` compiles, and each failure is one line that explains."""

from __future__ import annotations

import http.server
import logging
import os
import subprocess
import threading
from pathlib import Path

import pytest
from _helpers import envmgr_here, fixture_options, run_envmgr

from envmgr.build.once import BuildOptions, build_and_store, create_prefix
from envmgr.cache.local import LocalStore
from envmgr.errors import EnvmgrError
from envmgr.resolve.pypi.resolve import PypiConflictError
from envmgr.resolve.resolution_cache import resolve_specs
from envmgr.specs.deps import PypiDep
from envmgr.specs.model import EnvSpec
from envmgr.specs.requirements import read_requirements
from fixtures.wheelmaker import make_wheel


@pytest.fixture(scope="module")
def index(sdist_index):
    return sdist_index


@pytest.fixture
def compiled(tmp_path, monkeypatch):
    """The file the fixture C extensions' build_ext writes their names into."""
    log = tmp_path / "compiled.txt"
    monkeypatch.setenv("ENVMGR_FIXTURE_COMPILE_LOG", str(log))
    return log


@pytest.fixture
def world(index, conda_channel, tmp_path):
    """resolve(lines, platform=...) -> lock, on this module's index, with one store."""
    store = LocalStore(tmp_path / "store")

    def resolve(lines, platform="linux-64", cache="cache", **overrides):
        fields = {
            "index_url": index.url,
            "store": store,
            "cache_dir": tmp_path / cache,
            "platforms": (platform,),
            "force": True,
            **overrides,
        }
        options = fixture_options(tmp_path, conda_channel.url, **fields)
        spec = EnvSpec(python="3.11.*", pypi=tuple(PypiDep.parse(p) for p in lines))
        return resolve_specs({"train": spec}, options)[0].lock

    resolve.store = store  # type: ignore[attr-defined]
    return resolve


def pypi_versions(lock):
    return {p.name: p.version for p in lock.packages if p.manager == "pypi"}


def _sources(caplog) -> dict[str, str]:
    out = {}
    for record in caplog.records:
        message = record.getMessage()
        if record.name == "envmgr.sdist" and ": metadata from " in message:
            filename, source = message.split(": metadata from ")
            out[filename] = source
    return out


def test_metadata_comes_from_the_cheapest_source_and_nothing_is_built(
    world, compiled, caplog, tmp_path
):
    caplog.set_level(logging.INFO, logger="envmgr")
    lock = world(["static-meta", "dyn-meta", "slow-native", "meta-file"])
    found = pypi_versions(lock)
    assert found == {
        "static-meta": "1.0",
        "dyn-meta": "1.0",
        "slow-native": "1.0",
        "meta-file": "1.0",
        "six": "1.17.0",
    }
    assert _sources(caplog) == {
        "static_meta-1.0.tar.gz": "pkg-info",
        "dyn_meta-1.0.tar.gz": "pep517",
        "slow_native-1.0.tar.gz": "pep517",
        "meta_file-1.0.tar.gz": "pep658",
    }
    assert not compiled.exists(), "resolution compiled a C extension"
    names = {p.name: p for p in lock.packages}
    for name in ("static-meta", "dyn-meta", "slow-native", "meta-file"):
        keys = list(world.store.list(f"wheels/{names[name].sha256}/"))
        assert any(k.endswith("/METADATA") for k in keys), name
        assert not any(k.endswith(".whl") for k in keys), f"{name} was built: {keys}"
    # Sdist work stays under the cache: its temp space is empty again.
    assert list((tmp_path / "cache" / "pypi" / "sdist" / "tmp").iterdir()) == []
    # Another machine (a fresh cache) with the same store reads it all from the store.
    caplog.clear()
    world(["static-meta", "dyn-meta", "slow-native", "meta-file"], cache="cache2")
    assert set(_sources(caplog).values()) == {"store"}


def test_an_sdist_takes_the_metadata_of_a_wheel_of_its_version(world, caplog):
    """gensim 3.8.3's setup.py fails without numpy; uv reads a wheel of 3.8.3 for another
    platform instead, preferring a Python 3 one (its Python 2 wheel needs other versions)."""
    caplog.set_level(logging.INFO, logger="envmgr")
    found = pypi_versions(world(["wheel-twin==3.8.3"]))
    assert found == {"wheel-twin": "3.8.3", "six": "1.17.0"}
    assert _sources(caplog) == {"wheel_twin-3.8.3.tar.gz": "wheel"}


def test_an_sdist_name_with_an_extra_dash_is_read_as_pip_and_uv_read_it(world, compiled):
    """thop-0.0.22-421392844089.tar.gz is thop 0.0.22.post421392844089 (not project
    thop-0-0-22 at version 421392844089, which would satisfy thop>=0.1.1 and need git)."""
    assert pypi_versions(world(["thop>=0.1.1"]))["thop"] == "0.1.1.post2209072238"
    assert not compiled.exists(), "the odd sdist's setup.py ran"
    from envmgr.resolve.pypi.pages import sdist_version

    assert sdist_version("thop-0.0.22-421392844089.tar.gz", "thop") == "0.0.22.post421392844089"
    assert sdist_version("Foo_Bar-1.0.zip", "foo-bar") == "1.0"
    assert sdist_version("foo-bar-baz-2.0rc1.tar.gz", "foo-bar-baz") == "2.0rc1"
    assert sdist_version("foo-bar-baz-2.0.tar.gz", "foo") is None  # "bar-baz-2.0" is no version
    assert sdist_version("foobar-1.0.tar.gz", "foo") is None
    assert sdist_version("foo-1.0.tar.bz2", "foo") is None


def test_static_pyproject_metadata_is_read_without_the_backend(world, caplog):
    """dbt-core-experimental-parser 2.0.8: PKG-INFO 2.1 says nothing, the backend needs the
    internet, the [project] table says it all (uv reads it; so does envmgr)."""
    caplog.set_level(logging.INFO, logger="envmgr")
    found = pypi_versions(world(["static-table[fast]"]))
    assert found == {"static-table": "2.0.8", "six": "1.17.0", "tf-like": "4.38.0"}
    assert _sources(caplog) == {"static_table-2.0.8.tar.gz": "pyproject"}


def test_resolve_names_the_sdists_build_will_compile(index, conda_channel, tmp_path):
    """blis 0.4.1: resolve took 3 s, build then compiled for minutes and failed; now resolve
    says which sdists build makes wheels of, and the newest version with a wheel."""
    import json

    env = {
        **os.environ,
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
        "ENVMGR_STORE": (tmp_path / "store").as_uri(),
    }
    args = ["resolve", "--pypi", "slow-native", "--pypi", "pure-sdist", "--pypi", "six"]
    args += ["--python", "3.11", "--channel", conda_channel.url, "--index-url", index.url]
    result = envmgr_here(*args, env=env)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "is an sdist" in line]
    assert notes == [
        "envmgr: note: linux-64: pure-sdist 1.0.9 is an sdist (pure_sdist-1.0.9.tar.gz): "
        "build builds its wheel",
        "envmgr: note: linux-64: slow-native 1.0 is an sdist (slow_native-1.0.tar.gz): "
        "build compiles its code; newest version with a wheel for linux-64: 0.9",
    ]
    data = json.loads(envmgr_here(*args, "--force", "--json", env=env).stdout)
    builds = data["envs"][0]["source_builds"]
    assert [(b["name"], b["compiles"]) for b in builds] == [
        ("pure-sdist", False),
        ("slow-native", True),
    ]
    # For another target only a pure sdist may be locked, and resolve built its wheel then.
    other = ["resolve", "--pypi", "pure-sdist", "--python", "3.11", "-p", "osx-arm64"]
    result = envmgr_here(*other, *args[-4:], env=env)
    assert result.returncode == 0, result.stderr
    assert "is an sdist" not in result.stderr


def test_a_failed_metadata_preparation_is_remembered_until_force(world, compiled):
    with pytest.raises(EnvmgrError) as first:
        world(["broken-meta"], force=False)
    assert "preparing broken_meta-1.0.tar.gz failed" in str(first.value)
    assert "not a git repository" in str(first.value)
    assert compiled.read_text().split("\n").count("broken-meta metadata") == 1
    with pytest.raises(EnvmgrError) as again:
        world(["broken-meta"], force=False)
    assert "not a git repository" in str(again.value)
    assert "remembered from" in str(again.value) and "--force" in str(again.value)
    assert compiled.read_text().split("\n").count("broken-meta metadata") == 1
    with pytest.raises(EnvmgrError) as forced:
        world(["broken-meta"], force=True)
    assert "remembered" not in str(forced.value)
    assert compiled.read_text().split("\n").count("broken-meta metadata") == 2


def test_only_build_compiles_and_only_once(world, compiled, tmp_path):
    lock = world(["slow-native"])
    assert not compiled.exists()
    store = world.store
    build_and_store(lock, BuildOptions(store=store, cache_dir=tmp_path / "b1"))
    assert compiled.read_text().split() == ["slow-native"]
    # A second env with the same sdist, built by another builder: the stored wheel is used.
    other = world(["slow-native", "tabulate==0.9.0"])
    assert other.env_id != lock.env_id
    made = create_prefix(other, tmp_path / "prefix", tmp_path / "b2", store)
    assert compiled.read_text().split() == ["slow-native"]
    assert made.bytecode_files > 0
    out = subprocess.run(
        [str(tmp_path / "prefix" / "bin" / "python"), "-c", "import slow_native._speed"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_an_old_sdist_only_release_is_found_when_it_is_the_only_solution(world):
    """sentence-transformers 2.2.2 has no wheel, and is what uv picks beside transformers
    4.30.1: every newer release needs a newer transformers."""
    found = pypi_versions(world(["st-like", "tf-like==4.30.1"]))
    assert found == {"st-like": "2.2.2", "tf-like": "4.30.1"}
    assert pypi_versions(world(["st-like"]))["st-like"] == "3.0.0"


def test_walking_down_a_projects_versions_fetches_their_metadata_ahead(world, index):
    """After a conflict resolvelib tries the next version of a project without asking for its
    matches again; the versions below come in parallel, not one round trip each."""
    with index.behaving(latency=0.3):
        found = pypi_versions(world(["st-like", "tf-like==4.30.1"]))
        log = list(index.requests)
    assert found == {"st-like": "2.2.2", "tf-like": "4.30.1"}
    reads = {}
    for version in ("2.4.0", "2.3.0"):
        reads[version] = [r for r in log if f"st_like-{version}-" in r.path and r.method == "GET"]
        assert reads[version], f"st-like {version}'s metadata was never read"
    first = min(r.started for r in reads["2.3.0"])
    assert first < max(r.answered for r in reads["2.4.0"]), (
        "st-like 2.3.0's metadata was asked for only after 2.4.0's came back"
    )


def test_requires_python_known_only_from_an_sdist_is_honoured(world):
    assert pypi_versions(world(["py-limited"]))["py-limited"] == "1.0"
    with pytest.raises(PypiConflictError) as info:
        world(["py-limited>=2"])
    text = str(info.value)
    assert "py-limited 2.0 needs Python >=3.12" in text and "CPython 3.11" in text


@pytest.mark.parametrize("platform", ["osx-arm64", "linux-aarch64"])
def test_a_pure_sdist_locks_for_other_targets(world, compiled, platform):
    lock = world(["pure-sdist", "static-meta"], platform=platform)
    names = {p.name: p for p in lock.packages if p.manager == "pypi"}
    assert names["pure-sdist"].version == "1.0.9"
    assert names["pure-sdist"].url.endswith("pure_sdist-1.0.9.tar.gz")
    keys = list(world.store.list(f"wheels/{names['pure-sdist'].sha256}/"))
    assert any(k.endswith("-py3-none-any.whl") for k in keys), keys
    assert not compiled.exists()


def test_a_pure_sdist_in_a_linux_aarch64_env(world, tmp_path, conda_channel):
    lock = world(["pure-sdist"], platform="linux-aarch64")
    create_prefix(lock, tmp_path / "prefix", tmp_path / "b", world.store)
    site = tmp_path / "prefix" / "lib" / "python3.11" / "site-packages"
    assert (site / "pure_sdist" / "__init__.py").is_file()
    assert list((site / "pure_sdist" / "__pycache__").glob("__init__.cpython-311.pyc"))


def test_a_native_sdist_for_another_target_is_one_line(world, compiled):
    with pytest.raises(EnvmgrError) as info:
        world(["slow-native>=1"], platform="osx-arm64")
    text = str(info.value)
    assert "\n" not in text
    assert "slow-native 1.0 has only a source distribution with compiled code" in text
    assert "must be compiled for osx-arm64" in text
    assert "newest version with a wheel for it: 0.9" in text
    assert not compiled.exists()  # decided from the sdist's files, without a build


def test_a_pin_with_no_file_for_the_target_is_reported_before_any_metadata_work(world, tmp_path):
    with pytest.raises(PypiConflictError) as info:
        world(["dyn-meta", "slow-native", "tf-old==2.0.0"])
    text = str(info.value)
    assert text.startswith("step 'train': linux-64: cannot resolve PyPI packages: tf-old==2.0.0")
    assert "tf-old 2.0.0 has no file for linux-64 with CPython 3.11" in text
    assert "(its wheels are for: cp37-manylinux2010_x86_64)" in text
    assert "versions for this target: 2.15.0" in text
    assert not (tmp_path / "cache" / "pypi" / "sdist" / "src").exists()


def test_a_long_conflict_is_summarised(world):
    with pytest.raises(PypiConflictError) as info:
        world(["cs-top", "cs-dep==1.0"])
    text = str(info.value)
    needs = "every cs-top 1.0 to 1.3 that fits (4 versions) needs cs-dep>=2.0 (or >=2.1, >=2.2)"
    assert needs in text
    assert "the step asks for cs-dep==1.0" in text
    assert len(text) < 400


def test_a_typo_gets_did_you_mean(world):
    with pytest.raises(PypiConflictError) as info:
        world(["tabulat"])
    assert "no project named 'tabulat'" in str(info.value)
    assert "did you mean 'tabulate'?" in str(info.value)


def test_a_failed_build_names_the_cause_and_keeps_the_log(world, tmp_path):
    lock = world(["broken-native"])
    with pytest.raises(EnvmgrError) as info:
        build_and_store(lock, BuildOptions(store=world.store, cache_dir=tmp_path / "b"))
    text = str(info.value)
    assert "building a wheel from broken_native-1.0.tar.gz failed" in text
    assert "envmgr_missing_header.h" in text and "No such file or directory" in text
    log = Path(text.split("whole log: ")[1].split(")")[0])
    assert log.is_file() and log.is_relative_to(tmp_path / "b")
    assert "envmgr_missing_header.h" in log.read_text()


def test_verbose_shows_the_resolvers_reasoning_not_a_traceback(index, conda_channel, tmp_path):
    env = {
        **os.environ,
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
        "ENVMGR_STORE": (tmp_path / "store").as_uri(),
    }
    args = ["resolve", "--pypi", "cs-top", "--pypi", "cs-dep==1.0", "--python", "3.11"]
    args += ["--channel", conda_channel.url, "--index-url", index.url]
    result = envmgr_here("-v", *args, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "reject cs-top 1.3" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("envmgr: error:")


# -- local sources ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """A directory of wheels that no index serves."""
    house = tmp_path_factory.mktemp("find-links")
    make_wheel(house, "fl-only", "1.0", requires=["six"])
    make_wheel(house, "fl-only", "1.1")
    return house


def test_find_links_from_the_options(world, wheelhouse):
    lock = world(["fl-only==1.0"], find_links=(wheelhouse.as_uri(),))
    package = {p.name: p for p in lock.packages}["fl-only"]
    assert package.url == (wheelhouse / "fl_only-1.0-py3-none-any.whl").as_uri()
    assert "six" in pypi_versions(lock)


def test_find_links_and_local_wheels_in_a_requirements_file(world, wheelhouse, tmp_path):
    req = tmp_path / "requirements.txt"
    (tmp_path / "wheels").symlink_to(wheelhouse)
    req.write_text(f"-f ./wheels\nfl-only\n{wheelhouse}/fl_only-1.0-py3-none-any.whl\n")
    spec = read_requirements(req)
    assert spec.find_links == ((tmp_path / "wheels").resolve().as_uri(),)
    direct = {d.name: d for d in spec.pypi}["fl-only"]
    assert direct.url == (wheelhouse / "fl_only-1.0-py3-none-any.whl").as_uri()


def test_a_file_url_requirement_is_locked_and_built(world, wheelhouse, tmp_path):
    url = (wheelhouse / "fl_only-1.1-py3-none-any.whl").as_uri()
    lock = world([f"fl-only @ {url}"])
    assert {p.name: p.url for p in lock.packages}["fl-only"] == url
    create_prefix(lock, tmp_path / "prefix", tmp_path / "b", world.store)
    site = tmp_path / "prefix" / "lib" / "python3.11" / "site-packages"
    assert (site / "fl_only" / "__init__.py").read_text() == "__version__ = '1.1'\n"


@pytest.fixture
def served_wheelhouse(wheelhouse):
    """*wheelhouse* as a plain HTTP directory listing (what a find-links page is)."""

    def handler(*args, **kwargs):
        return http.server.SimpleHTTPRequestHandler(*args, directory=str(wheelhouse), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_find_links_from_pip_configuration(
    world, index, served_wheelhouse, wheelhouse, monkeypatch
):
    """pip's find-links are used when they are URLs; a directory in pip's configuration is
    machine-local and left out (``config show`` says so)."""
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    monkeypatch.setenv("PIP_FIND_LINKS", served_wheelhouse)
    lock = world(["fl-only"], index_url=None)
    url = {p.name: p.url for p in lock.packages}["fl-only"]
    assert url == f"{served_wheelhouse}fl_only-1.1-py3-none-any.whl"
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    with pytest.raises(PypiConflictError):
        world(["fl-only"], index_url=None)
    shown = envmgr_here("config", "show")
    assert f"pip's find-links {wheelhouse.as_uri()} is machine-local" in shown.stdout


def test_find_links_on_the_command_line(index, conda_channel, wheelhouse, tmp_path):
    env = {
        **os.environ,
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
        "ENVMGR_STORE": (tmp_path / "store").as_uri(),
    }
    lock = tmp_path / "lock.yml"
    args = ["resolve", "--pypi", "fl-only==1.0", "--python", "3.11", "-o", str(lock)]
    args += ["--channel", conda_channel.url, "--index-url", index.url]
    result = run_envmgr(*args, "--find-links", str(wheelhouse), env=env)
    assert result.returncode == 0, result.stderr
    assert (wheelhouse / "fl_only-1.0-py3-none-any.whl").as_uri() in lock.read_text()
    missing = run_envmgr(*args, "--find-links", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "not a directory" in missing.stderr
