"""The inputs ``resolve`` and ``build`` share: where specs come from and how to resolve them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from envmgr.build.once import BuildOptions
from envmgr.cache import open_store
from envmgr.cache.local import LocalStore
from envmgr.cache.store import StoreError
from envmgr.channels import split_credentials
from envmgr.cli._common import fail, tell
from envmgr.config import load
from envmgr.errors import Problem, SpecError
from envmgr.limits import InputError, read_bounded
from envmgr.locks.export import is_explicit
from envmgr.locks.formats import looks_like_requirements
from envmgr.platforms import PLATFORMS, Platform, is_platform
from envmgr.progress import NULL, Progress
from envmgr.resolve.resolution_cache import ResolveOptions
from envmgr.specs.deps import (
    CondaDep,
    PypiDep,
    parse_find_links,
    parse_index_url,
    parse_python,
    parse_system_package,
)
from envmgr.specs.discovery import read_flow
from envmgr.specs.files import read_spec_file
from envmgr.specs.flows import (
    DEPLOY_DECORATORS,
    Placement,
    metaflow_target_platform,
    run_settings,
    run_specs,
    run_store,
    step_platforms,
)
from envmgr.specs.model import EnvSpec, merge

if TYPE_CHECKING:
    from envmgr.build.once import BuildOptions
    from envmgr.cache import Store
    from envmgr.config import Config

__all__ = [
    "SPEC_PARAMETERS",
    "Inputs",
    "configured_store",
    "gather",
    "parse_platforms",
    "spec_args",
]

FlowArg = Annotated[Path | None, typer.Argument(help="A flow file: every step is used.")]
EnvFiles = Annotated[
    list[Path], typer.Option("-f", "--file", metavar="FILE", help="environment.yml (repeatable)")
]
ReqFiles = Annotated[
    list[Path],
    typer.Option("-r", "--requirements", metavar="FILE", help="requirements.txt (repeatable)"),
]
CondaSpecs = Annotated[
    list[str], typer.Option("--conda", metavar="SPEC", help="A conda match spec (repeatable).")
]
PypiSpecs = Annotated[
    list[str], typer.Option("--pypi", metavar="REQ", help="A PEP 508 requirement (repeatable).")
]
PythonOpt = Annotated[
    str | None, typer.Option("--python", metavar="VERSION", help="Python version, e.g. 3.11")
]
PlatformOpt = Annotated[
    list[str],
    typer.Option(
        "-p", "--platform", metavar="PLATFORM", help="Target platform, e.g. linux-64 (repeatable)."
    ),
]
ChannelOpt = Annotated[
    list[str],
    typer.Option(
        "--channel",
        "-c",
        metavar="CHANNEL",
        help="Channel for specs that name none (repeatable; default "
        "ENVMGR_CHANNELS or conda-forge).",
    ),
]
IndexOpt = Annotated[
    str | None,
    typer.Option(
        "--index-url", metavar="URL", help="PyPI index (default: pip's configured index)."
    ),
]
ExtraIndexOpt = Annotated[
    list[str],
    typer.Option("--extra-index-url", metavar="URL", help="Another PyPI index (repeatable)."),
]
FindLinksOpt = Annotated[
    list[str],
    typer.Option(
        "--find-links",
        metavar="DIR|URL",
        help="A directory of wheels and sdists, or an HTML page of links to them "
        "(repeatable; pip's option).",
    ),
]
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        metavar="URL",
        help="Store URL: file:///path or s3://bucket/prefix (default ENVMGR_STORE "
        "or the local store).",
    ),
]
CudaOpt = Annotated[
    str | None,
    typer.Option(
        "--cuda",
        metavar="VERSION|host|none",
        help="Lock every target for this CUDA version (__cuda); 'host': this machine's driver; "
        "'none': CPU builds. Default: GPU steps get the cuda setting, others none.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print results as JSON.")]
DeployOpt = Annotated[
    str | None,
    typer.Option(
        "--for",
        metavar="DEPLOY",
        help="Build each step for the platform this deploy runs it on (argo-workflows, "
        "airflow: @kubernetes on every step; step-functions: @batch).",
    ),
]
SpecsJsonOpt = Annotated[
    Path | None,
    typer.Option(
        "--specs-json",
        hidden=True,
        help="Steps' specs as JSON (how the Metaflow extension hands them over).",
    ),
]
LockedOpt = Annotated[
    bool,
    typer.Option(
        "--locked",
        help="Fail if a lock would change: solve again and compare with the cached lock "
        "(which must exist); uv's and pixi's --locked.",
    ),
]
FrozenOpt = Annotated[
    bool,
    typer.Option(
        "--frozen",
        help="Use the cached locks as they are and never solve; fail if a spec has none "
        "(uv's and pixi's --frozen).",
    ),
]
DatastoreOpt = Annotated[
    str | None,
    typer.Option(
        "--datastore",
        metavar="local|s3|azure|gs",
        help="For a Metaflow flow: the datastore its run uses, which decides the packages "
        "Metaflow's tasks add and the store (default: Metaflow's configuration).",
    ),
]


#: The parameters through which ``resolve`` and ``build`` name their specs (see :func:`gather`).
SPEC_PARAMETERS = (
    "flow",
    "env_file",
    "requirements",
    "conda",
    "pypi",
    "python",
    "platform",
    "channel",
    "index_url",
    "extra_index_url",
    "find_links",
    "store",
    "cuda",
    "datastore",
)


def spec_args(parameters: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SPEC_PARAMETERS` out of a command's parameters (its ``locals()``)."""
    return {name: parameters[name] for name in SPEC_PARAMETERS}


@dataclass(frozen=True, kw_only=True, slots=True)
class Inputs:
    specs: dict[str, EnvSpec]
    sources: list[str]
    options: ResolveOptions
    #: Steps that run in a named env (``@conda(name=...)``): step -> (name:tag, platforms).
    named: dict[str, tuple[str, tuple[Platform, ...]]] = field(default_factory=dict)


def _single_spec(
    files: list[Path], conda: list[str], pypi: list[str], python: str | None
) -> EnvSpec:
    spec = EnvSpec()
    for path in files:
        spec = merge(spec, read_spec_file(path))
    problems: list[Problem] = []
    deps: list[CondaDep] = []
    given: dict[str, tuple[CondaDep, str]] = {}  # name -> its dep and --conda text
    pythons = [("--python", f"--python {python}", python)] if python else []
    for text in conda:
        try:
            dep = CondaDep.parse(text)
        except ValueError as exc:
            problems.append(
                Problem(where="command line", key=f"--conda {text!r}", message=str(exc))
            )
            continue
        if dep.name == "python" and dep.channel is None:
            version = dep.spec[len("python") :].strip().replace("==", "", 1) or "*"
            pythons.append((f"--conda {text!r}", f"--conda {text!r}", version))
            continue
        earlier = given.get(dep.name)
        if earlier is not None and earlier[0] != dep:
            problems.append(
                Problem(
                    where="command line",
                    key=f"--conda {text!r}",
                    message=f"{dep.name} is already given as --conda {earlier[1]!r}; give "
                    f"one spec per package (e.g. --conda '{dep.name} >=1.2,<2')",
                )
            )
            continue
        if earlier is None:
            given[dep.name] = (dep, text)
            deps.append(dep)
    pypi_deps: list[PypiDep] = []
    for text in pypi:
        try:
            pypi_deps.append(PypiDep.parse(text))
        except ValueError as exc:
            problems.append(Problem(where="command line", key=f"--pypi {text!r}", message=str(exc)))
    parsed: dict[str, str] = {}  # parsed python spec -> the first option that gave it
    for key, shown, version in pythons:
        try:
            parsed.setdefault(parse_python(version), shown)
        except ValueError as exc:
            problems.append(Problem(where="command line", key=key, message=str(exc)))
    if len(parsed) > 1:
        problems.append(
            Problem(
                where="command line",
                key="python",
                message=f"two different pythons: {' and '.join(parsed.values())}; give one",
            )
        )
    parsed_python = next(iter(parsed), None)
    if problems:
        raise SpecError(problems)
    return merge(spec, EnvSpec(python=parsed_python, conda=tuple(deps), pypi=tuple(pypi_deps)))


def _specs_from_json(path: Path) -> dict[str, EnvSpec]:
    """``{"steps": {name: EnvSpec.to_dict()}}``, as the Metaflow extension writes it."""
    import json  # noqa: PLC0415

    try:
        data = json.loads(path.read_text())
        steps = data["steps"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"{path}: not a specs file ({exc})")
    return {
        str(name): EnvSpec.from_dict(spec, where=f"step {name!r}") for name, spec in steps.items()
    }


def spec_file_kind(path: Path) -> Literal["env_file", "requirements"] | None:
    """Whether a path given where a flow file or a TARGET goes is a spec file, as conda-lock
    and pixi users hand them in: an environment.yml (a ``.yml``/``.yaml`` that is not a lock
    file) or a pyproject.toml (read as -f), a requirements file (``.txt``/``.in``, or
    requirement lines) read as -r; None for anything else (a flow, a lock file)."""

    name = path.name.lower()
    if path.suffix == ".py" or not path.is_file():
        return None
    if name == "pyproject.toml":
        return "env_file"
    try:
        text = read_bounded(path, what="file")
        if is_explicit(path):
            return None  # a conda @EXPLICIT lock, whatever its name
    except (InputError, OSError):
        return None
    # environment.yml has top-level dependencies:, a lock (conda-lock, pixi.lock) has not.
    if re.search(r"^dependencies:", text, re.MULTILINE) and not re.search(
        r"^(package|packages|metadata|environments):", text, re.MULTILINE
    ):
        return "env_file"
    if name.endswith((".txt", ".in")) or looks_like_requirements(text):
        return "requirements"
    return None


def configured_store(config: Config, *, reading: bool = False) -> Store:
    """The store the configuration names. A local store that was named (by a flag, a variable
    or the file, not the default under the cache dir) and does not exist is an error for a
    command that only reads (*reading*), and is announced when a writer creates it: a typo in
    ``--store`` never passes for an empty store."""

    store = open_store(config["store"])
    source = config.sources["store"]
    if (
        isinstance(store, LocalStore)
        and not store.root.is_dir()
        and not source.startswith("default")
    ):
        if reading:
            raise StoreError(
                store.url,
                "-",
                f"no such store (from {source})",
                hint="check the path; `envmgr build` or `envmgr resolve` creates a local store",
            )
        if store.url not in _ANNOUNCED:
            _ANNOUNCED.add(store.url)
            tell(f"creating the store {store.url} (from {source})")
    given = str(config["store"])
    relative = not given.startswith(("/", "~", "file:"))
    if isinstance(store, LocalStore) and relative and given not in _ANNOUNCED:
        _ANNOUNCED.add(given)
        tell(f"the store {given} (from {source}) is {store.root}")
    return store


_ANNOUNCED: set[str] = set()


def parse_platforms(values: list[str], where: str = "--platform") -> tuple[Platform, ...]:
    """*values* as platforms; exits 2 with one line naming an unknown one and the known."""
    out: list[Platform] = []
    for value in values:
        if not is_platform(value):
            fail(f"{where} {value!r}: unknown platform; known: {', '.join(PLATFORMS)}")
        else:
            out.append(value)
    return tuple(out)


def _flow_specs(
    flow: Path,
    datastore: str | None,
    python: str | None,
    store: str | None,
    deploy: str | None = None,
) -> tuple[dict[str, EnvSpec], str | None, dict[str, tuple[str, tuple[Platform, ...]]]]:
    """The specs of a flow file's steps and, for a Metaflow flow, the store its run uses:
    the specs the run hydrates (:mod:`envmgr.specs.flows`), so building here warms the run.
    With *deploy*, every step without a compute decorator gets the one that deploy adds."""
    import dataclasses  # noqa: PLC0415

    found = read_flow(flow)
    if not found.specs and not found.names:
        fail(f"{flow}: no step has an environment (@conda, @pypi, @conda_base, @pypi_base)")
    if not found.is_metaflow:
        if python:
            fail("--python with a flow file is for Metaflow flows (the launching python)")
        if deploy:
            fail(f"--for {deploy} is for Metaflow flows; {flow} has none")
        return found.specs, None, {}
    if found.dynamic:
        tell(
            f"warning: {flow} uses Metaflow's {', '.join(found.dynamic)}: envmgr reads the "
            "decorators as written, so a run may resolve other envs than these; "
            f"`python {flow} --environment=conda environment build` builds the run's own"
        )
    settings = run_settings(datastore, python)
    placements = {
        name: place if place.remote or not deploy else Placement(remote=DEPLOY_DECORATORS[deploy])
        for name, place in found.placements.items()
    }
    placements = {
        name: dataclasses.replace(place, target_platform=metaflow_target_platform(place.remote))
        if place.remote
        else place
        for name, place in placements.items()
    }
    url, endpoint = run_store(settings.datastore, store)
    if endpoint and not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # the store's client reads it, as boto3 does

    named = {
        step: (name, step_platforms(EnvSpec(), placements.get(step) or Placement()))
        for step, name in found.names.items()
    }
    return run_specs(found.specs, placements, settings), url, named


def gather(
    *,
    flow: Path | None,
    env_file: list[Path],
    requirements: list[Path],
    conda: list[str],
    pypi: list[str],
    python: str | None,
    platform: list[str],
    channel: list[str],
    index_url: str | None,
    extra_index_url: list[str],
    store: str | None,
    cuda: str | None,
    find_links: list[str] | None = None,
    datastore: str | None = None,
    force: bool = False,
    check: bool = False,
    locked: bool = False,
    frozen: bool = False,
    specs_json: Path | None = None,
    deploy: str | None = None,
    progress: Progress = NULL,
) -> Inputs:
    """The specs named on the command line and the options to resolve them with; usage
    problems exit 2, spec problems raise ``SpecError``. *locked* resolves as *check* does
    (the caller then calls :func:`~envmgr.resolve.resolution_cache.require_locked`)."""
    if frozen and (locked or check or force):
        given = [
            f for f, on in (("--locked", locked), ("--check", check), ("--force", force)) if on
        ]
        fail(f"--frozen never solves; it does not go with {', '.join(given)}")
    if flow is not None:  # `resolve environment.yml`, as conda-lock and pixi users write it
        kind = spec_file_kind(flow)
        if kind == "env_file":
            env_file, flow = [flow, *env_file], None
        elif kind == "requirements":
            requirements, flow = [flow, *requirements], None
    if flow is not None and (env_file or requirements or conda or pypi):
        fail("give a flow file or -f/-r/--conda/--pypi, not both")
    if deploy is not None and deploy not in DEPLOY_DECORATORS:
        fail(f"--for {deploy!r}: use one of {', '.join(sorted(DEPLOY_DECORATORS))}")
    if deploy is not None and flow is None:
        fail(f"--for {deploy} goes with a flow file (envmgr build flow.py --for {deploy})")
    singles = bool(env_file or requirements or conda or pypi or python)
    if specs_json is not None:
        flow, singles = None, False
    elif flow is None and not singles:
        fail("nothing to do: give a flow file, -f, -r, --conda, --pypi or --python")
    config_flags = {
        "store": store,
        "channels": channel,
        "index_url": index_url,
        "extra_index_urls": extra_index_url,
    }
    config = load(flags=config_flags)
    index_url = config["index_url"]
    try:
        indexes = [
            parse_index_url(u)
            for u in ([index_url] if index_url else []) + list(config["extra_index_urls"])
        ]
    except ValueError as exc:
        fail(f"{config.sources['index_url']}: {exc}")
    try:
        links = tuple(parse_find_links(u) for u in find_links or ())
    except ValueError as exc:
        fail(f"--find-links: {exc}")
    torch_index = config["torch_index"]
    if torch_index:
        try:
            parse_index_url(torch_index)
        except ValueError as exc:
            fail(f"{config.sources['torch_index']}: torch_index: {exc}")
    if cuda and cuda not in ("host", "none"):
        try:
            parse_system_package("__cuda", cuda)
        except ValueError:
            fail(
                f"--cuda {cuda!r}: not a CUDA version; give digits and dots (--cuda 12.4), "
                "host or none"
            )
    default_platforms = config["platforms"]
    bad = [p for p in default_platforms if not is_platform(p)]
    if bad:
        fail(f"{config.sources['platforms']}: unknown platform {bad[0]!r}")
    named: dict[str, tuple[str, tuple[Platform, ...]]] = {}
    if specs_json is not None:
        specs = _specs_from_json(specs_json)
        sources = [str(specs_json)]
    elif flow is not None:
        specs, run_store_url, named = _flow_specs(flow, datastore, python, store, deploy)
        if run_store_url is not None:
            config = load(flags={**config_flags, "store": run_store_url})
        sources = [str(flow)]
    else:
        files = [*env_file, *requirements]
        name = files[0].name if files else "command line"
        specs = {name: _single_spec(files, conda, pypi, python)}
        sources = [str(f) for f in files]
    options = ResolveOptions(
        store=configured_store(config),
        cache_dir=Path(config["cache_dir"]),
        platforms=parse_platforms(platform),
        default_platforms=tuple(default_platforms),
        default_channels=tuple(config["channels"]),
        cuda=cuda,
        torch_index=torch_index,
        force=force,
        check=check or locked,
        frozen=frozen,
        index_url=indexes[0] if index_url else None,
        extra_index_urls=tuple(indexes[1:] if index_url else indexes),
        find_links=links,
        steps_are_steps=flow is not None or specs_json is not None,
        env=dict(os.environ),
        progress=progress,
    )
    return Inputs(specs=specs, sources=sources, options=options, named=named)


def channel_credentials(channel_flags: list[str]) -> dict[str, str]:
    """Credentials (per host) in the ``--channel`` flags and the configured channels, for
    package downloads at build time; the locks themselves never hold them."""

    return split_credentials([*channel_flags, *load()["channels"]])[1]


def build_options(
    store: Store, cache: Path, progress: Progress, channel_flags: list[str], config: Config
) -> BuildOptions:
    """How the CLI builds: codec, level and lease from *config*, waits told on stderr,
    channel credentials from the flags and the configuration."""

    return BuildOptions(
        store=store,
        cache_dir=cache,
        codec="gz" if config["codec"] == "gz" else "zst",
        level=int(config["level"]),
        progress=progress,
        notify=tell,
        lease_seconds=float(config["lease_seconds"]),
        credentials=channel_credentials(channel_flags),
        layers=int(config["format"]) == 3,
    )
