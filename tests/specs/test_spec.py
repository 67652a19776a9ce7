"""EnvSpec: canonical form, spec_id invariants (property tests), round trips, merging."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envmgr.specs.decorators import DecoratorCall, step_specs
from envmgr.specs.deps import CondaDep, PypiDep
from envmgr.specs.model import EnvSpec, combine, merge

CONDA_NAMES = ["numpy", "pandas", "scipy", "python-dateutil", "libblas", "pytorch"]
CONDA_VERSIONS = ["", "1.26", "1.26.*", ">=1.26,<2", "<2,>=1.26", ">=1.2", "!=1.3", "2.2.*"]
PYPI_NAMES = ["requests", "python-dateutil", "ruamel.yaml", "zope.interface", "typing_extensions"]
PYPI_VERSIONS = ["", ">=2.31", "==2.3.1", ">=1.0,<2", "<2,>=1.0", "~=1.4", "!=1.5,>=1"]
CHANNELS = ["conda-forge", "pytorch", "nvidia/label/cuda-12.1", "https://repo.example/ch"]
INDEXES = ["https://pypi.example/simple/", "https://mirror.example/simple/"]
PLATFORMS = ["linux-64", "osx-arm64", "linux-aarch64"]


def _spell_pep503(name: str, style: int) -> str:
    """Other spellings of the same PyPI name (PEP 503 normalises them all)."""
    swapped = name.replace("-", "_") if style % 2 else name.replace("_", "-").replace(".", "-")
    return swapped.upper() if style >= 2 else swapped


def _spell_spaces(spec: str) -> str:
    return spec.replace(",", " , ").replace(">=", ">= ").replace("<", "< ")


@st.composite
def decorator_specs(draw):
    conda = draw(
        st.dictionaries(st.sampled_from(CONDA_NAMES), st.sampled_from(CONDA_VERSIONS), max_size=4)
    )
    pypi = draw(
        st.dictionaries(st.sampled_from(PYPI_NAMES), st.sampled_from(PYPI_VERSIONS), max_size=4)
    )
    channels = draw(st.lists(st.sampled_from(CHANNELS), unique=True, max_size=3))
    extra = draw(st.lists(st.sampled_from(INDEXES), unique=True, max_size=2))
    platforms = draw(st.lists(st.sampled_from(PLATFORMS), unique=True, max_size=3))
    python = draw(st.sampled_from([None, "3.11", "3.10", "3.11.7", ">=3.10,<3.13"]))
    return {
        "conda": conda,
        "pypi": pypi,
        "channels": channels,
        "extra": extra,
        "platforms": platforms,
        "python": python,
    }


def _build(d, *, respell: int = 0, reverse: bool = False) -> EnvSpec:
    def order(items):
        items = list(items)
        return items[::-1] if reverse else items

    conda = {
        (n.upper() if respell else n): (_spell_spaces(v) if respell else v)
        for n, v in order(d["conda"].items())
    }
    pypi = {
        (_spell_pep503(n, respell) if respell else n): (_spell_spaces(v) if respell else v)
        for n, v in order(d["pypi"].items())
    }
    calls = [
        DecoratorCall(
            kind="conda",
            kwargs={"libraries": conda, "channels": d["channels"], "python": d["python"]},
        ),
        DecoratorCall(
            kind="pypi",
            kwargs={
                "packages": pypi,
                "extra_index_urls": d["extra"],
                "platforms": order(d["platforms"]),
            },
        ),
    ]
    return step_specs([], {"s": order(calls)})["s"]


@settings(max_examples=60, deadline=None)
@given(decorator_specs(), st.integers(min_value=1, max_value=3))
def test_spec_id_ignores_order_whitespace_and_name_spelling(d, respell):
    plain = _build(d)
    assert _build(d, respell=respell, reverse=True).spec_id == plain.spec_id
    assert _build(d, respell=respell, reverse=True) == plain


@settings(max_examples=60, deadline=None)
@given(decorator_specs())
def test_round_trip_through_plain_data(d):
    spec = _build(d)
    again = EnvSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.spec_id == spec.spec_id


@settings(max_examples=60, deadline=None)
@given(decorator_specs(), st.data())
def test_spec_id_changes_with_any_dependency_channel_index_or_platform(d, data):
    spec = _build(d)
    change = data.draw(
        st.sampled_from(
            [
                "add-conda",
                "conda-version",
                "add-pypi",
                "pypi-version",
                "channel",
                "index",
                "platform",
                "python",
            ]
        )
    )
    e = json.loads(json.dumps(d))
    if change == "add-conda":
        e["conda"]["brand-new-lib"] = ""
    elif change == "conda-version":
        name = data.draw(st.sampled_from([*e["conda"], "numpy"]))
        e["conda"][name] = "9.9.9" if e["conda"].get(name) != "9.9.9" else "9.9.8"
    elif change == "add-pypi":
        e["pypi"]["brand-new-dist"] = ">=1"
    elif change == "pypi-version":
        name = data.draw(st.sampled_from([*e["pypi"], "requests"]))
        e["pypi"][name] = "==9.9.9" if e["pypi"].get(name) != "==9.9.9" else "==9.9.8"
    elif change == "channel":
        e["channels"] = [*e["channels"], "bioconda"]
    elif change == "index":
        e["extra"] = [*e["extra"], "https://other.example/simple/"]
    elif change == "platform":
        e["platforms"] = [*e["platforms"], "win-64"]
    else:
        e["python"] = "3.9" if e["python"] != "3.9" else "3.8"
    assert _build(e).spec_id != spec.spec_id


def test_channel_order_is_priority_and_counts():
    a = EnvSpec(channels=("conda-forge", "pytorch"))
    b = EnvSpec(channels=("pytorch", "conda-forge"))
    assert a.spec_id != b.spec_id


def test_equivalent_pypi_spellings_normalise():
    a = PypiDep.parse("Foo_Bar[Socks, Security] >= 1.0 , < 2 ; python_version<'3.11'")
    b = PypiDep.parse('foo-bar[security,socks]<2,>=1.0; python_version < "3.11"')
    assert a == b and str(a) == 'foo-bar[security,socks]<2,>=1.0; python_version < "3.11"'


def test_equivalent_conda_spellings_normalise():
    assert CondaDep.parse("NumPy >= 1.2 , <2") == CondaDep.parse("numpy <2,>=1.2")
    assert CondaDep.parse("numpy=1.26") == CondaDep.parse("numpy 1.26.*")
    assert CondaDep.parse("pytorch::pytorch 2.3").channel == "pytorch"


def test_python_versions_follow_what_users_mean():
    spec = step_specs([], {"s": [DecoratorCall(kind="conda", kwargs={"python": "3.11"})]})["s"]
    assert spec.python == "3.11.*"
    exact = step_specs([], {"s": [DecoratorCall(kind="conda", kwargs={"python": "3.11.7"})]})
    assert exact["s"].python == "==3.11.7"


def test_disabled_none_and_false_share_an_id():
    assert EnvSpec(disabled=None).spec_id == EnvSpec(disabled=False).spec_id
    assert EnvSpec(disabled=True).spec_id != EnvSpec(disabled=False).spec_id


def test_metaflow_version_meaning():
    calls = [
        DecoratorCall(
            kind="conda",
            kwargs={"libraries": {"pandas": "2.2", "numpy": "1.26.*", "scipy": ">=1.11"}},
        ),
        DecoratorCall(
            kind="pypi",
            kwargs={
                "packages": {"torch": "2.3.1", "rich": ">=13", "tomli": "; python_version<'3.11'"}
            },
        ),
    ]
    spec = step_specs([], {"s": calls})["s"]
    assert [str(d) for d in spec.conda] == ["numpy 1.26.*", "pandas ==2.2", "scipy >=1.11"]
    assert [str(d) for d in spec.pypi] == [
        "rich>=13",
        'tomli; python_version < "3.11"',
        "torch==2.3.1",
    ]
    assert spec.kind == "mixed"


def test_merge_step_wins_per_package_python_and_disabled():
    base = EnvSpec(
        python="3.10.*",
        conda=(CondaDep.parse("numpy 1.26.*"), CondaDep.parse("pandas")),
        pypi=(PypiDep.parse("requests>=2"), PypiDep.parse("tomli; python_version<'3.11'")),
        channels=("conda-forge",),
        disabled=True,
        system=(("__glibc", "2.28"),),
    )
    step = EnvSpec(
        python="3.11.*",
        conda=(CondaDep.parse("numpy 2.*"),),
        pypi=(PypiDep.parse("tomli>=2"),),
        channels=("pytorch", "conda-forge"),
        disabled=False,
        system=(("__cuda", "12.1"),),
    )
    merged = merge(base, step)
    assert merged.python == "3.11.*" and merged.disabled is False
    assert [str(d) for d in merged.conda] == ["numpy 2.*", "pandas"]
    assert [str(d) for d in merged.pypi] == ["requests>=2", "tomli>=2"]
    assert merged.channels == ("pytorch", "conda-forge")
    assert dict(merged.system) == {"__glibc": "2.28", "__cuda": "12.1"}
    assert merge(base, EnvSpec()).disabled is True and merge(base, EnvSpec()).python == "3.10.*"


def test_combine_refuses_disagreeing_python():
    with pytest.raises(Exception, match="python") as info:
        combine(EnvSpec(python="3.11.*"), EnvSpec(python="3.10.*"), where="step 'x'")
    assert "step 'x'" in str(info.value)
