"""Package layers (format 3): the same env as one install, shared bytes, built and fetched once."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from _helpers import envmgr_here, fixture_options, outlives_its_parent
from _shapes import shaped

import envmgr.build.layers
import envmgr.worker.assembly
from envmgr.archive.manifest import ArchiveError
from envmgr.build.once import BuildOptions, build_and_store
from envmgr.build.placeholder import PLACEHOLDER
from envmgr.cache.layout import archive_key, layer_archive_key, layer_manifest_key, manifest_key
from envmgr.cache.local import LocalStore
from envmgr.resolve.resolution_cache import resolve_specs
from envmgr.specs.model import CondaDep, EnvSpec, PypiDep
from envmgr.worker.env_cache import COMPLETE, LAYERS, gc, list_envs
from envmgr.worker.hydrate import HydrateError, hydrate
from envmgr.worker.layers import LAYER_MANIFEST
from fixtures.tcp_proxy import FaultProxy, Faults

PY = "3.11.*"


@pytest.fixture(scope="module")
def locks(conda_channel, pypi_index, tmp_path_factory):
    """Locks that share packages: ``small`` (python, tabulate, pip; PyPI six), ``more`` (the
    same and PyPI colorama), ``clobber`` (the fixture pair that writes one path twice),
    ``alone_b`` (one of the pair)."""
    options = fixture_options(tmp_path_factory.mktemp("locks"), conda_channel.url, pypi_index.url)

    def lock(conda: tuple[str, ...], pypi: tuple[str, ...] = ()):
        spec = EnvSpec(
            python=PY,
            conda=tuple(CondaDep.parse(c) for c in conda),
            pypi=tuple(PypiDep.parse(p) for p in pypi),
        )
        return resolve_specs({"step": spec}, options)[0].lock

    return {
        "small": lock(("tabulate",), ("six",)),
        "more": lock(("tabulate",), ("six", "colorama")),
        "clobber": lock(("fixture-clobber-a", "fixture-clobber-b")),
        "alone_b": lock(("fixture-clobber-b",)),
    }


@pytest.fixture(scope="module")
def layered_store(tmp_path_factory):
    """``layered_store(lock, tmp_path)``: a local store under *tmp_path* holding *lock*'s env
    as layers. Built once per lock in this module, then copied (a copy, not links: tests
    damage their store's files), for the tests whose subject is the hydrate, not the build."""
    built: dict[str, Path] = {}

    def make(lock, tmp_path) -> LocalStore:
        if lock.env_id not in built:
            home = tmp_path_factory.mktemp("layered")
            build_and_store(lock, BuildOptions(store=LocalStore(home / "store"), cache_dir=home))
            built[lock.env_id] = home / "store"
        shutil.copytree(built[lock.env_id], tmp_path / "store")
        return LocalStore(tmp_path / "store")

    return make


def _tree(root: Path, prefixes: tuple[str, ...]) -> dict[str, str]:
    """Every file and link below *root* as it would compare across prefixes: *root* and each
    of *prefixes* (same-length build prefixes in bytecode) replaced by a token; conda-meta's
    hashes of prefix-holding files (they hash a build-time state) left out."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if rel.startswith(".envmgr-"):
                continue
            if path.is_symlink():
                found[rel] = f"-> {path.readlink()}"
                continue
            data = path.read_bytes().replace(str(root).encode(), b"<root>")
            for prefix in prefixes:
                data = data.replace(prefix.encode(), b"<build>")
            if rel.startswith("conda-meta/") and rel.endswith(".json"):
                record = json.loads(data)
                for entry in record.get("paths_data", {}).get("paths", []):
                    entry.pop("sha256_in_prefix", None)
                    if entry.get("path_type") == "unix_python_entry_point":
                        entry.pop("sha256", None)
                data = json.dumps(record, sort_keys=True).encode()
            mode = stat.S_IMODE(path.stat().st_mode) & 0o111
            found[rel] = f"{hashlib.sha256(data).hexdigest()[:16]} {mode:o}"
    return found


def _same_env(one: dict[str, str], layered: dict[str, str], prefix: Path) -> None:
    """The two trees hold the same paths with the same bytes, but for the bytecode of
    sources that hold the prefix: stale in both (it hashes the source as it was packed),
    so Python compiles those sources again at import either way."""
    assert one.keys() == layered.keys()
    for rel in (k for k in one if one[k] != layered[k]):
        assert rel.endswith(".pyc"), rel
        parent, _, name = rel.rpartition("/__pycache__/")
        source = prefix / parent / f"{name.split('.')[0]}.py"
        assert str(prefix) in source.read_text(), rel


def _both(lock, home: Path):
    """*lock* built as one archive and as layers, each hydrated: (one, layered, manifest)."""
    one = LocalStore(home / "one")
    layered = LocalStore(home / "layered")
    flat = build_and_store(lock, BuildOptions(store=one, cache_dir=home / "c", layers=False))
    built = build_and_store(lock, BuildOptions(store=layered, cache_dir=home / "c"))
    assert flat.manifest.format == 2 and built.manifest.format == 3
    a = hydrate(lock.env_id, one, home / "h1", platform="linux-64")
    b = hydrate(lock.env_id, layered, home / "h2", platform="linux-64")
    prefixes = (flat.manifest.build_prefix, PLACEHOLDER)
    return _tree(a.prefix, prefixes), _tree(b.prefix, prefixes), built.manifest, b


def test_a_layered_env_is_the_env_one_install_makes(mixed_lock, tmp_path):
    """Every file, link and mode of the mixed env (conda and PyPI, text and binary prefixes)
    is the same from layers as from one archive; it runs at its new path."""
    one, layered, manifest, hydrated = _both(mixed_lock, tmp_path)
    _same_env(one, layered, hydrated.prefix)
    assert [ref.package.split()[1] for ref in manifest.layers] == [
        "numpy", "pip", "prefix-demo", "python", "tabulate", "colorama", "python-dateutil", "six"
    ]  # fmt: skip
    assert manifest.files <= 3 and manifest.removes == ()  # history and CACHEDIR.TAG
    assert hydrated.layers_fetched == 8 and hydrated.linked > 4000
    assert 0 < hydrated.copied < 50  # the files that hold the prefix, relocated
    # Each was placed in the env while its layer was unpacked: a copy, never a link through
    # which the relocation would have written this env's prefix into the host's layer.
    cache = hydrated.prefix.parent.parent
    demo = hydrated.prefix / "share" / "prefix-demo" / "prefix.bin"  # a binary prefix
    assert demo.stat().st_nlink == 1 and str(hydrated.prefix).encode() in demo.read_bytes()
    for layer_file in (cache / "layers").rglob("*"):
        if layer_file.is_file() and layer_file.stat().st_size < 1 << 20:
            assert str(hydrated.prefix).encode() not in layer_file.read_bytes(), layer_file
    said = subprocess.run(
        [hydrated.prefix / "bin" / "prefix-demo"], capture_output=True, text=True, check=True
    ).stdout
    assert str(hydrated.prefix) in said and PLACEHOLDER not in said
    code = "import numpy, tabulate, colorama, dateutil, sys; print(sys.prefix)"
    ran = subprocess.run([hydrated.python, "-c", code], capture_output=True, text=True)
    assert ran.stdout.strip() == str(hydrated.prefix), ran.stderr


def _helpers_started(monkeypatch) -> list:
    """Every link helper a hydrate starts from now on."""
    started: list = []
    real = envmgr.worker.assembly.LinkHelper.start

    def start():
        helper = real()
        started.append(helper)
        return helper

    monkeypatch.setattr(envmgr.worker.assembly.LinkHelper, "start", staticmethod(start))
    return started


def test_the_link_helper_makes_the_env_the_links_made_here_make(
    mixed_lock, tmp_path, monkeypatch, layered_store
):
    """The links of an env's layers are made by a helper process once there are many (here:
    from the first file on), else in this process: the same env either way, each file a
    link to its layer's copy, whether the hydrate fetched the layers or the host held them;
    a helper that dies at once, or that says it failed, leaves its links to this process."""
    store = layered_store(mixed_lock, tmp_path)
    started = _helpers_started(monkeypatch)
    trees, counts = {}, {}
    dying = "import sys; sys.exit(3)"
    failing = "import sys; sys.stdin.buffer.read(); sys.stdout.write('0 0 18')"  # EXDEV
    for name, files, child in (  # names of one length: the binary prefix pads to it
        ("here", 10**9, None),
        ("help", 0, None),
        ("dies", 0, dying),
        ("fail", 0, failing),
    ):
        monkeypatch.setattr(envmgr.worker.assembly, "HELPER_FILES", files)
        if child is not None:
            monkeypatch.setattr(envmgr.worker.assembly, "_HELPER", child)
        result = hydrate(mixed_lock.env_id, store, tmp_path / name, platform="linux-64")
        trees[name] = _tree(result.prefix, (PLACEHOLDER,))
        counts[name] = (result.layers_fetched, result.linked, result.copied)
        numpy_init = next(result.prefix.rglob("numpy/__init__.py"))
        assert numpy_init.stat().st_nlink == 2, name  # the env's and its layer's
        # The host keeps the layers: the same env again is made from them alone.
        shutil.rmtree(result.prefix)
        again = hydrate(mixed_lock.env_id, store, tmp_path / name, platform="linux-64")
        assert _tree(again.prefix, (PLACEHOLDER,)) == trees[name], name
        assert (again.layers_fetched, again.linked, again.copied) == (0, *counts[name][1:])
        assert numpy_init.stat().st_nlink == 2, name
    assert trees["help"] == trees["here"] == trees["dies"] == trees["fail"]
    assert counts["help"] == counts["here"] == counts["dies"] == counts["fail"]
    assert counts["here"][1] > 4000
    assert len(started) == 6 and all(h.proc.returncode is not None for h in started)
    assert [h.proc.returncode for h in started] == [0, 0, 3, 3, 0, 0]
    # Embedded in a program that is no python, whose sys.executable is that program.
    monkeypatch.setattr(sys, "executable", "/opt/app/bin/uwsgi")
    assert envmgr.worker.assembly.LinkHelper.start() is None
    result = hydrate(mixed_lock.env_id, store, tmp_path / "uwsg", platform="linux-64")
    assert (result.layers_fetched, result.linked, result.copied) == counts["here"]
    assert len(started) > 7 and all(helper is None for helper in started[6:])


def test_the_link_helper_ends_when_its_hydrate_is_killed(tmp_path):
    """kill -9 of a hydrate leaves no link helper behind: its input ends, and it stops."""
    code = (
        "import sys, time; from envmgr.worker.assembly import LinkHelper\n"
        "helper = LinkHelper.start(); print(helper.proc.pid, flush=True); time.sleep(60)"
    )
    assert not outlives_its_parent(code), "the link helper outlived its hydrate"


def test_links_across_file_systems_become_copies_with_the_helper(
    locks, tmp_path, monkeypatch, layered_store
):
    """An env directory on another file system than the layers (a cache whose envs/ is a
    link to a tmpfs): the helper's first link fails with EXDEV, and every file is copied
    here instead."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's temp dir")
    import tempfile

    lock = locks["small"]
    store = layered_store(lock, tmp_path)
    started = _helpers_started(monkeypatch)
    monkeypatch.setattr(envmgr.worker.assembly, "HELPER_FILES", 0)
    elsewhere = Path(tempfile.mkdtemp(prefix="envmgr-test-envs-", dir="/dev/shm"))
    try:
        cache = tmp_path / "host"
        cache.mkdir()
        (cache / "envs").symlink_to(elsewhere)
        result = hydrate(lock.env_id, store, cache, platform="linux-64")
        assert result.linked == 0 and result.copied > 100
        assert started and started[0].proc.returncode == 0
        code = "import tabulate, six; print('ok')"
        ran = subprocess.run([result.python, "-c", code], capture_output=True, text=True)
        assert ran.stdout == "ok\n", ran.stderr
    finally:
        shutil.rmtree(elsewhere)


def test_two_packages_writing_one_path_assemble_as_one_install(locks, tmp_path):
    """The clobbering pair: the shared path holds what one install gives (the first
    package's), and each package's layer is the layer it has alone."""
    one, layered, manifest, hydrated = _both(locks["clobber"], tmp_path / "pair")
    _same_env(one, layered, hydrated.prefix)
    assert one["share/fixture-clobber/shared.txt"] == layered["share/fixture-clobber/shared.txt"]
    store = LocalStore(tmp_path / "pair" / "layered")
    alone = build_and_store(locks["alone_b"], BuildOptions(store=store, cache_dir=tmp_path / "c"))
    [b] = [ref for ref in manifest.layers if "clobber-b" in ref.package]
    assert b in alone.manifest.layers  # the same layer: found, not built again
    layer = json.loads(store.get(layer_manifest_key(b.layer_id)) or b"")
    assert "share/fixture-clobber/shared.txt" in layer["paths"]
    alone_b = hydrate(locks["alone_b"].env_id, store, tmp_path / "h3", platform="linux-64")
    shared = (alone_b.prefix / "share" / "fixture-clobber" / "shared.txt").read_text()
    assert shared == "written by fixture-clobber-b\n"


def test_a_layer_is_the_same_bytes_whatever_env_and_host_built_it(
    mixed_lock, locks, tmp_path, monkeypatch
):
    """Two envs that share packages, built on "two hosts" (build roots, caches and stores
    apart): every layer they share has the same id and the same bytes."""
    digests = []
    for lock, host in ((mixed_lock, "a"), (locks["more"], "bb")):
        monkeypatch.setenv("ENVMGR_BUILD_ROOT", str(tmp_path / f"root-{host}"))
        store = LocalStore(tmp_path / host / "store")
        options = BuildOptions(store=store, cache_dir=tmp_path / host / "cache")
        manifest = build_and_store(lock, options).manifest
        # Nothing stays in the build root, no prefix and no lock of an env or a layer.
        assert sorted(p.name for p in (tmp_path / f"root-{host}").iterdir()) == []
        digests.append(
            {
                ref.layer_id: hashlib.sha256(store.get(layer_archive_key(ref.layer_id)) or b"")
                for ref in manifest.layers
            }
        )
    common = digests[0].keys() & digests[1].keys()
    assert len(common) == 5  # python, pip, tabulate, six, colorama
    assert all(digests[0][k].hexdigest() == digests[1][k].hexdigest() for k in common)


def test_adding_a_package_builds_one_layer_and_the_host_links_the_rest(
    any_store, locks, tmp_path, monkeypatch
):
    """After ``small``, ``more`` installs, packs and uploads only colorama's layer (and its
    env layer and manifest); a host that has ``small`` fetches one layer and links the
    rest, read-only; ``gc`` keeps a layer while an env links to it."""
    small, more = locks["small"], locks["more"]
    options = BuildOptions(store=any_store, cache_dir=tmp_path / "build-cache")
    first_build = build_and_store(small, options)
    before = set(any_store.list(""))
    sizes = {entry.key: entry.size for entry in any_store.entries("")}
    archives = [key for key in sizes if key.endswith(".tar.zst")]
    # What it cost: every archive it stored; what a host holding nothing downloads: the same.
    assert (first_build.layers_built, len(first_build.manifest.layers)) == (4, 4)
    assert first_build.uploaded == first_build.size == sum(sizes[key] for key in archives)
    installs = []
    real = envmgr.build.layers.create_prefix

    def spy(lock, prefix, *args, **kwargs):
        installs.append(sorted(p.name for p in lock.packages if p.name not in kwargs["skip"]))
        return real(lock, prefix, *args, **kwargs)

    monkeypatch.setattr(envmgr.build.layers, "create_prefix", spy)
    built = build_and_store(more, options)
    [colorama] = [ref for ref in built.manifest.layers if "colorama" in ref.package]
    assert installs == [["colorama"], []]  # its layer; the env layer's own install
    assert built.layers_built == 1
    assert built.uploaded == any_store.size(layer_archive_key(colorama.layer_id)) + (
        any_store.size(archive_key("linux-64", more.env_id))
    )
    assert built.size == first_build.size - first_build.manifest.size + built.uploaded
    assert set(any_store.list("")) - before == {
        layer_archive_key(colorama.layer_id),
        layer_manifest_key(colorama.layer_id),
        archive_key("linux-64", more.env_id),
        f"envs/linux-64/{more.env_id}/conda-lock.yml",
        manifest_key("linux-64", more.env_id),
    }
    again = build_and_store(more, options)
    assert (again.status, again.uploaded, again.layers_built) == ("present", 0, 0)
    assert again.size == built.size

    cache = tmp_path / "host"
    first = hydrate(small.env_id, any_store, cache, platform="linux-64")
    reads: list[str] = []
    real_get = any_store.get

    def counting_get(key, *args, **kwargs):
        reads.append(key)
        return real_get(key, *args, **kwargs)

    monkeypatch.setattr(any_store, "get", counting_get)
    second = hydrate(more.env_id, any_store, cache, platform="linux-64")
    assert (first.layers_fetched, second.layers_fetched) == (4, 1)
    # The layers the host holds come with the manifests they were checked against.
    assert [key for key in reads if key.startswith("layers/")] == [
        layer_manifest_key(colorama.layer_id)
    ]
    module = Path("lib/python3.11/site-packages/tabulate/__init__.py")
    a, b = (first.prefix / module).stat(), (second.prefix / module).stat()
    assert a.st_ino == b.st_ino and not a.st_mode & 0o222  # one read-only file
    script = Path("bin/tabulate")  # holds its env's python: each env has its own copy
    assert (first.prefix / script).stat().st_ino != (second.prefix / script).stat().st_ino
    assert str(second.prefix) in (second.prefix / script).read_text()
    if os.geteuid() != 0:  # root writes through any mode: the README says so
        with pytest.raises(PermissionError):
            (second.prefix / module).open("a")
    copied = hydrate(more.env_id, any_store, tmp_path / "copies", link=False)
    assert copied.linked == 0 and (copied.prefix / module).stat().st_nlink == 1
    if isinstance(any_store, LocalStore):  # the worker's flag says the same
        args = ["--store", any_store.url, "--env-id", more.env_id, "--copy", "--json"]
        out = subprocess.run(
            [sys.executable, "-m", "envmgr.bootstrap", *args, "--cache-dir", str(tmp_path / "w")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert json.loads(out)["layers"]["linked"] == 0

    removed, _busy, layers = gc(cache, max_size=0)
    assert {e.env_id for e in removed} == {small.env_id, more.env_id}
    assert len(layers) == 5 and not list((cache / "layers").glob("[0-9a-f]*"))


def test_concurrent_hydrates_on_one_host_fetch_each_layer_once(locks, tmp_path):
    store = LocalStore(tmp_path / "store")
    options = BuildOptions(store=store, cache_dir=tmp_path / "c")
    for name in ("small", "more"):
        build_and_store(locks[name], options)
    opened: list[str] = []
    real_open = store.open

    def counting_open(key, **how):
        opened.append(key)
        return real_open(key, **how)

    store.open = counting_open  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            hydrate(locks[name].env_id, store, tmp_path / "host", platform="linux-64")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("small", "more") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    layer_reads = [key for key in opened if key.startswith("layers/")]
    assert len(layer_reads) == len(set(layer_reads)) == 5  # python, pip, tabulate, six, colorama


def _held_small(locks, layered_store, tmp_path):
    """The small env layered into a store and hydrated on a host: (lock, store, host cache,
    the hydrate's result, layer id by package name in install order)."""
    lock = locks["small"]
    store = layered_store(lock, tmp_path)
    cache = tmp_path / "host"
    first = hydrate(lock.env_id, store, cache, platform="linux-64")
    manifest = json.loads(store.get(manifest_key("linux-64", lock.env_id)) or b"")
    layers = {ref[1].split()[1]: ref[0] for ref in manifest["layers"]}
    return lock, store, cache, first, layers


def test_a_held_layer_whose_kept_manifest_is_damaged_is_checked_against_the_stores(
    locks, tmp_path, layered_store
):
    """A held layer's kept manifest that is not JSON, that names another layer, or that is
    a link to ``/dev/zero`` is not trusted: that layer's manifest is read from the store (the
    layer itself is not fetched again), and the env is the same."""
    lock, store, cache, first, layers = _held_small(locks, layered_store, tmp_path)
    kept = {name: cache / "layers" / layer_id / LAYER_MANIFEST for name, layer_id in layers.items()}
    before = _tree(first.prefix, ())
    kept["tabulate"].write_text("{not json")
    kept["python"].write_bytes(kept["six"].read_bytes())
    kept["six"].unlink()
    kept["six"].symlink_to("/dev/zero")
    shutil.rmtree(first.prefix)
    reads: list[str] = []
    real_get = store.get

    def counting_get(key, *args, **kwargs):
        reads.append(key)
        return real_get(key, *args, **kwargs)

    store.get = counting_get  # type: ignore[method-assign]
    again = hydrate(lock.env_id, store, cache, platform="linux-64")
    assert again.layers_fetched == 0
    assert sorted(key for key in reads if key.startswith("layers/")) == sorted(
        layer_manifest_key(layers[name]) for name in ("python", "six", "tabulate")
    )
    assert _tree(again.prefix, ()) == before


def test_verify_names_a_file_written_through_a_link_and_fix_fetches_it_again(
    locks, tmp_path, layered_store
):
    """Root ignores read-only modes: a task that writes into its env's linked file writes
    into the layer and every env linking it. ``envmgr verify`` names the layer, the file
    and the envs, exit 1; ``--fix`` removes them (not an env in use) and the next hydrate
    has the original bytes; a file gone from a layer, one added, and a kept manifest that
    is unreadable are named too."""
    lock, store, cache, first, layers = _held_small(locks, layered_store, tmp_path)
    world = {**os.environ, "ENVMGR_CACHE_DIR": str(cache)}
    clean = envmgr_here("verify", env=world)
    assert (clean.returncode, clean.stderr) == (0, ""), clean.stderr
    assert clean.stdout == f"{len(layers)} package layers checked: none changed\n"
    # Another env (a copy of the first's links, as a second hydrate would make) that is in use.
    other = cache / "envs" / ("e" * 32)
    shutil.copytree(first.prefix, other, copy_function=os.link, symlinks=True)
    layer = cache / "layers" / layers["tabulate"]
    rel = next(p for p in sorted(layer.rglob("*.py")) if p.is_file()).relative_to(layer)
    written = first.prefix / rel
    original = written.read_bytes()
    assert written.stat().st_ino == (layer / rel).stat().st_ino  # one file, linked
    kept = (layer / LAYER_MANIFEST).stat().st_mtime_ns
    written.chmod(0o644)  # what root needs not do
    with written.open("ab") as out:
        out.write(b"# changed by a task\n")
    os.utime(written, ns=(kept + 10**9, kept + 10**9))  # a clock tick later, however coarse
    assert (layer / rel).read_bytes().endswith(b"# changed by a task\n")
    six = cache / "layers" / layers["six"]
    gone = next(p for p in sorted(six.rglob("*.py")) if p.is_file())
    gone_rel = gone.relative_to(six)
    gone.chmod(0o644)
    gone.unlink()
    (six / "stray.txt").write_text("not the package's")
    (cache / "layers" / layers["python"] / LAYER_MANIFEST).write_text("{not json")

    found = envmgr_here("verify", env=world)
    assert found.returncode == 1, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 3, found.stdout
    both = ", ".join(sorted([lock.env_id, other.name]))
    said = {line.split()[1]: line for line in lines}
    assert f"written since it was unpacked: {rel}" in said[layers["tabulate"]]
    assert said[layers["tabulate"]].endswith(f"linked by {both}"), said
    assert (
        f"gone: {gone_rel}" in said[layers["six"]]
        and "not its own: stray.txt" in said[layers["six"]]
    )
    assert "kept manifest is unreadable" in said[layers["python"]]
    assert found.stderr.startswith("envmgr: error: 3 of ") and "verify --fix" in found.stderr
    assert len(found.stderr.splitlines()) == 1
    as_json = shaped("verify", envmgr_here("verify", "--json", env=world).stdout)
    assert {c["layer_id"] for c in as_json["changed"]} == {
        layers[n] for n in ("tabulate", "six", "python")
    }

    from envmgr.worker.env_cache import hold_for_use
    from envmgr.worker.layers import using_layers

    # An env a command runs in, and a layer a hydrate links from, stay; both are said.
    with hold_for_use(cache, other.name), using_layers(cache, [layers["six"]]):
        fixed = envmgr_here("verify", "--fix", env=world)
    assert fixed.returncode == 1, fixed.stderr
    assert f"removed {lock.env_id}" in fixed.stdout and f"kept {other.name}: in use" in fixed.stdout
    assert f"kept layer {layers['six']}: a hydrate is linking from it" in fixed.stdout
    assert "removed 2 changed package layers" in fixed.stdout
    assert not first.prefix.exists() and other.is_dir()
    assert (other / rel).read_bytes().endswith(b"# changed by a task\n")  # its own links
    assert envmgr_here("verify", env=world).returncode == 1  # six's layer is still changed
    done = envmgr_here("verify", "--fix", env=world)
    assert done.returncode == 0, done.stdout
    assert f"removed {other.name}" in done.stdout
    assert "removed 1 changed package layer;" in done.stdout
    assert envmgr_here("verify", env=world).returncode == 0  # the layers that were left
    again = hydrate(lock.env_id, store, cache, platform="linux-64")
    assert again.layers_fetched == 3
    assert (again.prefix / rel).read_bytes() == original
    assert (again.prefix / gone_rel).is_file()
    assert envmgr_here("verify", env=world).returncode == 0


def test_a_host_file_that_is_a_fifo_is_not_waited_on(locks, tmp_path, layered_store):
    """A FIFO would block its reader forever: as a layer's kept manifest, that layer's
    manifest is read from the store; as a layer's COMPLETE marker, the layer is fetched
    again; as an env's layer list, `envmgr ls` and gc still list the env. The FIFOs are made
    under tmp_path, and only ever unlinked."""
    lock, store, cache, first, layers = _held_small(locks, layered_store, tmp_path)
    before = _tree(first.prefix, ())
    (cache / "layers" / layers["six"] / LAYER_MANIFEST).unlink()
    os.mkfifo(cache / "layers" / layers["six"] / LAYER_MANIFEST)
    (cache / "layers" / layers["tabulate"] / COMPLETE).unlink()
    os.mkfifo(cache / "layers" / layers["tabulate"] / COMPLETE)
    (first.prefix / LAYERS).unlink()
    os.mkfifo(first.prefix / LAYERS)
    assert [env.layers for env in list_envs(cache)] == [()]
    shutil.rmtree(first.prefix)
    again = hydrate(lock.env_id, store, cache, platform="linux-64")
    assert again.layers_fetched == 1  # tabulate's, whose marker could not be read
    assert _tree(again.prefix, ()) == before
    assert [env.layers for env in list_envs(cache)] == [tuple(layers.values())]


def test_a_store_that_lies_about_a_layer_publishes_nothing(locks, tmp_path, layered_store):
    """A layer's manifest swapped for another package's, a layer gone, a relocation entry
    that climbs out: one clear error each, no env and no layer published."""
    lock = locks["small"]
    store = layered_store(lock, tmp_path)
    manifest = json.loads(store.get(manifest_key("linux-64", lock.env_id)) or b"")
    layers = {ref[1].split()[1]: ref[0] for ref in manifest["layers"]}
    python, tabulate = layers["python"], layers["tabulate"]
    good = store.get(layer_manifest_key(tabulate)) or b""
    store.put(layer_manifest_key(tabulate), store.get(layer_manifest_key(python)) or b"")
    cache = tmp_path / "host"
    with pytest.raises(ArchiveError, match=r"describes conda python .*not the layer of conda tab"):
        hydrate(lock.env_id, store, cache, platform="linux-64")
    store.delete(layer_manifest_key(tabulate))
    with pytest.raises(HydrateError, match=r"its layer of conda tabulate .* is not in"):
        hydrate(lock.env_id, store, cache, platform="linux-64")
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    climbing = json.loads(good)
    climbing["relocations"] = [[os.path.relpath(victim, tmp_path / "x" / "y"), "text"]]
    store.put(layer_manifest_key(tabulate), json.dumps(climbing).encode())
    with pytest.raises(ArchiveError, match="unsafe member name"):
        hydrate(lock.env_id, store, cache, platform="linux-64")
    assert victim.read_text() == "keep me\n"
    assert not (cache / "envs" / lock.env_id).exists()
    assert not list((cache / "layers").glob("*/.envmgr-complete"))
    store.put(layer_manifest_key(tabulate), good)
    assert hydrate(lock.env_id, store, cache, platform="linux-64").layers_fetched == 4


def test_the_largest_layer_downloads_before_the_other_manifests_are_read(
    locks, tmp_path, layered_store
):
    """The env manifest's package sizes say which layer is largest: its manifest is read
    (with the smallest's, whose time says whether the store is far) and its download starts
    before the other layers' manifests are read. An env manifest without package sizes (an
    older builder's) has every manifest read first, and gives the same env."""
    lock = locks["small"]
    store = layered_store(lock, tmp_path)
    key = manifest_key("linux-64", lock.env_id)
    manifest = json.loads(store.get(key) or b"")
    sizes = manifest["package_sizes"]
    by_size = sorted(manifest["layers"], key=lambda ref: sizes[ref[1].split()[1]])
    smallest, largest = by_size[0][0], by_size[-1][0]
    assert len(by_size) == 4 and sizes[by_size[-1][1].split()[1]] > 10 * 2**20  # python
    real_get, real_open = store.get, store.open
    largest_opened = threading.Event()
    waits: list[bool] = []

    def get(key, *args, **kwargs):
        probe = (layer_manifest_key(largest), layer_manifest_key(smallest))
        if key.startswith("layers/") and key not in probe:
            waits.append(largest_opened.wait(10))  # False: read before the download began
        return real_get(key, *args, **kwargs)

    def open_(key, **how):
        if key == layer_archive_key(largest):
            largest_opened.set()
        return real_open(key, **how)

    store.get, store.open = get, open_  # type: ignore[method-assign]
    first = hydrate(lock.env_id, store, tmp_path / "host", platform="linux-64")
    assert waits == [True, True]
    store.get, store.open = real_get, real_open  # type: ignore[method-assign]
    del manifest["package_sizes"]
    store.put(key, json.dumps(manifest).encode())
    again = hydrate(lock.env_id, store, tmp_path / "older", platform="linux-64")
    assert again.layers_fetched == 4
    assert _tree(again.prefix, ()) == _tree(first.prefix, ())


class _Trickle(io.RawIOBase):
    """A store object read 512 bytes per 50 ms (10 kB/s) until *until*, then at full speed."""

    def __init__(self, inner, until: float) -> None:
        super().__init__()
        self.inner, self.until = inner, until

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        slow = time.monotonic() < self.until
        if slow:
            time.sleep(0.05)
        data = self.inner.read(min(len(target), 512) if slow else len(target))
        target[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.inner.close()
        super().close()


def test_ctrl_c_stops_a_layered_hydrate_without_finishing_its_downloads(
    locks, tmp_path, monkeypatch, layered_store
):
    """Ctrl-C while the layers trickle in (python's alone would take half an hour): the
    hydrate stops at the downloads' next read, not when they end (before, it waited for
    them: here 20 s, when the trickle ends), and leaves no env, no layer, no temp dir."""
    lock = locks["small"]
    store = layered_store(lock, tmp_path)
    real_open = store.open
    until = time.monotonic() + 20

    def trickling_open(key, **how):
        inner = real_open(key, **how)
        return _Trickle(inner, until) if inner is not None and key.startswith("layers/") else inner

    store.open = trickling_open  # type: ignore[method-assign]
    sent: list[float] = []

    def ctrl_c() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    cache = tmp_path / "host"
    monkeypatch.setattr(envmgr.worker.assembly, "HELPER_FILES", 0)  # a helper from the start
    started = _helpers_started(monkeypatch)
    # As at a terminal, even when the suite was started in the background (SIGINT ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, ctrl_c)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            hydrate(lock.env_id, store, cache, platform="linux-64")
        stopped = time.monotonic()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert sent and stopped - sent[0] < 5, f"stopped {stopped - sent[0]:.1f} s after Ctrl-C"
    assert not (cache / "envs" / lock.env_id).exists()
    layers = cache / "layers"
    assert [p.name for p in layers.iterdir() if p.name != ".locks"] == []
    assert all(helper.proc.returncode is not None for helper in started)  # none left running


def test_a_large_layer_comes_down_over_ranged_streams(
    locks, s3_server, s3_bucket, tmp_path, monkeypatch
):
    """Layers over two streams' worth of bytes are read with parallel ranged GETs (here with
    the threshold lowered to 1 MB, so python's layer takes them), the rest as one stream.
    A far store (30 ms to each first byte, through a proxy) gets more streams: per layer,
    and layers at once."""
    import envmgr.cache.s3
    import envmgr.worker.hydrate

    monkeypatch.delenv("ENVMGR_S3_PARTS", raising=False)
    monkeypatch.delenv("ENVMGR_LAYER_STREAMS", raising=False)
    monkeypatch.setattr(
        envmgr.worker.hydrate, "_BYTES_PER_STREAM", {False: (1 << 20, 4), True: (1 << 19, 8)}
    )
    monkeypatch.setattr(envmgr.worker.hydrate, "workers", lambda: 8)  # 4 streams when near
    url = f"s3://{s3_bucket}/layers-test"
    store = envmgr.cache.s3.S3Store(url, client=s3_server.client())
    lock = locks["small"]
    manifest = build_and_store(lock, BuildOptions(store=store, cache_dir=tmp_path / "c")).manifest
    ranged: dict[str, int] = {}
    real = envmgr.cache.s3._RangedReader

    def spy(store_, key, size, *, threads, **more):
        ranged[key] = threads
        return real(store_, key, size, threads=threads, **more)

    at_once: list[bool] = []
    real_streams = envmgr.worker.hydrate.layer_streams

    def spy_streams(far: bool = False) -> int:
        at_once.append(far)
        return real_streams(far)

    monkeypatch.setattr(envmgr.cache.s3, "_RangedReader", spy)
    monkeypatch.setattr(envmgr.worker.hydrate, "layer_streams", spy_streams)
    hydrated = hydrate(lock.env_id, store, tmp_path / "host", platform="linux-64")
    sizes = {
        layer_archive_key(ref.layer_id): json.loads(
            store.get(layer_manifest_key(ref.layer_id)) or b""
        )["size"]
        for ref in manifest.layers
    }
    assert ranged == {k: min(4, s >> 20) for k, s in sizes.items() if s >= 2 << 20} != {}
    assert at_once[-1] is False  # the last ask is the pool's (the first checks the setting)
    ran = subprocess.run([hydrated.python, "-c", "import tabulate"], capture_output=True)
    assert ran.returncode == 0, ran.stderr

    ranged.clear()
    upstream = urlsplit(s3_server.endpoint_url)
    with FaultProxy((str(upstream.hostname), int(upstream.port or 80))) as proxy:
        proxy.faults = Faults(first_byte=0.03)
        far = envmgr.cache.s3.S3Store(url, client=s3_server.client(proxy.url))
        hydrate(lock.env_id, far, tmp_path / "far-host", platform="linux-64")
    assert ranged == {k: min(8, s >> 19) for k, s in sizes.items() if s >= 1 << 20} != {}
    assert at_once[-1] is True
    assert real_streams(True) == min(8, 4 * real_streams(False))


def test_a_near_store_gives_a_layer_at_most_one_stream_per_two_cores(monkeypatch):
    """Near, one stream outruns a core's unpacking: a 2-core host reads torch's 175 MB layer
    as one stream, an 8-core host over two; a far store still splits it by its bytes."""
    import envmgr.worker.hydrate as hydrating

    monkeypatch.setattr(hydrating, "workers", lambda: 2)
    assert hydrating._streams_for(175 << 20, far=False) == 0
    assert hydrating._streams_for(175 << 20, far=True) == 8
    monkeypatch.setattr(hydrating, "workers", lambda: 8)
    assert hydrating._streams_for(175 << 20, far=False) == 2
    assert hydrating._streams_for(400 << 20, far=False) == 4
    assert hydrating._streams_for(100 << 20, far=False) == 0
