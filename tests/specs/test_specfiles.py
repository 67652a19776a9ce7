"""environment.yml, requirements.txt and pyproject.toml readers, checked against other parsers.

environment.yml files are compared with conda-lock's own parser; requirement lines with a
small independent reader built on ``packaging``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from rattler import MatchSpec

from envmgr.errors import SpecError
from envmgr.specs.files import read_environment_yml, read_pyproject, read_spec_file
from envmgr.specs.model import EnvSpec
from envmgr.specs.requirements import read_requirements

DATA = Path(__file__).resolve().parents[1] / "data"
ENV_FILES = sorted(p for p in (DATA / "env").glob("*.yml") if "unsupported" not in p.name)
REQ_FILES = sorted(p for p in (DATA / "req").glob("*.txt") if "unsupported" not in p.name)


def test_enough_real_shaped_files():
    assert len(ENV_FILES) >= 10 and len(REQ_FILES) >= 10


def _conda_lock_deps(path: Path, tmp_path: Path):
    from conda_lock.src_parser.environment_yaml import parse_environment_file

    # conda-lock cannot read pip options such as --extra-index-url: give it the file without
    # them, and a local PyPI->conda name mapping so it stays offline.
    copy = tmp_path / path.name
    copy.write_text(
        "".join(
            line
            for line in path.read_text().splitlines(keepends=True)
            if not re.match(r"^\s*-\s+-", line)
        )
    )
    mapping = tmp_path / "mapping.json"
    mapping.write_text(
        json.dumps(
            {
                "pip": {
                    "pypi_name": "pip",
                    "conda_name": "pip",
                    "import_name": "pip",
                    "mapping_source": "test",
                }
            }
        )
    )
    spec = parse_environment_file(copy, ["linux-64"], mapping_url=str(mapping))
    return spec, spec.dependencies["linux-64"]


def _conda_fields(text: str):
    spec = MatchSpec(text)
    version = str(spec.version) if spec.version is not None else "*"
    if "," in version and "|" not in version:  # a conjunction means the same in any order
        version = ",".join(sorted(version.split(",")))
    return (
        spec.name.normalized,
        spec.channel.name if spec.channel else None,
        "*" if version in ("", "*") else version,
        str(spec.build) if spec.build else None,
    )


@pytest.mark.filterwarnings("ignore:Marker .* contains environment markers:UserWarning")
@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_environment_yml_agrees_with_conda_lock(path, tmp_path):
    ours = read_environment_yml(path)
    theirs_spec, theirs = _conda_lock_deps(path, tmp_path)
    conda = [d for d in theirs if d.manager == "conda"]
    pip = [d for d in theirs if d.manager == "pip"]

    python = [d for d in conda if d.name == "python"]
    if python:
        assert ours.python is not None
        expected = _conda_fields(f"python {python[0].version or '*'} {python[0].build or ''}")
        assert _conda_fields(f"python {ours.python}") == expected
    else:
        assert ours.python is None
    # conda-lock adds "pip" to the conda deps when there is a pip section.
    theirs_conda = {
        _conda_fields(
            f"{(d.conda_channel + '::') if d.conda_channel else ''}{d.name} {d.version or '*'} "
            f"{d.build or ''}".strip()
        )
        for d in conda
        if d.name != "python"
    }
    ours_conda = {_conda_fields(d.spec) for d in ours.conda}
    assert ours_conda | {("pip", None, "*", None)} == theirs_conda | {("pip", None, "*", None)}

    def pip_fields(name, extras, version, markers):
        return (
            canonicalize_name(name),
            tuple(sorted(extras)),
            str(SpecifierSet(version or "")),
            str(markers or ""),
        )

    assert {
        pip_fields(d.name, d.extras, d.version if d.version != "*" else "", d.markers) for d in pip
    } == {pip_fields(d.name, d.extras, d.specifier, d.marker) for d in ours.pypi}
    assert [c.url for c in theirs_spec.channels] == list(ours.channels)


def _independent_requirements(path: Path) -> set[tuple]:
    """An independent reading of requirement lines with packaging (no options, no includes)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: dict[tuple, tuple] = {}
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line or line.startswith("-"):
            continue
        line = re.split(r"\s--hash=", line)[0]
        req = Requirement(line)
        key = (canonicalize_name(req.name), str(req.marker or ""))
        spec = req.specifier
        extras = {canonicalize_name(e) for e in req.extras}
        if key in found:
            spec = spec & SpecifierSet(found[key][2])
            extras |= set(found[key][1])
        found[key] = (key[0], tuple(sorted(extras)), str(spec), key[1], req.url)
    return set(found.values())


@pytest.mark.parametrize("path", REQ_FILES, ids=lambda p: p.name)
def test_requirements_agree_with_packaging(path):
    ours = read_requirements(path)
    if path.name == "includes.txt":
        expected = _independent_requirements(path) | _independent_requirements(
            DATA / "req" / "base.txt"
        )
    else:
        expected = _independent_requirements(path)
    got = {(d.name, d.extras, d.specifier, d.marker, d.url) for d in ours.pypi}
    assert got == expected


def test_requirements_details():
    includes = read_requirements(DATA / "req" / "includes.txt")
    assert [str(c) for c in includes.pypi_constraints] == ["numpy<2", "urllib3<2.3"]
    indexes = read_requirements(DATA / "req" / "indexes.txt")
    assert indexes.index_url == "https://pypi.example.org/simple/"
    # The token reference stays unexpanded: a rotated token must not change the spec.
    assert indexes.extra_index_urls == ("https://${PRIVATE_TOKEN}@private.example.org/simple/",)
    hashed = read_requirements(DATA / "req" / "pip-compile.txt")
    certifi = next(d for d in hashed.pypi if d.name == "certifi")
    assert len(certifi.hashes) == 2 and all(h.startswith("sha256:") for h in certifi.hashes)
    dupes = read_requirements(DATA / "req" / "duplicates.txt")
    assert [str(d) for d in dupes.pypi] == [
        "requests[socks]<3,>=2.28",
        'urllib3<2; python_version < "3.10"',
        'urllib3>=2; python_version >= "3.10"',
    ]
    assert EnvSpec.from_dict(hashed.to_dict()) == hashed


def test_environment_yml_details():
    export = read_environment_yml(DATA / "env" / "export.yml")
    assert export.python == "==3.11.8 hab00c5b_0_cpython"
    assert export.channels == ("conda-forge", "defaults")
    gpu = read_environment_yml(DATA / "env" / "pytorch-gpu.yml")
    assert {d.name: d.channel for d in gpu.conda}["pytorch"] == "pytorch"
    platforms = read_environment_yml(DATA / "env" / "platforms.yml")
    assert platforms.platforms == ("linux-64", "osx-arm64")
    extra = read_environment_yml(DATA / "env" / "pip-extra-index.yml")
    assert extra.extra_index_urls == ("https://download.example.org/whl/cpu/",)
    assert read_environment_yml(DATA / "env" / "datascience.yml").kind == "mixed"


def test_unsupported_environment_lines_are_reported_with_lines():
    path = DATA / "env" / "unsupported-git.yml"
    with pytest.raises(SpecError) as info:
        read_environment_yml(path)
    wheres = [p.where for p in info.value.problems]
    assert wheres == [f"{path}:8", f"{path}:9", f"{path}:10"]
    text = str(info.value)
    assert "VCS" in text and "editable" in text


def test_unsupported_requirement_lines_are_reported_with_lines():
    path = DATA / "req" / "unsupported.txt"
    with pytest.raises(SpecError) as info:
        read_requirements(path)
    assert [p.where for p in info.value.problems] == [f"{path}:{n}" for n in (2, 3, 4, 6)]
    vcs = str(info.value.problems[2])
    assert "VCS requirements are not supported" in vcs and "build a wheel" in vcs


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("channels: conda-forge\ndependencies: [python]\n", "must be a list"),
        ("dependencies:\n  - numpy >>1\n", "numpy >>1"),
        ("dependencies:\n  - numpy\n  - numpy=2\n", "listed twice"),
        ("dependencies: [python]\nsurprise: 1\n", "unknown key"),
        ("dependencies:\n  - pip:\n      - requests >>2\n", "requests >>2"),
        ("dependencies: [\n", "not valid YAML"),
        ("platforms: [linux-32]\ndependencies: [python]\n", "unknown platform"),
    ],
)
def test_bad_environment_files(tmp_path, text, needle):
    path = tmp_path / "environment.yml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(needle)):
        read_environment_yml(path)


def test_requirement_include_cycles_and_missing_files(tmp_path):
    (tmp_path / "a.txt").write_text("-r b.txt\nsix\n")
    (tmp_path / "b.txt").write_text("-r a.txt\n-r missing.txt\n")
    with pytest.raises(SpecError) as info:
        read_requirements(tmp_path / "a.txt")
    text = str(info.value)
    assert "includes itself" in text and "cannot read" in text and "b.txt:2" in text


def test_pyproject(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[project]\nname = "x"\nrequires-python = ">=3.10"\n'
        'dependencies = ["requests>=2", "tomli; python_version<\'3.11\'"]\n'
        '[project.optional-dependencies]\nplot = ["matplotlib>=3.8"]\n'
    )
    spec = read_pyproject(path, extras=("plot",))
    assert spec.python == ">=3.10"
    assert [d.name for d in spec.pypi] == ["matplotlib", "requests", "tomli"]
    assert read_spec_file(path).pypi == read_pyproject(path).pypi
    with pytest.raises(SpecError, match="no such group"):
        read_pyproject(path, extras=("nope",))
