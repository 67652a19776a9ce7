"""The bad inputs outside checks found, each answered with one line and the right exit code."""

from __future__ import annotations

import json
import os
import re

import pytest
from _helpers import envmgr_here, run_envmgr

from envmgr.cli.app import commands
from envmgr.cli.store import STORE_COMMANDS


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--conda", "numpy=2.1", "--conda", "numpy<2"],
            "envmgr: error: invalid environment spec: command line: --conda 'numpy<2': numpy "
            "is already given as --conda 'numpy=2.1'; give one spec per package (e.g. --conda "
            "'numpy >=1.2,<2')",
        ),
        (
            ["--conda", "numpy", "--cuda", "abc"],
            "envmgr: error: --cuda 'abc': not a CUDA version; give digits and dots "
            "(--cuda 12.4), host or none",
        ),
        (
            ["--conda", "numpy", "--python", "py311"],
            "envmgr: error: invalid environment spec: command line: --python: bad python "
            "version 'py311': 'py311' is not a version (a version starts with a digit, e.g. "
            "3.11 or >=3.10,<3.13)",
        ),
        (
            ["--pypi", "requests>=2.31", "--python", "3.11", "--conda", "python=3.10"],
            "envmgr: error: invalid environment spec: command line: python: two different "
            "pythons: --python 3.11 and --conda 'python=3.10'; give one",
        ),
        (
            ["--conda", "numpy", "-p", "linux-63"],
            "envmgr: error: --platform 'linux-63': unknown platform; known: linux-64, "
            "linux-aarch64, osx-64, osx-arm64, win-64",
        ),
    ],
)
def test_bad_spec_flags_are_one_line_and_exit_2(world, args, line):
    result = envmgr_here("resolve", *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


def test_the_same_conda_spec_twice_is_fine(world):
    result = envmgr_here("resolve", "--conda", "tabulate", "--conda", "tabulate", "-p", "linux-64")
    assert result.returncode == 0, result.stderr


def test_help_is_in_the_usual_style():
    """No typer type labels (<bool>, <list[Path]>) and no {target} in any command's help."""
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    every = [[name] for name, _f, _e in commands()] + [
        ["store", name] for name, _f, _e in STORE_COMMANDS
    ]
    for command in [[], *every, ["config", "show"]]:
        text = envmgr_here(*command, "--help", env=env).stdout
        assert "Usage: envmgr" in text, command
        for label in ("<bool>", "<str>", "<path>", "<list[", "<int>", "{"):
            assert label not in text, (command, label)
    run = envmgr_here("run", "--help", env=env).stdout
    assert "Usage: envmgr run [OPTIONS] [TARGET] [COMMAND...]" in run
    resolve = envmgr_here("resolve", "--help", env=env).stdout
    assert re.search(r"--platform\s+-p\s+PLATFORM\s", resolve)
    assert re.search(r"--locked\s+Fail if a lock would change", resolve)


def test_a_hex_target_that_is_neither_an_id_prefix_nor_a_name(world):
    for command in (("show", "0000000000"), ("run", "0000000000", "--", "true")):
        result = run_envmgr(*command)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"envmgr: error: no env id starts with 0000000000 in {world['ENVMGR_STORE']} "
            "(`envmgr store ls` lists the stored envs)"
        ]


def test_spec_files_where_a_flow_goes_are_read_as_specs(world, tmp_path):
    """`resolve environment.yml` said "not valid Python: invalid syntax" (read as a flow)."""
    (tmp_path / "environment.yml").write_text("dependencies:\n  - python=3.11\n  - tabulate\n")
    (tmp_path / "requirements.txt").write_text("six\n")
    (tmp_path / "deps").write_text("# no suffix, requirement lines\nsix\n")
    for name in ("environment.yml", "requirements.txt", "deps"):
        args = (
            ("resolve", name, "--python", "3.11")
            if name != "environment.yml"
            else ("resolve", name)
        )
        result = envmgr_here(*args, env=world, cwd=tmp_path)
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.startswith(name.split("/")[-1]), result.stdout
    flow = tmp_path / "flow.py"
    flow.write_text(
        "from metaflow import FlowSpec, step\n\nclass F(FlowSpec):\n    @step\n"
        "    def start(self):\n        self.next(self.train)\n\n    @step\n"
        "    def train(self):\n        self.next(self.end)\n\n    @step\n"
        "    def end(self):\n        pass\n"
    )
    result = envmgr_here("run", "flow.py", "--", "python", "-V", env=world, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "envmgr: error: flow.py is a flow file: name one of its steps, e.g. flow.py:start "
        "(its steps: start, train, end)"
    ]


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        (
            "uv.lock",
            'version = 1\n[[package]\nname = "six"\n',
            "a uv.lock with a TOML syntax error: ",
        ),
        (
            "pixi.lock",
            "version: 6\nenvironments:\n  default: [\n",
            "a pixi.lock with a YAML syntax error at line ",
        ),
        ("pylock.toml", 'lock-version = "1.0\n', "a pylock.toml with a TOML syntax error: "),
    ],
)
def test_a_malformed_lock_of_a_known_tool_names_the_tool_and_the_line(
    world, tmp_path, name, text, line
):
    path = tmp_path / name
    path.write_text(text)
    result = envmgr_here("resolve", "--lockfile", str(path), env=world, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"{path}: {line}" in lines[0], lines
    assert "line" in lines[0] and "unknown format" not in lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["resolve", "--conda", "numpy", "--platform", "linux64", "--json"],
        ["store", "gc", "--older-than", "30x", "--json"],
        ["resolve", "--conda", "numpy", "--cuda", "abc", "--json"],
        ["resolve", "--bogus", "--json"],
        ["--bogus", "names", "--json"],
    ],
)
def test_json_failures_from_option_parsing_are_json_too(world, args):
    """The README promises {"error": ...} on stdout for any failure under --json."""
    result = envmgr_here(*args, env=world)
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "UsageError" and error["exit_code"] == 2 and error["message"]
    assert error["message"].split(":")[0] in result.stderr or "No such option" in result.stderr


def test_output_paths_that_cannot_be_written_are_named(world, tmp_path):
    """export -o EXISTING_DIR named a temp file and pointed at the cache settings."""
    lock = tmp_path / "env.lock.yml"
    made = envmgr_here("resolve", "--conda", "tabulate", "--python", "3.11", "-o", str(lock),
                       env=world, cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    (tmp_path / "a-file").write_text("")
    cases = {
        str(tmp_path): f"-o {tmp_path}: is a directory; give a file path",
        str(tmp_path / "a-file" / "x.txt"): f"{tmp_path / 'a-file'} is a file, not a directory",
    }
    for output, needle in cases.items():
        for command in (
            ("export", str(lock)),
            ("resolve", "--conda", "tabulate", "--python", "3.11"),
        ):
            result = envmgr_here(*command, "-o", output, env=world, cwd=tmp_path)
            assert result.returncode != 0, (command, output)
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and needle in lines[0], lines
            assert "cache" not in lines[0] and ".tmp" not in lines[0]


def test_quiet_and_verbose_after_the_command_count_as_before_it(world, tmp_path):
    """uv takes -q/-v after the subcommand; envmgr said "No such option: -q"."""
    args = ("resolve", "--conda", "tabulate", "--python", "3.11")
    loud = envmgr_here(*args, env=world, cwd=tmp_path)
    quiet = envmgr_here(*args, "-q", env=world, cwd=tmp_path)
    assert loud.returncode == quiet.returncode == 0, quiet.stderr
    assert loud.stdout and quiet.stdout == ""
    from envmgr.cli._help import _globals_first

    assert _globals_first(["show", "x", "-q"]) == ["-q", "show", "x"]
    assert _globals_first(["store", "gc", "-v", "--older-than", "1d"]) == [
        "-v",
        "store",
        "gc",
        "--older-than",
        "1d",
    ]
    # Never inside run's command or after --.
    assert _globals_first(["run", "t", "python", "-v"]) == ["run", "t", "python", "-v"]
    assert _globals_first(["run", "-q", "t", "--", "x", "-q"]) == [
        "-q",
        "run",
        "t",
        "--",
        "x",
        "-q",
    ]
    assert _globals_first(["export", "--", "-q"]) == ["export", "--", "-q"]


def test_an_env_cache_that_is_a_file_is_a_wrong_setting_not_an_empty_cache(tmp_path):
    """`ls`, `verify` and `gc` printed nothing (or "0 package layers checked") and exited 0
    when the cache dir was a file; each setting it can come from is named with its fix."""
    a_file = tmp_path / "envmgr"
    a_file.write_text("")
    config = tmp_path / "config.toml"
    config.write_text(f'cache_dir = "{a_file}"\n')
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ENVMGR_", "XDG_"))}
    sources = {
        "ENVMGR_CACHE_DIR": ({"ENVMGR_CACHE_DIR": str(a_file)}, "point ENVMGR_CACHE_DIR at a"),
        str(config): ({"ENVMGR_CONFIG": str(config)}, f"set cache_dir in {config} to a"),
        "default": (
            {"XDG_CACHE_HOME": str(tmp_path)},
            "move that file away, or set ENVMGR_CACHE_DIR to a",
        ),
    }
    for source, (extra, fix) in sources.items():
        env = {**base, "ENVMGR_CONFIG": str(tmp_path / "none.toml"), **extra}
        for args in (["ls"], ["verify"], ["verify", "--fix"], ["gc", "--older-than", "1d"]):
            result = envmgr_here(*args, env=env)
            assert result.returncode == 1, (source, args, result.stdout)
            assert result.stderr.splitlines() == [
                f"envmgr: error: the env cache {a_file} (from {source}) is not a directory "
                f"({fix} directory)"
            ], (source, args)
        assert a_file.read_text() == ""
    missing = {**base, "ENVMGR_CACHE_DIR": str(tmp_path / "not-yet")}
    assert envmgr_here("ls", env=missing).returncode == 0  # a cache not made yet is empty
