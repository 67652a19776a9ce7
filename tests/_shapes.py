"""The README documents each ``--json`` output as a shape; this checks data against one.

A shape is JSON: the strings ``"str"``, ``"int"``, ``"float"``, ``"bool"``, ``"null"``,
``"list"`` (of strings) and ``"object"`` name types, ``|`` joins alternatives, a one-element
list means a list of such items, an object lists its keys (``"key?"`` may be absent) or gives
``"*"`` for any key.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_TYPES: dict[str, Any] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "list": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "object": lambda v: isinstance(v, dict),
}


@functools.cache
def documented_shapes() -> dict[str, Any]:
    """``{"resolve": shape, "config show": shape, ...}`` from the README."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"`envmgr ([a-z ]+?) --json`:\n```json\n(.*?)```", text, flags=re.S)
    return {command: json.loads(body) for command, body in found}


def problems(data: Any, shape: Any, where: str = "$") -> list[str]:
    """Every place where *data* does not have *shape* (empty: it does)."""
    if isinstance(shape, str):
        if any(_TYPES[t](data) for t in shape.split("|")):
            return []
        return [f"{where}: {data!r} is not {shape}"]
    if isinstance(shape, list):
        if not isinstance(data, list):
            return [f"{where}: not a list"]
        return [p for i, item in enumerate(data) for p in problems(item, shape[0], f"{where}[{i}]")]
    if data is None and where.endswith((".archive", ".cuda")):  # documented: null until built,
        # or for a CPU env
        return []
    if not isinstance(data, dict):
        return [f"{where}: not an object"]
    if "*" in shape:
        return [p for k, v in data.items() for p in problems(v, shape["*"], f"{where}.{k}")]
    out = []
    keys = {k.rstrip("?"): k for k in shape}
    for key in data.keys() - keys.keys():
        out.append(f"{where}: undocumented key {key!r}")
    for key, spelled in keys.items():
        if key not in data:
            if not spelled.endswith("?"):
                out.append(f"{where}: missing key {key!r}")
            continue
        out += problems(data[key], shape[spelled], f"{where}.{key}")
    return out


def shaped(command: str, text: str) -> Any:
    """*text*, the ``--json`` output of ``envmgr COMMAND``, parsed, once it is checked to
    have the shape the README documents for it."""
    data = json.loads(text)
    assert problems(data, documented_shapes()[command]) == [], (command, data)
    return data
