"""Every command, in-process (typer's runner) and as users run it (a child process); the
``--json`` outputs checked against the shapes the README documents."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from _helpers import envmgr_here, run_envmgr
from _shapes import documented_shapes, shaped
from typer.testing import CliRunner

from envmgr.cache.local import LocalStore
from envmgr.cli.app import app, commands
from envmgr.cli.store import STORE_COMMANDS
from envmgr.config import load
from envmgr.errors import EnvmgrError

SHAPES = documented_shapes()


def sub(*args: str, env: dict[str, str] | None = None) -> Any:
    """The command in a child process, in the current directory."""
    return run_envmgr(*args, env=env, cwd=Path.cwd())


def invoke(*args: str) -> Any:
    """The command in this process; an ``EnvmgrError`` comes back as ``result.exception``."""
    return CliRunner().invoke(app, list(args))


def test_the_readme_documents_a_shape_for_every_json_command():
    every = [*commands(), *((f"store {name}", f, e) for name, f, e in STORE_COMMANDS)]
    with_json = {name for name, function, _ in every if "as_json" in function.__code__.co_varnames}
    assert with_json | {"config show"} == set(SHAPES)


def test_every_help_ends_with_an_example_and_completion_is_offered(world):
    for name, _function, example in commands():
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "Example:" in result.stdout, name
        assert example.startswith(f"envmgr {name} ")
    assert "Example:" in invoke("config", "show", "--help").stdout
    for name, _function, example in STORE_COMMANDS:
        assert "Example:" in invoke("store", name, "--help").stdout
        assert example.startswith(f"envmgr store {name} ")
    top = sub("--help", env=world)
    assert top.returncode == 0 and "Example:" in top.stdout and "--install-completion" in top.stdout
    # What the installed completion script asks: the candidates for the word being typed.
    words = {"_ENVMGR_COMPLETE": "complete_bash", "COMP_WORDS": "envmgr export x --for"}
    completed = sub(env={**world, **words, "COMP_CWORD": "3"})
    assert completed.returncode == 0 and completed.stdout.split() == ["--format"]
    assert sub(
        env={**world, **words, "COMP_WORDS": "envmgr sh", "COMP_CWORD": "1"}
    ).stdout.split() == ["show"]


def test_resolve_build_hydrate_ls_gc_json(world):
    spec = ("--conda", "numpy>=2", "--python", "3.11", "--pypi", "colorama")
    resolved = shaped("resolve", sub("resolve", *spec, "--json", env=world).stdout)
    env_id = resolved["envs"][0]["env_id"]
    assert resolved["envs"][0]["cached"] is False
    again = shaped("resolve", invoke("resolve", *spec, "--json").stdout)
    assert again["envs"][0] == {**resolved["envs"][0], "cached": True, "seconds": ANY_FLOAT}
    built = shaped("build", invoke("build", *spec, "--json").stdout)
    assert built["envs"][0]["status"] == "built" and built["envs"][0]["lock_cached"] is True
    # Its package layers, all new here: what it uploaded is what a host downloads.
    row = built["envs"][0]
    assert row["layers_built"] == row["layers"] >= 3 and row["uploaded"] == row["size"] > 1e6
    hydrated = shaped("hydrate", sub("hydrate", env_id, "--json", env=world).stdout)
    assert hydrated["downloaded"] is True and Path(hydrated["python"]).is_file()
    assert shaped("hydrate", invoke("hydrate", env_id, "--json").stdout)["downloaded"] is False
    listed = shaped("ls", invoke("ls", "--json").stdout)
    assert [e["env_id"] for e in listed["envs"]] == [env_id]
    # Its files are nearly all links into its layers; the table adds the two.
    [mine] = listed["envs"]
    assert mine["layers"] == row["layers"] == listed["layers"]["count"]
    assert mine["layers_size"] == listed["layers"]["size"] > 20 * mine["size"]
    table = invoke("ls").stdout
    assert f"{(mine['size'] + mine['layers_size']) / 1e6:.1f} MB" in table, table
    assert f"in {row['layers']} package layers they share" in table, table
    assert shaped("ls", sub("ls", "--json", env=world).stdout) == listed
    dry = shaped("gc", sub("gc", "--max-size", "1K", "--dry-run", "--json", env=world).stdout)
    assert dry["removed"] == [env_id] and len(dry["removed_layers"]) == mine["layers"]
    assert dry["freed"] == mine["size"] + mine["layers_size"]  # what the dry run would free
    told = sub("gc", "--max-size", "1K", "--dry-run", env=world).stdout
    assert f"would remove {mine['layers']} package layers no env would link to" in told, told
    assert shaped("gc", invoke("gc", "--older-than", "1d", "--json").stdout)["removed"] == []


class _AnyFloat:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, float)


ANY_FLOAT = _AnyFloat()


def _env_id(result: Any) -> str:
    text = result.stdout
    assert getattr(result, "returncode", getattr(result, "exit_code", None)) == 0, (
        text + str(getattr(result, "stderr", "")) + repr(getattr(result, "exception", ""))
    )
    return str(json.loads(text)["envs"][0]["env_id"])


@pytest.mark.parametrize("fmt", ["conda-lock", "explicit"])
def test_export_then_adopt_gives_the_same_env(world, tmp_path, fmt):
    lock = tmp_path / "env.lock.yml"
    first = invoke("resolve", "--conda", "numpy", "--python", "3.11", "--pypi", "colorama",
                   "-o", str(lock), "--json")  # fmt: skip
    env_id = _env_id(first)
    out = tmp_path / f"exported.{fmt}"
    exported = sub("export", str(lock), "--format", fmt, "-o", str(out), env=world)
    assert exported.returncode == 0, exported.stderr
    adopted = sub("resolve", "--lockfile", str(out), "--json", env=world)
    assert _env_id(adopted) == env_id
    assert shaped("resolve", adopted.stdout)["envs"][0]["adopted"] is True
    assert _env_id(invoke("resolve", "-f", str(out), "--json")) == env_id  # -f takes it too
    # Adopting stores the lock beside the env, so a worker can build it from the env id.
    python = sub("hydrate", env_id, env={**world, "ENVMGR_CACHE_DIR": str(tmp_path / "w")})
    assert python.returncode == 0, python.stderr


def test_requirements_and_environment_yml_round_trip(world, tmp_path):
    spec = ("--pypi", "requests>=2.31", "--pypi", "six", "--python", "3.11")
    env_id = _env_id(invoke("resolve", *spec, "--json"))
    lock = tmp_path / "l.yml"
    assert invoke("resolve", *spec, "-o", str(lock)).exit_code == 0
    requirements = invoke("export", str(lock), "--format", "requirements.txt").stdout
    assert re.search(r"^requests==2\.32\.3 \\\n    --hash=sha256:[0-9a-f]{64}$", requirements, re.M)
    (tmp_path / "requirements.txt").write_text(requirements)
    back = sub("resolve", "-r", "requirements.txt", "--python", "3.11", "--json", env=world)
    assert _env_id(back) == env_id
    exported = sub("export", str(lock), "-F", "environment.yml", "-o", "environment.yml",
                          env=world)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert _env_id(invoke("resolve", "-f", "environment.yml", "--json")) == env_id


def test_a_requirement_hash_that_matches_nothing_fails(world, tmp_path):
    (tmp_path / "r.txt").write_text("six==1.17.0 --hash=sha256:" + "0" * 64 + "\n")
    result = sub("resolve", "-r", "r.txt", "--python", "3.11", env=world)
    assert result.returncode != 0 and "six" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_explicit_file_with_a_wrong_hash_is_refused(world, tmp_path):
    lock = tmp_path / "l.yml"
    assert invoke("resolve", "--conda", "numpy", "--python", "3.11", "-o", str(lock)).exit_code == 0
    text = invoke("export", str(lock), "--format", "explicit").stdout
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "/numpy-" in t)
    tampered = re.sub(r"(numpy-[^#]+#)[0-9a-f]{32}", r"\g<1>" + "0" * 32, text)
    (tmp_path / "bad.txt").write_text(tampered)
    result = sub("resolve", "--lockfile", "bad.txt", env=world)
    assert result.returncode == 1
    assert f"bad.txt:{line}: numpy 2.1.3: the file's hash does not match" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_adopting_a_lock_for_a_spec_makes_it_the_cached_lock(world, tmp_path):
    (tmp_path / "environment.yml").write_text(
        "dependencies:\n  - python=3.11\n  - numpy>=2\n  - pip:\n      - colorama\n"
    )
    lock = tmp_path / "team.lock.yml"
    assert invoke("resolve", "--conda", "numpy", "--conda", "python=3.11", "--pypi", "colorama",
                  "-o", str(lock)).exit_code == 0  # fmt: skip
    adopted = invoke("resolve", "-f", "environment.yml", "--lockfile", str(lock), "--json")
    env_id = _env_id(adopted)
    built = shaped("build", sub("build", "-f", "environment.yml", "--json", env=world).stdout)
    assert built["envs"][0]["env_id"] == env_id and built["envs"][0]["lock_cached"] is True
    # A lock that does not satisfy the spec is refused, naming what is missing.
    other = tmp_path / "other.lock.yml"
    assert (
        invoke("resolve", "--conda", "numpy", "--python", "3.11", "-o", str(other)).exit_code == 0
    )
    refused = sub("resolve", "-f", "environment.yml", "--lockfile", str(other), env=world)
    assert refused.returncode == 1 and "does not satisfy pip, colorama (linux-64)" in refused.stderr


def test_show_and_diff(world, tmp_path):
    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    assert invoke("resolve", "--conda", "numpy", "--python", "3.11", "-o", str(a)).exit_code == 0
    assert invoke("resolve", "--conda", "numpy", "--python", "3.11", "--pypi", "tabulate==0.8.10",
                  "-o", str(b)).exit_code == 0  # fmt: skip
    shown = shaped("show", sub("show", str(b), "--json", env=world).stdout)
    part = shown["platforms"][0]
    assert shown["kind"] == "lock file" and part["archive"] is None and part["python"] == "3.11.7"
    assert {"tabulate", "numpy", "python", "pip"} <= {p["name"] for p in part["packages"]}
    assert invoke("build", "--from-lock", str(b)).exit_code == 0
    built = shaped("show", invoke("show", part["env_id"], "--json").stdout)
    assert built["kind"] == "env id" and built["platforms"][0]["archive"]["size"] > 0
    text = invoke("show", str(b)).stdout
    assert "archive" in text and "tabulate" in text
    diff = sub("diff", str(a), str(b), "--json", env=world)
    data = shaped("diff", diff.stdout)
    assert diff.returncode == 1 and data["same"] is False
    added = {p["name"] for p in data["platforms"][0]["added"]}
    assert added == {"tabulate", "pip"}
    same = invoke("diff", str(b), part["env_id"])
    assert same.exit_code == 0 and "(same packages)" in same.stdout


def test_aliases(world, tmp_path):
    lock, other = tmp_path / "l.yml", tmp_path / "o.yml"
    assert invoke("resolve", "--conda", "numpy", "--python", "3.11", "-o", str(lock)).exit_code == 0
    assert invoke("resolve", "--pypi", "six", "--python", "3.11", "-o", str(other)).exit_code == 0
    made = shaped("alias", sub("alias", str(lock), "team/np:v1", "--json", env=world).stdout)
    env_id = made["envs"]["linux-64"]
    assert made["changed"] is True and made["tag"] == "v1"
    assert (
        shaped("alias", invoke("alias", str(lock), "team/np:v1", "--json").stdout)["changed"]
        is False
    )
    moved = sub("alias", str(other), "team/np:v1", env=world)
    assert moved.returncode == 1 and "tag 'v1' is immutable" in moved.stderr
    assert len(moved.stderr.strip().splitlines()) == 1
    assert invoke("alias", str(lock), "team/np").exit_code == 0  # latest
    assert invoke("alias", str(other), "team/np").exit_code == 0  # latest moves
    names = shaped("names", invoke("names", "--json").stdout)
    assert [(n["name"], n["tag"]) for n in names["names"]] == [
        ("team/np", "latest"),
        ("team/np", "v1"),
    ]
    assert shaped("names", sub("names", "team/np", "--json", env=world).stdout) == names
    # A name works wherever an env id does: hydrate (building from the stored lock), run, show.
    hydrated = json.loads(sub("hydrate", "team/np:v1", "--json", env=world).stdout)
    assert hydrated["env_id"] == env_id
    ran = sub("run", "team/np:v1", "--", "python", "-c", "import numpy; print(numpy.__version__)",
                     env=world)  # fmt: skip
    assert ran.stdout.strip() == "2.1.3", ran.stderr
    assert shaped("show", invoke("show", "team/np", "--json").stdout)["kind"] == "name"
    missing = sub("hydrate", "team/np:v2", env=world)
    assert missing.returncode == 1 and "tags of team/np: latest, v1" in missing.stderr
    bad = sub("alias", str(lock), "Team Np", env=world)
    assert bad.returncode == 1 and "is not an env name" in bad.stderr


def test_alias_refuses_what_does_not_apply(world, tmp_path):
    """`alias ENV c786608a` made a name that hydrate read as an id prefix and bootstrap as
    a name; `alias -p ../../victim` and a platform the env lacks were accepted and ignored."""
    lock = tmp_path / "l.yml"
    assert invoke("resolve", "--conda", "numpy", "--python", "3.11", "-o", str(lock)).exit_code == 0
    for name in ("c786608a", "0123456789abcdef0123", "deadbeef:v1"):
        result = envmgr_here("alias", str(lock), name, env=world, cwd=tmp_path)
        assert result.returncode == 1, name
        assert "looks like an env id prefix, so it would mean two envs" in result.stderr
    assert envmgr_here("alias", str(lock), "c786608", env=world, cwd=tmp_path).returncode == 0
    assert (
        envmgr_here("alias", str(lock), "team/cafe-babe1", env=world, cwd=tmp_path).returncode == 0
    )
    victim = envmgr_here(
        "alias", str(lock), "team/np", "-p", "../../victim", env=world, cwd=tmp_path
    )
    assert victim.returncode == 2 and "--platform '../../victim': unknown platform" in victim.stderr
    other = envmgr_here("alias", str(lock), "team/np", "-p", "osx-arm64", env=world, cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.splitlines() == [
        f"envmgr: error: --platform osx-arm64: {lock} has no osx-arm64 env (it has: linux-64)"
    ]
    store = LocalStore(tmp_path / "store")
    assert not list(store.list("names/team/np/"))


def test_show_finds_an_env_that_resolve_printed_before_it_is_built(world, tmp_path):
    args = ("resolve", "--conda", "tabulate", "--python", "3.11", "--json")
    env_id = json.loads(envmgr_here(*args, env=world, cwd=tmp_path).stdout)["envs"][0]["env_id"]
    shown = envmgr_here("show", env_id[:12], env=world, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"env {env_id}" in shown.stdout and "not built yet" in shown.stdout


def test_a_resolution_cache_entry_of_a_newer_envmgr_is_refused_not_replaced(world, tmp_path):
    from envmgr.cache.layout import lock_key

    args = ("resolve", "--conda", "numpy", "--python", "3.11", "--json")
    first = json.loads(envmgr_here(*args, env=world, cwd=tmp_path).stdout)["envs"][0]
    store = LocalStore(tmp_path / "store")
    key = lock_key(first["spec_id"], "linux-64")
    newer = {**json.loads(store.get(key) or b""), "format": 99}
    store.put(key, json.dumps(newer).encode())
    again = envmgr_here(*args[:-1], env=world, cwd=tmp_path)
    assert again.returncode == 1
    assert "a lock of format 99, written by a newer envmgr" in again.stderr
    assert json.loads(store.get(key) or b"")["format"] == 99


def test_config_sources_and_precedence(world, tmp_path, monkeypatch):
    config = tmp_path / "envmgr.toml"
    config.write_text('store = "file:///tmp/from-file"\ncodec = "gz"\nplatforms = ["linux-64"]\n')
    monkeypatch.setenv("ENVMGR_CONFIG", str(config))
    monkeypatch.setenv("CONDA_OVERRIDE_GLIBC", "2.17")
    data = shaped("config show", invoke("config", "show", "--json").stdout)
    settings = data["settings"]
    assert data["config_file"] == str(config) and data["config_file_exists"] is True
    assert settings["codec"] == {"value": "gz", "source": str(config)}
    assert settings["store"]["source"] == "ENVMGR_STORE"  # the variable beats the file
    assert settings["platforms"]["value"] == ["linux-64"]
    assert settings["channels"]["source"] == "ENVMGR_CHANNELS"
    assert "__glibc=2.17=0" in data["virtual_packages"]["packages"]
    assert data["virtual_packages"]["overrides"] == {"CONDA_OVERRIDE_GLIBC": "2.17"}
    monkeypatch.delenv("ENVMGR_STORE")
    assert load()["store"] == "file:///tmp/from-file"
    flagged = load(flags={"store": "s3://b/p"})
    assert flagged["store"] == "s3://b/p" and flagged.sources["store"] == "command line"
    text = sub("config", "show", env={**os.environ}).stdout
    assert f"from {config}" in text and "codec" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("store = [1\n", "not valid TOML"),
        ("stroe = 'x'\n", "unknown setting(s) stroe"),
        ("level = 'high'\n", "level: want a whole number"),
        ("codec = 'xz'\n", "codec 'xz': use zst or gz"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_it(world, tmp_path, content, message):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = sub("ls", env={**world, "ENVMGR_CONFIG": str(config)})
    assert result.returncode == 2 and message in result.stderr
    assert str(config) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(EnvmgrError):
        load({"ENVMGR_CONFIG": str(config)})


def test_usage_errors_are_one_line(world):
    for args, text in [
        (("export", "nope.yml", "--format", "pip"), "--format 'pip'"),
        (("show", "0" * 32), "not in"),
        (("diff", "0" * 32), "Missing argument"),
        (("hydrate", "not a target!"), "is not an env id"),
    ]:
        result = sub(*args, env=world)
        assert result.returncode in (1, 2) and text in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_run_needs_a_command_and_runs_in_the_env(world, tmp_path):
    lock = tmp_path / "l.yml"
    assert invoke("resolve", "--pypi", "six", "--python", "3.11", "-o", str(lock)).exit_code == 0
    assert invoke("run", str(lock)).exit_code == 2  # in-process: `run` execs, so only its checks
    ran = sub(
        "run",
        str(lock),
        "--",
        "python",
        "-c",
        "import six, sys; print(six.__version__, sys.prefix)",
    )
    version, prefix = ran.stdout.split()
    assert version == "1.17.0" and prefix.startswith(world["ENVMGR_CACHE_DIR"])


def test_env_id_prefixes_work_like_gits_abbreviated_hashes(mixed_lock, tmp_path):
    """The CLI prints 12 digits; 8 or more of them name the env wherever an id does."""
    from envmgr.build.once import offer_lock
    from envmgr.cache.local import LocalStore

    store = LocalStore(tmp_path / "store")
    part = mixed_lock
    offer_lock(store, part)
    env = {**os.environ, "ENVMGR_STORE": store.url, "ENVMGR_CACHE_DIR": str(tmp_path / "c")}
    shown = envmgr_here("show", part.env_id[:12], "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert part.env_id in shown.stdout
    # Two envs starting alike: the prefix is refused, naming both.
    twin = part.env_id[:8] + "f" * 24 if part.env_id[8] != "f" else part.env_id[:8] + "e" * 24
    store.put(f"envs/linux-64/{twin}/conda-lock.yml", b"-")
    ambiguous = envmgr_here("show", part.env_id[:8], env=env)
    assert ambiguous.returncode == 2
    assert f"env id prefix {part.env_id[:8]} is ambiguous" in ambiguous.stderr
    assert part.env_id[:16] in ambiguous.stderr and twin[:16] in ambiguous.stderr
    missing = envmgr_here("show", "0123abcd99", env=env)
    assert missing.returncode != 0 and "0123abcd99" in missing.stderr
    # build --env takes a prefix too (here: a platform the env has no lock for).
    built = envmgr_here("build", "--env", part.env_id[:12], "--platform", "osx-arm64", env=env)
    assert built.returncode == 1 and f"env {part.env_id}: " in built.stderr, built.stderr


def test_for_a_deploy_takes_a_known_deploy_and_a_flow_file(world, tmp_path):
    flow = tmp_path / "flow.py"
    flow.write_text("from metaflow import FlowSpec, conda, step\n")
    unknown = invoke("build", str(flow), "--for", "kubeflow")
    assert unknown.exit_code == 2
    assert "--for 'kubeflow': use one of airflow, argo-workflows, step-functions" in unknown.output
    alone = invoke("build", "--conda", "six", "--for", "airflow")
    assert alone.exit_code == 2 and "--for airflow goes with a flow file" in alone.output


def test_names_that_match_nothing_say_so_in_one_line(world, tmp_path):
    """`envmgr names ls` (as after `store ls`) asks for a name "ls": it printed nothing and
    exited 0, which reads as "done"."""
    store = (tmp_path / "empty").as_uri()
    (tmp_path / "empty").mkdir()
    for args, said in (
        (["ls"], f"no name ls in {store}; `envmgr names` lists them all"),
        ([], f"no names in {store}; `envmgr alias TARGET team/name:tag` gives one"),
    ):
        result = envmgr_here("names", *args, "--store", store, env=world)
        assert result.returncode == 0 and not result.stdout
        assert result.stderr.splitlines() == [f"envmgr: note: {said}"]
    quiet = envmgr_here("-q", "names", "ls", "--store", store, env=world)
    assert quiet.returncode == 0 and not quiet.stderr
    as_json = envmgr_here("names", "ls", "--store", store, "--json", env=world)
    assert json.loads(as_json.stdout)["names"] == [] and not as_json.stderr
