"""Files handed in are parsed within bounds: alias bombs, huge values, deep nesting and huge
files are one line (exit 2), and an adopted lock's URLs must name its packages' files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _helpers import envmgr_here, run_envmgr

from envmgr.errors import SpecError
from envmgr.limits import (
    MAX_FILE_BYTES,
    InputTooLargeError,
    check_package_url,
    check_yaml,
)
from envmgr.locks.export import adopt
from envmgr.locks.lock import Lock, LockedPackage, LockError, PlatformLock, read_conda_lock
from envmgr.specs.files import read_environment_yml

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


# -- inputs with odd shapes (outside checks, round 5) ------------------------------------------


def test_deep_flow_style_yaml_is_one_line_everywhere(tmp_path):
    """100,000 levels of [[[...]]] gave a 3,000-line RecursionError in resolve -f,
    resolve --lockfile and show (libyaml stops at 1,000 before any event)."""
    deep = _write(tmp_path, "deep.yml", "dependencies: " + "[" * 100_000 + "]" * 100_000 + "\n")
    for args in (
        ["resolve", "-f", str(deep)],
        ["resolve", "--lockfile", str(deep)],
        ["show", str(deep)],
    ):
        result = envmgr_here(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr[-300:])
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "nested deeper than 64 levels" in lines[0], (args, lines[:3])


def test_a_device_as_a_requirements_file_is_bounded_in_bytes(tmp_path):
    """-r /dev/zero grew by 400 MB/s: the 32 MiB bound looked at stat's size, which a device
    has not."""
    result = envmgr_here("resolve", "-r", "/dev/zero", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "envmgr: error: invalid environment spec: /dev/zero: /dev/zero: more than a "
        "requirements file can be (32 MiB read and more to come)"
    ]


def _at_a_terminal() -> None:
    """In the child before exec: SIGINT as a shell's foreground job gets it. An ignored
    SIGINT survives exec, and pytest's process can have one (a suite started with ``&``
    from a script, or a library that ignores it while a test runs): the child then ignored
    Ctrl-C as it should, and these tests hung."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(child, *, timeout: float) -> None:
    """Send SIGINT and expect exit 130. A child that hangs instead is reported with its signal
    state and, through faulthandler (SIGABRT), every thread's stack."""
    import signal
    import subprocess

    child.send_signal(signal.SIGINT)
    try:
        _out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            state = " ".join(line for line in status.splitlines() if line.startswith("Sig"))
        except OSError as error:
            state = str(error)
        child.send_signal(signal.SIGABRT)
        try:
            _out, err = child.communicate(timeout=10)
        finally:
            child.kill()
            child.communicate()
        pytest.fail(f"no exit {timeout} s after SIGINT ({state}); its stacks:\n{err}")
    assert child.returncode == 130, err


def test_ctrl_c_stops_a_command_waiting_on_its_input(tmp_path):
    """A requirements file that is a pipe nobody writes: Ctrl-C ends the command at once."""
    import subprocess
    import sys
    import time

    fifo = tmp_path / "requirements.txt"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from envmgr.cli.app import main; main()",
            "resolve",
            "-r",
            str(fifo),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        preexec_fn=_at_a_terminal,
    )
    time.sleep(1.0)  # the child is inside open() of the pipe by now (or soon will be)
    _interrupt(child, timeout=30)  # a guard against a hang, not a timing assertion


def test_ctrl_c_stops_a_resolve_waiting_on_the_index(world, pypi_index, tmp_path):
    """A resolve waits on an index that answers after 30 s: Ctrl-C ends it anyway (the
    resolver's thread used to hold the exit up until its request came back)."""
    import subprocess
    import sys
    import time

    with pypi_index.behaving(latency=30.0):
        child = subprocess.Popen(
            [sys.executable, "-c", "from envmgr.cli.app import main; main()", "resolve",
             "--pypi", "six", "--python", "3.11", "--force"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env={**world, "PYTHONFAULTHANDLER": "1"}, preexec_fn=_at_a_terminal,
        )  # fmt: skip
        time.sleep(2.0)  # the conda part is solved; the resolver waits on the index
        _interrupt(child, timeout=10)  # well before the index answers


def test_requirements_files_with_odd_shapes(tmp_path):
    from envmgr.specs.requirements import read_requirements

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfsix==1.17.0\r\ntabulate\r\n")
    assert [str(d) for d in read_requirements(bom).pypi] == ["six==1.17.0", "tabulate"]
    # A file that is not a requirements file: its first bad line stands for the rest.
    passwd = _write(
        tmp_path, "passwd", "".join(f"user{i}:x:{i}:{i}::/home/u{i}:/bin/sh\n" for i in range(24))
    )
    outer = _write(tmp_path, "req.txt", f"six\n-r {passwd}\n")
    with pytest.raises(SpecError) as info:
        read_requirements(outer)
    text = str(info.value)
    assert len(info.value.problems) == 1 and "\n" not in text
    assert f"{passwd}:1: user0:x:0:0" in text and "user1:" not in text
    assert f"and 23 more bad lines: is {passwd} a requirements file?" in text
    # A few typos in a real file are each named.
    typos = _write(tmp_path, "typos.txt", "six\nnumpy==\n>=1\n")
    with pytest.raises(SpecError) as info:
        read_requirements(typos)
    assert len(info.value.problems) == 2
    # Half a million lines are refused before anything is resolved.
    many = _write(tmp_path, "many.txt", "".join(f"pkg{i}\n" for i in range(500_000)))
    with pytest.raises(SpecError, match="more than 20,000 requirements"):
        read_requirements(many)


_PYLOCK = """lock-version = "1.0"
created-by = "hand"
requires-python = ">=3.11"

[[packages]]
name = "six"
version = "1.17.0"
[[packages.wheels]]
name = "six-1.17.0-py2.py3-none-any.whl"
url = "{url}"
hashes = {{ sha256 = "{sha}" }}
"""


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("file:///etc/passwd", "'passwd' is not a wheel or a source distribution"),
        ("https://host/six-1.17.0.tar.gz", "is listed as a wheel but is not a wheel file"),
    ],
)
def test_a_foreign_lock_whose_file_is_no_package_file_is_one_line(world, tmp_path, url, needle):
    """A pylock.toml wheel URL file:///etc/passwd gave a 56-line InvalidWheelFilename."""
    lock = _write(tmp_path, "pylock.toml", _PYLOCK.format(url=url, sha="0" * 64))
    result = envmgr_here("resolve", "--lockfile", str(lock), "--python", "3.11", env=world)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr[-500:]
    assert f"{lock}: six: its URL" in result.stderr and needle in result.stderr


@pytest.fixture(scope="module")
def fixture_lock_text(conda_channel, pypi_index, tmp_path_factory):
    """A conda-lock file of the fixture channel (numpy) and index (six), as text."""
    from _helpers import fixture_options

    from envmgr.locks.lock import Lock, write_conda_lock
    from envmgr.resolve.resolution_cache import resolve_specs
    from envmgr.specs.deps import CondaDep, PypiDep
    from envmgr.specs.model import EnvSpec

    home = tmp_path_factory.mktemp("origin")
    spec = EnvSpec(python="3.11.*", conda=(CondaDep.parse("numpy"),), pypi=(PypiDep.parse("six"),))
    part = resolve_specs({"x": spec}, fixture_options(home, conda_channel.url, pypi_index.url))[0]
    write_conda_lock(Lock(platforms=(part.lock,)), home / "l.yml")
    return (home / "l.yml").read_text()


def test_an_adopted_lock_takes_packages_only_from_where_it_says(
    world, tmp_path, fixture_lock_text, conda_channel, pypi_index
):
    """A conda package on 169.254.169.254, on another loopback port or with '..' in its
    path was adopted and failed only at build."""
    channel = conda_channel.url.rstrip("/")
    index = pypi_index.url.rstrip("/")
    host, port = index.split("://")[1].split("/")[0].split(":")
    good = _write(tmp_path, "good.conda-lock.yml", fixture_lock_text)
    assert envmgr_here("resolve", "--lockfile", str(good), env=world).returncode == 0
    conda_url = next(line.split("url: ")[1] for line in fixture_lock_text.splitlines()
                     if "url: " in line and "/numpy-" in line)  # fmt: skip
    wheel_url = next(line.split("url: ")[1] for line in fixture_lock_text.splitlines()
                     if "url: " in line and "six-" in line)  # fmt: skip
    cases = {
        conda_url: conda_url.replace(channel, "http://169.254.169.254/latest"),
        conda_url + " ": conda_url.replace(channel, f"{channel}/../../elsewhere"),
        wheel_url: wheel_url.replace(f"{host}:{port}", f"{host}:{int(port) + 1}"),
        wheel_url + " ": wheel_url.replace(f"{host}:{port}", "169.254.169.254"),
    }
    needles = ["link-local", "'.' or '..' segments", "local address", "link-local"]
    for (old, new), needle in zip(cases.items(), needles, strict=True):
        bad = _write(tmp_path, "bad.conda-lock.yml", fixture_lock_text.replace(old.strip(), new))
        result = envmgr_here("resolve", "--lockfile", str(bad), env=world)
        assert result.returncode != 0, new
        assert len(result.stderr.splitlines()) == 1 and needle in result.stderr, result.stderr
    # A conda package from a channel neither the lock nor the configuration names.
    other = conda_url.replace(channel, "https://example.org/other-channel")
    bad = _write(tmp_path, "bad.conda-lock.yml", fixture_lock_text.replace(conda_url, other))
    result = envmgr_here("resolve", "--lockfile", str(bad), env=world)
    assert "under no channel the lock declares" in result.stderr
