"""Bad decorator input: each case raises SpecError naming the step and the key; all at once."""

from __future__ import annotations

import pytest

from envmgr.errors import EnvmgrError, SpecError
from envmgr.specs.decorators import DecoratorCall, step_specs
from envmgr.specs.model import EnvSpec

C, P, CB = "conda", "pypi", "conda_base"

# (id, decorator kind, kwargs, text the message must contain besides step and key)
BAD = [
    ("bad-version-op", C, {"libraries": {"numpy": ">>1"}}, "libraries['numpy']"),
    ("bad-version-garbage", C, {"packages": {"numpy": ">=1.2,,<"}}, "packages['numpy']"),
    ("empty-name", C, {"packages": {"": "1.0"}}, "packages['']"),
    ("name-with-space", C, {"packages": {"num py": "1.0"}}, "packages['num py']"),
    ("empty-channel", C, {"packages": {"::numpy": "1.0"}}, "empty channel"),
    ("double-channel", C, {"packages": {"a::b::numpy": ""}}, "more than one '::'"),
    ("channel-with-space", C, {"packages": {"conda forge::numpy": ""}}, "not a channel name"),
    ("libraries-not-dict", C, {"libraries": ["numpy"]}, "libraries"),
    ("version-not-string", C, {"libraries": {"numpy": 2}}, "version must be a string"),
    ("name-and-packages", C, {"name": "team/env", "packages": {"numpy": "2"}}, "drop packages"),
    ("name-bad", P, {"name": "Team Env"}, "not an env name"),
    ("name-not-string", C, {"name": 3}, "must be a string"),
    ("python-bad", C, {"python": "3..11"}, "python"),
    ("python-float", C, {"python": 3.11}, "quote it"),
    ("disabled-string", C, {"disabled": "yes"}, "disabled"),
    ("unknown-kwarg", C, {"librairies": {"numpy": ""}}, "unknown argument"),
    ("pypi-bad-specifier", P, {"packages": {"requests": ">>1"}}, "packages['requests']"),
    ("pypi-bad-name", P, {"packages": {"requests[socks": ">=2"}}, "packages['requests[socks']"),
    ("pypi-bad-marker", P, {"packages": {"tomli": "; python_versio >= '3'"}}, "packages['tomli']"),
    ("pypi-version-not-string", P, {"packages": {"requests": 2.31}}, "must be a string"),
    (
        "pypi-version-in-key-and-value",
        P,
        {"packages": {"requests>=2": ">=3"}},
        "already a requirement",
    ),
    (
        "pypi-vcs-url",
        P,
        {"packages": {"mylib": "@ git+https://example.org/mylib.git"}},
        "VCS requirements are not supported",
    ),
    (
        "pypi-local-url",
        P,
        {"packages": {"mylib": "@ file:relative/mylib.whl"}},
        "an absolute file:///path of a wheel or sdist",
    ),
    ("channels-not-list", C, {"channels": "conda-forge"}, "list of strings"),
    ("channel-bad-url", C, {"channels": ["ftp://mirror/conda"]}, "channels[0]"),
    ("system-bad-name", C, {"system_packages": {"cuda": "12.1"}}, "virtual package name"),
    ("system-bad-version", C, {"system_packages": {"__cuda": "twelve"}}, "__cuda"),
    ("platform-unknown", P, {"platforms": ["linux-32"]}, "unknown platform"),
    ("index-url-scheme", P, {"index_url": "ftp://pypi.example/simple"}, "index_url"),
    ("index-url-type", P, {"index_url": ["https://x/simple"]}, "must be a URL string"),
    ("same-name-twice-by-case", C, {"packages": {"NumPy": "1.26", "numpy": "2.0"}}, "same package"),
    ("python-as-package", C, {"packages": {"python": "3.11"}}, "python="),
    ("channels-on-pypi", P, {"channels": ["conda-forge"]}, "unknown argument"),
]


@pytest.mark.parametrize(
    ("kind", "kwargs", "needle"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_input_names_step_key_and_problem(kind, kwargs, needle):
    with pytest.raises(SpecError) as info:
        step_specs([], {"train": [DecoratorCall(kind=kind, kwargs=kwargs)]})
    assert isinstance(info.value, EnvmgrError) and info.value.exit_code == 2
    message = str(info.value)
    assert "step 'train'" in message and f"@{kind}" in message
    assert needle in message, message
    for problem in info.value.problems:
        assert problem.where == "step 'train'" and problem.key.startswith(f"@{kind}")


def test_every_problem_of_an_input_is_in_one_exception():
    bad_conda = DecoratorCall(
        kind=C, kwargs={"libraries": {"numpy": ">>1", "": "1"}, "python": 3, "disabled": "no"}
    )
    bad_pypi = DecoratorCall(kind=P, kwargs={"packages": {"requests": ">>2"}, "bogus": 1})
    bad_base = DecoratorCall(kind=CB, kwargs={"channels": "conda-forge"})
    with pytest.raises(SpecError) as info:
        step_specs([bad_base], {"a": [bad_conda], "b": [bad_pypi]}, flow="MyFlow")
    where = [(p.where, p.key.split(" ")[0]) for p in info.value.problems]
    assert where.count(("step 'a'", "@conda")) == 4
    assert where.count(("step 'b'", "@pypi")) == 2
    assert where.count(("flow 'MyFlow'", "@conda_base")) == 1
    assert str(info.value).startswith("7 problems in environment specs:")


def test_decorators_at_the_wrong_level_and_twice():
    with pytest.raises(SpecError) as info:
        step_specs(
            [DecoratorCall(kind=C, kwargs={})],
            {
                "a": [
                    DecoratorCall(kind=CB, kwargs={}),
                    DecoratorCall(kind=P, kwargs={}),
                    DecoratorCall(kind=P, kwargs={}),
                ]
            },
        )
    text = str(info.value)
    assert "use @conda_base on a flow class" in text
    assert "use @conda on a step" in text and "given twice" in text


def test_packages_win_over_libraries_as_in_metaflow():
    """``libraries`` is Metaflow's old name: on a clash ``packages`` wins, without an error."""
    specs = step_specs(
        [],
        {"a": [DecoratorCall(kind="conda", kwargs={"libraries": {"numpy": "1.26", "six": ""},
                                                    "packages": {"numpy": "2.0"}})]},
    )  # fmt: skip
    assert [str(d) for d in specs["a"].conda] == ["numpy ==2.0", "six"]


def test_a_name_on_a_flow_is_refused():
    with pytest.raises(SpecError, match="a named env is for one step"):
        step_specs([DecoratorCall(kind="conda_base", kwargs={"name": "team/env"})], {"a": []})


def test_step_conda_and_pypi_disagreeing_on_python():
    with pytest.raises(SpecError, match=r"step 'a': python: @conda says '3.11.\*'"):
        step_specs(
            [],
            {
                "a": [
                    DecoratorCall(kind=C, kwargs={"python": "3.11"}),
                    DecoratorCall(kind=P, kwargs={"python": "3.10"}),
                ]
            },
        )


@pytest.mark.parametrize(
    "data",
    [
        {"format": 2},
        {"format": 1, "conda": "numpy"},
        {"format": 1, "conda": ["numpy >>1"]},
        {"format": 1, "pypi": ["requests>=2 --hash=md5:abc"]},
        {"format": 1, "platforms": ["linux-32"]},
        {"format": 1, "disabled": "yes"},
        {"format": 1, "surprise": True},
    ],
)
def test_from_dict_rejects_bad_data(data):
    with pytest.raises(SpecError):
        EnvSpec.from_dict(data)
