"""Hostile and malformed input: generated inputs for every parser and reader may only raise
envmgr's errors, the extractor never writes outside its target, and credentials given in an
index URL reach neither locks, the store, the cache nor the output."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from _helpers import archive_manifest, framed, run_envmgr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from envmgr.archive.manifest import ArchiveError, Manifest, safe_name
from envmgr.archive.unpack import unpack
from envmgr.errors import EnvmgrError
from envmgr.locks.export import ExplicitFileError, _parse_explicit
from envmgr.locks.lock import LockError, read_conda_lock
from envmgr.specs.deps import CondaDep, PypiDep
from envmgr.specs.files import read_environment_yml, read_pyproject
from envmgr.specs.model import EnvSpec
from envmgr.specs.requirements import read_requirements

# ENVMGR_FUZZ_EXAMPLES=20000 for a longer hunt; each run draws new examples.
FUZZ = settings(
    max_examples=int(os.environ.get("ENVMGR_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Text that looks a little like each format, so the readers get past their first line.
_WORDS = st.sampled_from(
    [
        "dependencies:", "channels:", "- ", "  - ", "pip:", "numpy", ">=", "==", "=", "[", "]",
        "{", "}", ":", "#", "-r ", "-c ", "--hash=sha256:", "--index-url ", "\\\n", "\n", " ",
        "@", "; python_version<'3'", "${TOKEN}", "name: x", "package:", "version: 1",
        "metadata:", "\t", "\x00", "é", "[project]", "dependencies = [", "'", '"',
    ]
)  # fmt: skip
_TEXT = st.one_of(st.text(max_size=200), st.lists(_WORDS, max_size=40).map("".join))


@contextlib.contextmanager
def _file(text: str, name: str) -> Iterator[Path]:
    """*text* as a file named *name*, in a directory removed afterwards (one per example:
    hypothesis runs hundreds, and a function-scoped tmp_path would be shared by them)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        path = Path(folder) / name
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        yield path


@FUZZ
@given(st.lists(st.sampled_from(["/", ".", "..", "\\", "a", "b.c", "é"]), max_size=8).map("".join))
@example("./a")
@example("a/.")
@example("a//b")
@example(".")
@example(".a/b.")
def test_a_member_name_is_kept_only_when_it_is_already_plain(name):
    """safe_name's fast path (substring tests) agrees with the slow one: a name comes back
    unchanged only when it is its own normal form, relative and without ``..``."""
    pure = PurePosixPath(name)
    refused = not name or pure.is_absolute() or ".." in pure.parts or "\\" in name
    try:
        kept = safe_name(name)
    except ArchiveError:
        assert refused, name
        return
    assert not refused and kept == pure.as_posix(), name
    assert not kept.startswith("/") and ".." not in PurePosixPath(kept).parts


@FUZZ
@given(_TEXT)
def test_requirement_and_match_spec_parsers_raise_only_value_error(text):
    for parse in (CondaDep.parse, PypiDep.parse):
        with contextlib.suppress(ValueError):
            parse(text)


@FUZZ
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
))  # fmt: skip
def test_spec_and_manifest_from_dict_raise_only_envmgr_errors(data):
    for reader in (EnvSpec.from_dict, Manifest.from_dict):
        with contextlib.suppress(EnvmgrError):
            reader(data if isinstance(data, dict) else {"conda": data})


@FUZZ
@given(_TEXT)
@example("[]: x")  # found by this test: a list as a mapping key (TypeError: unhashable)
@example("=: x")  # found by this test: a scalar YAML has no constructor for (ConstructorError)
@example("-r \x00")  # found by this test: a NUL byte in an included file name (ValueError)
@example("~0")  # found by this test: a home directory of no user (Path.expanduser raises)
@example("~\x00")  # found by this test: a NUL in a user's name (os.path.expanduser: ValueError)
def test_spec_file_readers_raise_only_envmgr_errors(text):
    for reader, name in (
        (read_environment_yml, "environment.yml"),
        (read_requirements, "requirements.txt"),
        (read_pyproject, "pyproject.toml"),
    ):
        with _file(text, name) as path, contextlib.suppress(EnvmgrError):
            reader(path)


@FUZZ
@given(_TEXT)
def test_lock_and_explicit_readers_raise_only_their_errors(text):
    with _file(text, "conda-lock.yml") as path, contextlib.suppress(LockError):
        read_conda_lock(path)
    with (
        _file("@EXPLICIT\n" + text, "explicit.txt") as path,
        contextlib.suppress(ExplicitFileError),
    ):
        _parse_explicit(path)


_NAMES = st.lists(
    st.sampled_from(["a", "b", "..", ".", "", "/", "bin", "lib", "x" * 20, "é"]),
    min_size=1,
    max_size=5,
).map("/".join)


@st.composite
def _archives(draw):
    members = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo"]))
        members.append((kind, draw(_NAMES), draw(_NAMES), draw(st.binary(max_size=64))))
    return members


def _tar(members) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for kind, name, target, data in members:
            info = tarfile.TarInfo(name or "x")
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.linkname = target
            tar.addfile(info)
    return raw.getvalue()


@FUZZ
@given(_archives(), st.sampled_from(["zst", "gz"]))
@example([("symlink", "a", "a/..", b"")], "zst")  # found by this test in CI: see below
@example([("symlink", "b", "a/../b/..", b"")], "zst")  # found by a 20,000-example run
@example([("file", "a", "", b""), ("symlink", "b", "a/../b/..", b""), ("file", "a", "", b"")], "gz")
def test_the_extractor_never_writes_outside_its_target(members, codec):
    import gzip

    import zstandard

    raw = _tar(members)
    packed = zstandard.ZstdCompressor().compress(raw) if codec == "zst" else gzip.compress(raw)
    manifest = archive_manifest(packed, codec, len(members), 10_000)
    with tempfile.TemporaryDirectory(prefix="fuzz-x-") as root:
        _unpack_stays_inside(packed, Path(root), manifest)


def _unpack_stays_inside(packed: bytes, root: Path, manifest: Manifest) -> None:
    """Unpack into ``root/env`` (refusals allowed): nothing lands outside it and no link
    left behind points outside it."""
    target = root / "env"
    with contextlib.suppress(ArchiveError):
        unpack(io.BytesIO(packed), target, manifest)
    outside = [p for p in root.rglob("*") if not (p == target or target in p.parents)]
    assert outside == []
    real = Path(os.path.realpath(target))
    for path in target.rglob("*"):
        if path.is_symlink():  # realpath, not resolve(): a link loop inside is not an escape
            resolved = Path(os.path.realpath(path.parent / path.readlink()))
            assert resolved == real or real in resolved.parents


@FUZZ
@given(_archives(), st.lists(st.integers(1, 40), max_size=3), st.lists(st.booleans(), max_size=4))
@example([("symlink", "a", "a/..", b""), ("file", "a/x", "", b"1")], [1], [False, False])
@example([("symlink", "d", ".", b""), ("file", "d/d/x", "", b"1")], [1, 2], [False, True, True])
def test_the_parallel_extractor_never_writes_outside_its_target(members, cuts, conts):
    """Format 2: the same members cut into frames anywhere (at 512-byte blocks), flagged
    as continuations or not, extracted by several threads with links made last."""
    raw = _tar(members)
    packed, chunks = framed(raw, [512 * c for c in cuts], [False, *conts, *[False] * 4])
    manifest = archive_manifest(packed, "zst", len(members), 10_000, chunks=chunks)
    with tempfile.TemporaryDirectory(prefix="fuzz-p-") as root:
        _unpack_stays_inside(packed, Path(root), manifest)


def _packed(members) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(_tar(members))


def test_an_archive_with_more_files_than_its_manifest_is_refused(tmp_path):
    """100,000 empty files pass a byte budget; the manifest's file count stops them."""
    members = [("file", f"f{i}", "", b"") for i in range(200)]
    packed = _packed(members)
    with pytest.raises(ArchiveError, match=r"more files than its manifest declares \(1\)"):
        unpack(io.BytesIO(packed), tmp_path / "env", archive_manifest(packed, "zst", 1, 10))
    dirs = [("dir", f"d{i}", "", b"") for i in range(10_005)]
    packed = _packed(dirs)
    with pytest.raises(ArchiveError, match="far more members"):
        unpack(io.BytesIO(packed), tmp_path / "env2", archive_manifest(packed, "zst", 1, 10))
    unpack(io.BytesIO(_packed(members)), tmp_path / "ok", archive_manifest(b"", "zst", 200, 10))


def test_member_modes_are_capped_at_0755_and_the_umask(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, kind, mode in (("shared", tarfile.DIRTYPE, 0o777), ("shared/x", tarfile.REGTYPE,
                                  0o777), ("shared/y", tarfile.REGTYPE, 0o666)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.mode = kind, mode
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    import zstandard

    packed = zstandard.ZstdCompressor().compress(raw.getvalue())
    manifest = archive_manifest(packed, "zst", 2, 10)
    unpack(io.BytesIO(packed), tmp_path / "env", manifest)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "env").rglob("*")}
    assert modes == {"shared": 0o755, "x": 0o755, "y": 0o644}
    old = os.umask(0o077)
    try:
        unpack(io.BytesIO(packed), tmp_path / "private", manifest)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "private").rglob("*")}
    assert modes == {"shared": 0o700, "x": 0o700, "y": 0o600}


@pytest.mark.parametrize(
    "members",
    [
        [("symlink", "a", "a", b""), ("file", "a/x", "", b"data")],
        [("symlink", "a", "a/..", b"")],
        [("symlink", "a", "b", b""), ("symlink", "b", "a", b"")],
    ],
    ids=["self", "self-parent", "cycle"],
)
def test_a_link_loop_is_refused_not_a_traceback(members, tmp_path):
    """Found by the property test above: following a self-referencing link raised
    RuntimeError out of the extractor, and `a -> a/..` passed the check made before the
    link existed, though a loose resolver (os.path.realpath) reads it as the env's parent."""
    import zstandard

    raw = _tar(members)
    packed = zstandard.ZstdCompressor().compress(raw)
    manifest = archive_manifest(packed, "zst", len(members), 100)
    with pytest.raises(ArchiveError, match="makes a link loop"):
        unpack(io.BytesIO(packed), tmp_path / "env", manifest)
    assert not [p for p in (tmp_path / "env").rglob("*") if p.is_symlink()]  # none left behind


def test_credentials_in_an_index_url_reach_no_file_or_output(conda_channel, pypi_index, tmp_path):
    """The fixture index ignores authentication, so a token in the URL only has to be kept
    out of everything envmgr writes or prints, even with -v."""
    token = "s3cr3t-T0KEN-4217"  # noqa: S105 - the secret the test looks for
    index = pypi_index.url.replace("http://", f"http://envmgr-user:{token}@")
    env = {
        **os.environ,
        "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
        "ENVMGR_STORE": (tmp_path / "store").as_uri(),
        "ENVMGR_CHANNELS": conda_channel.url,
    }
    lock = tmp_path / "lock.yml"
    outputs = []
    for args in (
        ("-v", "resolve", "--pypi", "requests", "--python", "3.11", "--index-url", index,
         "-o", str(lock), "--json"),
        ("-v", "build", "--from-lock", str(lock), "--json"),
        ("-v", "resolve", "--pypi", "nonexistent-pkg-xyz", "--python", "3.11",
         "--index-url", index),
    ):  # fmt: skip
        result = run_envmgr(*args, env=env)
        outputs.append(result.stdout + result.stderr)
    assert "requests" in lock.read_text()
    assert "nonexistent-pkg-xyz" in outputs[2]  # the failing resolve did report
    leaked = [text for text in outputs if token in text]
    assert leaked == []
    written = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_symlink() and token.encode() in p.read_bytes()
    ]
    assert written == []


def test_credentials_in_a_channel_url_reach_no_file_or_output(conda_channel, tmp_path):
    """A private channel behind Basic auth: the token travels to py-rattler as a header, so
    resolve, build, hydrate and export work and no file anywhere holds it (py-rattler's
    repodata cache kept it before)."""
    from fixtures.channel_server import ChannelServer

    token = "ch4nnel-T0KEN-9911"  # noqa: S105 - the secret the test looks for
    with ChannelServer(conda_channel.path, user="envmgr-user", password=token) as server:
        private = server.url.replace("http://", f"http://envmgr-user:{token}@")
        env = {
            **os.environ,
            "ENVMGR_CACHE_DIR": str(tmp_path / "cache"),
            "ENVMGR_STORE": (tmp_path / "store").as_uri(),
            "ENVMGR_BUILD_ROOT": str(tmp_path / "builds"),
            "ENVMGR_CHANNELS": private,
            "TMPDIR": str(tmp_path / "tmp"),
        }
        (tmp_path / "tmp").mkdir()
        lock = tmp_path / "lock.yml"
        outputs = []
        for args in (
            ("-v", "resolve", "--conda", "tabulate", "--python", "3.11", "-o", str(lock)),
            ("-v", "build", "--from-lock", str(lock)),
            ("-v", "hydrate", str(lock)),
            ("export", str(lock), "--format", "explicit", "-o", str(tmp_path / "x.txt")),
        ):
            result = run_envmgr(*args, env=env)
            assert result.returncode == 0, (args, result.stderr)
            outputs.append(result.stdout + result.stderr)
        assert server.requests > 0 and server.refused == 0  # every request authenticated
        bare = run_envmgr(
            "resolve", "--conda", "six", "--python", "3.11", "--channel", server.url,
            env={**env, "ENVMGR_CHANNELS": server.url},
        )  # fmt: skip
        assert bare.returncode != 0 and server.refused > 0  # the channel is really private
    assert [text for text in outputs if token in text] == []
    written = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_symlink() and token.encode() in p.read_bytes()
    ]
    assert written == []


@pytest.mark.parametrize(
    "args",
    [
        ("resolve", "--conda", "numpy[[["),
        ("resolve", "--pypi", "requests>>>1"),
        ("resolve", "-f", "/nonexistent/environment.yml"),
        ("show", "\x7f\x01"),
        ("build", "--from-lock", "/etc/hostname"),
        ("export", "/etc/hostname", "--format", "explicit"),
        ("alias", "/etc/hostname", "x"),
        ("gc", "--max-size", "lots"),
    ],
)
def test_the_cli_never_shows_a_traceback(args, tmp_path):
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(tmp_path / "c"), "ENVMGR_CHANNELS": "file:///nope"}
    result = run_envmgr(*args, env=env)
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr and result.stderr.startswith("envmgr: error:"), (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
    json.dumps(result.stdout)  # nothing half-printed that is not text
