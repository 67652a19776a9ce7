"""envmgr writes conda-lock v1 files itself (importing conda-lock costs a fresh resolve
~0.3 s); conda-lock's own models are the oracle: the same lock gives the same bytes."""

from __future__ import annotations

import pytest

from envmgr.locks.lock import (
    Lock,
    LockedPackage,
    PlatformLock,
    read_conda_lock,
    render_conda_lock,
    render_with_conda_lock,
)

SHA = "ab" * 32


def _pkg(name: str, version: str, **more) -> LockedPackage:
    return LockedPackage(
        manager=more.get("manager", "conda"),
        name=name,
        version=version,
        url=more.pop("url", f"https://conda.example.org/ch/linux-64/{name}-{version}-0.conda"),
        sha256=more.pop("sha256", SHA),
        md5=more.pop("md5", "cd" * 16 if more.get("manager", "conda") == "conda" else ""),
        **{k: v for k, v in more.items() if k != "manager"},
    )


ODD = (
    _pkg(
        "python", "3.11.7", build="h0_0_cpython", md5="0" * 32, depends=("libzlib >=1.3", "bzip2")
    ),
    _pkg("zlib", "1.3.1", build="h4ab18f5_1", depends=("libzlib 1.3.1 h4ab18f5_1",)),
    _pkg(
        "fixture-torch",
        "2.5.1",
        build="cuda126_h0_200",
        depends=("__cuda", "cuda-version >=12.6,<13"),
    ),
    _pkg("cuda-version", "12.6", build="h0_3", subdir="noarch", noarch="generic"),
    _pkg(
        "requests",
        "2.32.3",
        manager="pypi",
        url="https://files.example.org/packages/requests-2.32.3-py3-none-any.whl",
        depends=("urllib3<3,>=1.21.1", "PySocks!=1.5.7,>=1.5.6; extra == 'socks'", "idna"),
    ),
    _pkg(
        "Thop",
        "0.0.22",
        manager="pypi",
        url="https://f.example.org/thop-0.0.22-421392844089.tar.gz",
    ),
    _pkg(
        "torch",
        "2.5.1+cu126",
        manager="pypi",
        url="file:///srv/torch/cu126/torch-2.5.1%2Bcu126-py3-none-any.whl",
    ),
    _pkg("yaml-odd", "1.0", build="0", depends=("a: b", "'quoted'", "x #comment")),
)


@pytest.mark.parametrize("created", ["", "2026-12-06T06:00:00Z"])
@pytest.mark.parametrize(
    "channels",
    [("conda-forge",), ("file:///tmp/channel", "https://conda.example.org/ch/"), ()],
)
def test_envmgrs_lock_files_are_byte_for_byte_conda_locks(channels, created):
    platforms = (
        PlatformLock(
            platform="linux-64",
            packages=ODD,
            channels=channels,
            virtual_packages=("__cuda=12.6=0", "__glibc=2.28=0"),
        ),
        PlatformLock(platform="osx-arm64", packages=ODD[:2] + ODD[4:6], channels=channels),
    )
    lock = Lock(
        platforms=platforms, spec_id="f" * 32, sources=("flow.py", "env.yml"),
        envmgr_version="0.1.0", created=created,
    )  # fmt: skip
    assert render_conda_lock(lock) == render_with_conda_lock(lock)


def test_a_written_lock_reads_back_whole(tmp_path):
    lock = Lock(
        platforms=(PlatformLock(platform="linux-64", packages=ODD, channels=("conda-forge",)),),
        spec_id="e" * 32,
    )
    path = tmp_path / "conda-lock.yml"
    path.write_text(render_conda_lock(lock))
    again = read_conda_lock(path).for_platform("linux-64")
    assert again.env_id == lock.platforms[0].env_id
