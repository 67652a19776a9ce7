"""Files handed in are parsed within bounds: alias bombs, huge values, deep nesting and huge
files are one line (exit 2), and an adopted lock's URLs must name its packages' files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _helpers import run_envmgr

from envmgr.errors import SpecError
from envmgr.interop import adopt
from envmgr.limits import (
    MAX_FILE_BYTES,
    InputTooLargeError,
    check_package_url,
    check_yaml,
)
from envmgr.lock import Lock, LockedPackage, LockError, PlatformLock, read_conda_lock
from envmgr.specfiles import read_environment_yml

# Nine levels of ten: 10**9 strings once expanded, a few hundred bytes on disk.
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    with pytest.raises(InputTooLargeError, match="alias bomb"):
        check_yaml(BOMB, where="x.yml")
    lock = _write(tmp_path, "bomb.conda-lock.yml", "version: 1\n" + BOMB)
    with pytest.raises(InputTooLargeError, match=r"bomb\.conda-lock\.yml: expands to more than"):
        read_conda_lock(lock)
    env = _write(tmp_path, "environment.yml", "name: x\n" + BOMB + "dependencies: [python]\n")
    with pytest.raises(SpecError, match="alias bomb"):
        read_environment_yml(env)
    # As a user meets it: one line, exit 2, well before the 60 s bound.
    done = run_envmgr("resolve", "--lockfile", str(lock))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "alias bomb" in done.stderr


def test_ordinary_anchors_still_load():
    check_yaml("base: &b {x: 1}\none: *b\ntwo: *b\nlist: &l [1, 2]\nagain: *l\n", where="x")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version: 1\npackage:\n- name: " + "n" * 10_000_000 + "\n", "a value of 10000000"),
        ("a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 64"),
    ],
    ids=["10 MB name", "deep nesting"],
)
def test_huge_values_and_deep_nesting_are_one_line(tmp_path, text, needle):
    lock = _write(tmp_path, "x.conda-lock.yml", text)
    with pytest.raises(InputTooLargeError, match=needle):
        read_conda_lock(lock)


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    lock = tmp_path / "huge.conda-lock.yml"
    with lock.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(InputTooLargeError, match="is more than a lock file can be"):
        read_conda_lock(lock)
    env = tmp_path / "environment.yml"
    os.link(lock, env)
    with pytest.raises(SpecError, match="environment file can be"):
        read_environment_yml(env)


def _lock_with(url: str, manager: str = "conda", name: str = "numpy") -> Lock:
    package = LockedPackage(
        manager=manager, name=name, version="2.1.3", url=url, sha256="0" * 64, build="b_0"
    )  # type: ignore[arg-type]
    return Lock(platforms=(PlatformLock(platform="linux-64", packages=(package,)),))


@pytest.mark.parametrize(
    ("url", "manager", "needle"),
    [
        ("file:///etc/passwd", "conda", "'passwd' is not a conda package file"),
        ("file:///etc/passwd", "pypi", "'passwd' is not a wheel or a source distribution"),
        ("https://host/c/linux-64/evil-1.0-0.conda", "conda", "is not a file of numpy"),
        ("ftp://host/numpy-2.1.3-b_0.conda", "conda", "scheme 'ftp'"),
        ("https:///numpy-2.1.3-b_0.conda", "conda", "no host"),
        ("https://host/six-1.0-py3-none-any.whl", "pypi", "is not a file of numpy"),
    ],
)
def test_an_adopted_lock_must_point_at_its_packages_files(url, manager, needle):
    with pytest.raises(LockError, match=needle) as info:
        adopt(_lock_with(url, manager), where="team.lock")
    assert "team.lock: linux-64: numpy 2.1.3: its URL" in str(info.value)


def test_real_package_urls_pass():
    ok = [
        ("https://conda.example/cf/linux-64/numpy-2.1.3-py311h0_0.conda", "conda", "numpy"),
        ("file:///srv/ch/noarch/python-dateutil-2.9.0-pyhd8_0.tar.bz2", "conda", "python-dateutil"),
        ("https://files.example/numpy-2.1.3-cp311-cp311-manylinux_2_28_x86_64.whl", "pypi",
         "numpy"),
        ("http://127.0.0.1:8080/p/python_dateutil-2.9.0-py2.py3-none-any.whl", "pypi",
         "python-dateutil"),
        ("https://files.example/zope.interface-7.0.tar.gz", "pypi", "zope-interface"),
    ]  # fmt: skip
    for url, manager, name in ok:
        assert check_package_url(url, manager=manager, name=name) is None, url
