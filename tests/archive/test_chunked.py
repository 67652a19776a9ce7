"""Archive format 2: frames packed on all cores, decoded and written on all cores, and the
index that says where each frame is, checked against whatever a hostile store serves."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from _helpers import archive_manifest, framed

import envmgr.archive.unpack
from envmgr.archive.manifest import ArchiveError, Chunk, ChunkDigestError, Manifest
from envmgr.archive.pack import pack, scan_relocations
from envmgr.archive.unpack import unpack
from envmgr.cache.layout import archive_key, manifest_key
from envmgr.cache.local import LocalStore
from envmgr.worker.env_cache import COMPLETE, env_dir
from envmgr.worker.hydrate import HashMismatchError, hydrate

SMALL_CHUNKS = 64 << 10


def _tree(root: Path) -> Path:
    """Files of every shape pack cuts: a file of many frames, many small ones, an empty one,
    an executable, links, nested dirs, and the prefix itself straddling pack's 1 MiB reads."""
    prefix = root / ("p" * 200)
    (prefix / "lib" / "deep" / "er").mkdir(parents=True)
    (prefix / "bin").mkdir()
    rng = __import__("random").Random(7)
    (prefix / "lib" / "big.so").write_bytes(rng.randbytes(5 * SMALL_CHUNKS + 123))
    for number in range(300):
        (prefix / "lib" / "deep" / f"m{number:03}.py").write_text(f"x = {number}\n" * number)
    (prefix / "lib" / "deep" / "er" / "empty").write_bytes(b"")
    tool = prefix / "bin" / "tool"
    tool.write_text(f"#!{prefix}/bin/python\n")
    tool.chmod(0o755)
    needle = str(prefix).encode()
    straddle = b"\0" * ((1 << 20) - 10) + needle + b"\0tail"
    (prefix / "lib" / "straddle.bin").write_bytes(straddle)
    (prefix / "lib" / "cached.pyc").write_bytes(b"\0" + needle)  # never listed
    (prefix / "bin" / "python").symlink_to("../lib/big.so")
    (prefix / "lib" / "deep" / "up").symlink_to("..")
    return prefix


def _listing(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = ("link", str(path.readlink()))
        elif path.is_dir():
            out[rel] = ("dir", path.stat().st_mode & 0o777)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = ("file", path.stat().st_mode & 0o777, digest)
    return out


def _packed(prefix: Path, **kwargs) -> tuple[bytes, Manifest]:
    out = io.BytesIO()
    result = pack(prefix, out, find_prefix=str(prefix), **kwargs)
    data = out.getvalue()
    manifest = result.manifest(env_id="c" * 32, platform="linux-64", build_prefix=str(prefix))
    return data, manifest


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("chunked"))


def test_both_formats_unpack_to_the_same_tree(tree, tmp_path):
    v2, m2 = _packed(tree, chunk_size=SMALL_CHUNKS)
    v1, m1 = _packed(tree, chunk_size=None)
    assert (m1.format, m2.format) == (1, 2)
    assert len(m2.chunks) > 5 and any(c.cont for c in m2.chunks)  # big.so spans frames
    assert Manifest.from_dict(json.loads(json.dumps(m2.to_dict()))) == m2
    unpack(io.BytesIO(v1), tmp_path / "v1", m1)
    unpack(io.BytesIO(v2), tmp_path / "v2", m2)
    assert _listing(tmp_path / "v1") == _listing(tmp_path / "v2") == _listing(tree)
    # Plain tools read format 2 whole: the frames concatenated are one .tar.zst.
    (tmp_path / "plain").mkdir()
    (tmp_path / "a.tar.zst").write_bytes(v2)
    subprocess.run(
        ["tar", "--zstd", "-xf", tmp_path / "a.tar.zst", "-C", tmp_path / "plain"], check=True
    )
    assert _listing(tmp_path / "plain") == _listing(tree)


def test_pack_finds_what_the_scan_finds_and_is_deterministic(tree):
    one, m_one = _packed(tree, chunk_size=SMALL_CHUNKS, threads=1)
    four, m_four = _packed(tree, chunk_size=SMALL_CHUNKS, threads=4)
    assert one == four and m_one == m_four
    assert m_one.relocations == scan_relocations(tree)
    modes = {r.path: r.mode for r in m_one.relocations}
    assert modes == {"bin/tool": "text", "lib/straddle.bin": "binary"}


def _stored(tmp_path: Path, tree: Path, **changes) -> tuple[LocalStore, Manifest]:
    """A store holding *tree* as a format-2 env whose manifest has *changes* (a lying index)."""
    data, manifest = _packed(tree, chunk_size=SMALL_CHUNKS)
    manifest = replace(manifest, env_id="d" * 32, **changes)
    store = LocalStore(tmp_path / "store")
    store.put(archive_key("linux-64", manifest.env_id), data)
    raw = json.dumps(manifest.to_dict()).encode()
    store.put(manifest_key("linux-64", manifest.env_id), raw)
    return store, manifest


def _shifted(chunks: tuple[Chunk, ...], number: int, by: int) -> tuple[Chunk, ...]:
    moved = replace(chunks[number], offset=chunks[number].offset + by)
    return (*chunks[:number], moved, *chunks[number + 1 :])


def test_a_format_2_env_hydrates_and_runs_its_relocated_script(tree, tmp_path):
    store, manifest = _stored(tmp_path, tree)
    got = hydrate(manifest.env_id, store, tmp_path / "cache", platform="linux-64")
    assert got.downloaded and (got.prefix / COMPLETE).is_file()
    assert (got.prefix / "bin" / "tool").read_text() == f"#!{got.prefix}/bin/python\n"
    assert (got.prefix / "lib" / "big.so").read_bytes() == (tree / "lib" / "big.so").read_bytes()


@pytest.mark.parametrize(
    ("lie", "said"),
    [
        ("overlap", "overlaps the one before"),
        ("gap", "leaves a gap before it"),
        ("past the end", "past the archive's"),
        ("missing chunk", "the chunks cover"),
        ("continuation first", "bad continuation flag"),
        ("huge frame", "out of range"),
    ],
)
def test_an_index_that_does_not_tile_the_archive_is_refused_before_any_download(
    tree, tmp_path, lie, said
):
    _data, manifest = _packed(tree, chunk_size=SMALL_CHUNKS)
    chunks = manifest.chunks
    last = chunks[-1]
    changed = {
        "overlap": _shifted(chunks, 3, -1),
        "gap": _shifted(chunks, 3, +1),
        "past the end": (*chunks[:-1], replace(last, size=last.size + 10)),
        "missing chunk": chunks[:-1],
        "continuation first": (replace(chunks[0], cont=True), *chunks[1:]),
        "huge frame": (replace(chunks[0], raw=1 << 40), *chunks[1:]),
    }[lie]
    store, manifest = _stored(tmp_path, tree, chunks=changed)
    cache = tmp_path / "cache"
    with pytest.raises(ArchiveError) as caught:
        hydrate(manifest.env_id, store, cache, platform="linux-64")
    assert said in str(caught.value) and "\n" not in str(caught.value)
    assert "not an envmgr manifest" in str(caught.value)
    assert not env_dir(cache, manifest.env_id).exists()
    assert list((cache / "envs").glob(".tmp-*")) == []


def test_a_frame_whose_hash_lies_is_refused_and_nothing_is_published(tree, tmp_path):
    _data, manifest = _packed(tree, chunk_size=SMALL_CHUNKS)
    chunks = list(manifest.chunks)
    chunks[4] = replace(chunks[4], sha256="0" * 64)
    store, manifest = _stored(tmp_path, tree, chunks=tuple(chunks))
    cache = tmp_path / "cache"
    with pytest.raises(HashMismatchError, match=r"chunk 4 of \d+ \(bytes \d+-\d+\) does not match"):
        hydrate(manifest.env_id, store, cache, platform="linux-64")
    assert not env_dir(cache, manifest.env_id).exists()
    assert list((cache / "envs").glob(".tmp-*")) == []


def test_a_truncated_or_padded_archive_is_refused(tree, tmp_path):
    data, manifest = _packed(tree, chunk_size=SMALL_CHUNKS)
    with pytest.raises(ArchiveError, match=r"archive ends at byte \d+, inside chunk"):
        unpack(io.BytesIO(data[:-100]), tmp_path / "short", manifest)
    with pytest.raises(ArchiveError, match="longer than its manifest"):
        unpack(io.BytesIO(data + b"x"), tmp_path / "long", manifest)
    # Through hydrate: the same line, and nothing published.
    store, stored = _stored(tmp_path, tree)
    key = archive_key("linux-64", stored.env_id)
    (store.root / key).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match=r"archive ends at byte \d+, inside chunk \d+ of"):
        hydrate(stored.env_id, store, tmp_path / "cache", platform="linux-64")
    assert not env_dir(tmp_path / "cache", stored.env_id).exists()
    assert list((tmp_path / "cache" / "envs").glob(".tmp-*")) == []


def test_frames_whose_decoded_size_or_cut_lies_are_refused(tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for number in range(4):
            info = tarfile.TarInfo(f"f{number}")
            info.size = 3000
            tar.addfile(info, io.BytesIO(bytes([number]) * 3000))
    raw_tar = raw.getvalue()
    # A frame cut inside a member's data that the index does not call a continuation.
    packed, chunks = framed(raw_tar, [512 + 1024])
    manifest = archive_manifest(packed, "zst", 4, 12_000, chunks=chunks)
    with pytest.raises(ArchiveError, match="damaged archive"):
        unpack(io.BytesIO(packed), tmp_path / "cut", manifest)
    # The same cut as a continuation is fine.
    packed, chunks = framed(raw_tar, [512 + 1024], [True, True])
    unpack(
        io.BytesIO(packed),
        tmp_path / "ok",
        archive_manifest(packed, "zst", 4, 12_000, chunks=chunks),
    )
    assert (tmp_path / "ok" / "f3").read_bytes() == b"\3" * 3000
    # A raw size that is not what the frame says it decodes to.
    lying = (replace(chunks[0], raw=chunks[0].raw + 512), *chunks[1:])
    manifest = archive_manifest(packed, "zst", 4, 12_000, chunks=lying)
    with pytest.raises(ArchiveError, match="chunk 0 declares"):
        unpack(io.BytesIO(packed), tmp_path / "raw", manifest)
    # More data than the manifest declares, spread over frames decoded in parallel.
    packed, chunks = framed(raw_tar, [3584, 7168])
    manifest = archive_manifest(packed, "zst", 4, 5_000, chunks=chunks)
    with pytest.raises(ArchiveError, match="more data than its manifest"):
        unpack(io.BytesIO(packed), tmp_path / "budget", manifest)


def test_a_chunk_digest_error_names_the_frame(tree, tmp_path):
    data, manifest = _packed(tree, chunk_size=SMALL_CHUNKS)
    broken = bytearray(data)
    broken[manifest.chunks[2].offset + 5] ^= 0xFF
    with pytest.raises(ChunkDigestError, match="chunk 2 of"):
        unpack(io.BytesIO(bytes(broken)), tmp_path / "env", manifest)


def test_a_worker_without_zstandard_reads_format_2_through_the_zstd_program(
    tree, tmp_path, monkeypatch
):
    """Workers may bootstrap with the standard library and boto3 only: the frames are
    checked one by one as they pass to ``zstd -dc``, and a lying one is named, not hidden
    behind the broken stream it makes."""
    import envmgr.archive.manifest

    monkeypatch.setattr(envmgr.archive.unpack, "_has_zstandard", lambda: False)
    data, manifest = _packed(tree, chunk_size=SMALL_CHUNKS)
    unpack(io.BytesIO(data), tmp_path / "env", manifest)
    assert _listing(tmp_path / "env") == _listing(tree)
    broken = bytearray(data)
    broken[manifest.chunks[3].offset + 9] ^= 0xFF
    with pytest.raises(ChunkDigestError, match="chunk 3 of"):
        unpack(io.BytesIO(bytes(broken)), tmp_path / "broken", manifest)
    with pytest.raises(ArchiveError, match="longer than its manifest"):
        unpack(io.BytesIO(data + b"x"), tmp_path / "long", manifest)


def test_a_stream_the_zstd_program_refuses_is_one_error_and_nothing_on_stderr(
    tree, tmp_path, monkeypatch, capfd
):
    """A worker without zstandard, a format-1 archive whose zstd header is damaged: zstd
    stops at once and the feeder's pipe breaks. The error is zstd's exit and its words, not
    ``[Errno 32] Broken pipe``, and zstd prints nothing of its own."""
    monkeypatch.setattr(envmgr.archive.unpack, "_zstandard", lambda: None)
    data, manifest = _packed(tree, chunk_size=None)
    broken = bytearray(data)
    broken[1] ^= 0xFF  # the magic number
    broken += bytes(1 << 20)  # more than a pipe holds: the feeder is still writing
    with pytest.raises(ArchiveError) as refused:
        unpack(io.BytesIO(bytes(broken)), tmp_path / "env", manifest)
    assert "zstd failed with exit code" in str(refused.value), refused.value
    assert "Broken pipe" not in str(refused.value)
    assert capfd.readouterr().err == ""


def test_a_format_1_env_still_hydrates(tree, tmp_path):
    """Stores written before format 2 keep working: one stream, its whole sha256 checked."""
    data, manifest = _packed(tree, chunk_size=None)
    manifest = replace(manifest, env_id="e" * 32)
    assert manifest.format == 1 and manifest.to_dict()["format"] == 1
    store = LocalStore(tmp_path / "store")
    store.put(archive_key("linux-64", manifest.env_id), data)
    store.put(manifest_key("linux-64", manifest.env_id), json.dumps(manifest.to_dict()).encode())
    got = hydrate(manifest.env_id, store, tmp_path / "cache", platform="linux-64")
    assert (got.prefix / "bin" / "tool").read_text() == f"#!{got.prefix}/bin/python\n"
    assert (got.prefix / "lib" / "big.so").read_bytes() == (tree / "lib" / "big.so").read_bytes()
    # The last byte flipped (set to 1 it was a no-op one run in 256: it ended in 1 already).
    damaged = data[:-1] + bytes([data[-1] ^ 0xFF])
    (store.root / archive_key("linux-64", manifest.env_id)).write_bytes(damaged)
    with pytest.raises(HashMismatchError, match="does not match its manifest"):
        hydrate(manifest.env_id, store, tmp_path / "cache2", platform="linux-64")
