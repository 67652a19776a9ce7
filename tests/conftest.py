"""Session fixtures of the offline test world: a conda channel, a PyPI index, an S3 server.

Each is real: the channel holds real conda packages (built once per set of inputs and cached),
the index is an HTTP server over real wheels, and S3 is SeaweedFS on loopback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _helpers import fixture_options

from envmgr.cache.local import LocalStore
from envmgr.cache.s3 import S3Store
from envmgr.resolve.resolution_cache import resolve_specs
from envmgr.specs.deps import CondaDep, PypiDep
from envmgr.specs.model import EnvSpec
from fixtures.conda_channel import copy_channel
from fixtures.pypi_index import PypiIndexServer
from fixtures.s3_server import RunningS3, launch
from fixtures.wheels import fetch_wheels


@dataclass(frozen=True)
class CondaChannel:
    path: Path

    @property
    def url(self) -> str:
        return self.path.as_uri()


#: The modules that take a worker a minute or more, by their paths under ``tests/``: they run
#: first. pytest-xdist hands out whole modules (``--dist loadscope``, so each module fixture is
#: made once) in collection order, and one of these collected last left the other worker idle
#: for up to a minute at the end.
_LONGEST_FIRST = (
    "e2e/test_cross.py",
    "build/test_layers.py",
    "e2e/test_metaflow.py",
    "cli/test_cli.py",
    "build/test_build.py",
    "e2e/test_faults.py",
    "worker/test_hydrate.py",
    "worker/test_layer_process.py",
    "test_readme.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    here = Path(__file__).parent

    def module_rank(item: pytest.Item) -> int:
        try:
            return rank.get(item.path.relative_to(here).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=module_rank)  # stable: the rest keep their order


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the code under test once, as an installed package has it compiled.

    An editable install leaves ``.py`` files only, and this machine sets
    ``PYTHONDONTWRITEBYTECODE=1``: every child interpreter the tests start (the CLI, the
    bootstrap, each Metaflow task) would compile envmgr again, ~0.1 s of CPU each.
    """
    import compileall

    root = Path(__file__).resolve().parent.parent
    for name in ("envmgr", "cli", "cache", "metaflow_extensions", "fixtures", "tests"):
        compileall.compile_dir(root / name, quiet=2, workers=0)


@pytest.fixture(scope="session", autouse=True)
def _no_user_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests never read the user's ~/.config/envmgr/config.toml (children inherit this).
    Off a terminal, phases print a line once they take a second: on a loaded machine any
    phase may, so here only the tests of those lines (tests/cli/test_progress.py) ask for them."""
    import os

    keys = ("XDG_CONFIG_HOME", "ENVMGR_CONFIG", "ENVMGR_PROGRESS_AFTER")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    os.environ.pop("ENVMGR_CONFIG", None)
    os.environ["ENVMGR_PROGRESS_AFTER"] = "3600"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def conda_channel(tmp_path_factory: pytest.TempPathFactory) -> CondaChannel:
    """A private copy of the fixture channel (package files hardlinked from the cache)."""
    return CondaChannel(copy_channel(tmp_path_factory.mktemp("conda") / "channel"))


@pytest.fixture(scope="session")
def pypi_index() -> Iterator[PypiIndexServer]:
    """The fixture wheelhouse behind a PEP 691/503 index; use ``.behaving(...)`` to degrade it."""
    server = PypiIndexServer(fetch_wheels()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sdist_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PypiIndexServer]:
    """The fixture wheels plus sdists with each trait of ``fixtures/sdists.py`` (slow and
    broken native builds, dynamic metadata, sdist-only releases, ...), behind an index."""
    import os

    from fixtures.sdists import write_sdist_world

    house = tmp_path_factory.mktemp("sdist-world")
    for wheel in fetch_wheels().glob("*.whl"):
        os.link(wheel, house / wheel.name)
    write_sdist_world(house)
    server = PypiIndexServer(house).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningS3]:
    """SeaweedFS on loopback for the whole session; stopped (and checked) at the end."""
    with launch(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: RunningS3) -> Iterator[str]:
    """A fresh, empty bucket for one test, emptied and removed afterwards."""
    client: Any = s3_server.client()
    name = f"t-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])
        client.delete_bucket(Bucket=name)


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    """An empty store of each kind: a local directory, and a two-level prefix of a fresh
    SeaweedFS bucket (so keys never sit at a bucket's root by accident)."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(f"s3://{bucket}/team/prefix", client=server.client())


@pytest.fixture
def world(conda_channel, pypi_index, tmp_path, monkeypatch) -> dict[str, str]:
    """A user's shell pointed at the fixture channel and index, with a fresh cache and store
    (set in this process too, for the in-process runs)."""
    values = {
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
        "ENVMGR_STORE": (tmp_path / "store").as_uri(),
        "ENVMGR_CHANNELS": conda_channel.url,
        "PIP_INDEX_URL": pypi_index.url,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "store").mkdir()  # the team's store exists (a new one is announced)
    monkeypatch.chdir(tmp_path)
    return dict(os.environ)


@pytest.fixture(scope="session")
def mixed_lock(conda_channel, pypi_index, tmp_path_factory):
    """The linux-64 lock of a mixed env: conda python, numpy, tabulate, prefix-demo (text and
    binary placeholders); PyPI colorama and python-dateutil."""
    home = tmp_path_factory.mktemp("mixed-lock")
    options = fixture_options(home, conda_channel.url, pypi_index.url)
    spec = EnvSpec(
        python="3.11.*",
        conda=tuple(CondaDep.parse(c) for c in ("numpy", "tabulate", "prefix-demo")),
        pypi=(PypiDep.parse("colorama"), PypiDep.parse("python-dateutil")),
    )
    return resolve_specs({"train": spec}, options)[0].lock
