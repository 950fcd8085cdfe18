"""The files in deploy/ read the way Docker and Compose read them, for the deploy tests.

The tests take commands, settings and health checks from the Dockerfiles and the compose file
instead of repeating them, so that a change to an image or to the compose file changes what is
tested. Only the Dockerfile syntax the images use is understood (comments, line continuations,
exec-form ENTRYPOINT/CMD/HEALTHCHECK, ``ENV k=v ...``, ``${ARG}`` / ``$VAR`` substitution);
anything else is a clear error, not a silent guess.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
COMPOSE_SCHEMA = REPO / ".cache" / "compose-spec" / "dclint@3.1.0" / "compose.schema.json"
"""The Compose Specification schema that ``.ci/setup`` unpacks from npm's dclint (keep in step)."""

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """In capitals: FROM, RUN, ENV, ..."""
    arguments: str
    """The rest of the instruction, continuation lines joined, comment lines dropped."""


@dataclass(frozen=True)
class HealthCheck:
    options: dict[str, str]
    """``--interval=30s`` and the like, by name without the dashes."""
    command: list[str]

    def seconds(self, option: str) -> float:
        """A duration option (``30s``, ``2m``) in seconds."""
        value = self.options[option]
        number, unit = float(value[:-1]), value[-1]
        return number * {"s": 1, "m": 60, "h": 3600}[unit]


class Dockerfile:
    """One Dockerfile's instructions, and what its image is made of."""

    def __init__(self, name: str) -> None:
        self.path = DEPLOY / name
        self.instructions = _parse(self.path.read_text(encoding="utf-8"))

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> str:
        (arguments,) = self.all(keyword)
        return arguments

    def exec_form(self, keyword: str) -> list[str]:
        """ENTRYPOINT or CMD, which the images write in exec form (a JSON array)."""
        value = json.loads(self.one(keyword))
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
        return value

    def healthcheck(self) -> HealthCheck:
        match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(\[.*\])", self.one("HEALTHCHECK"), re.DOTALL)
        assert match, f"{self.path.name}: HEALTHCHECK must be options then CMD in exec form"
        options = dict(o[2:].split("=", 1) for o in match.group(1).split())
        return HealthCheck(options, json.loads(match.group(2)))

    def arguments(self) -> dict[str, str]:
        """Build arguments and their defaults (``ARG NAME=default``)."""
        return dict(a.split("=", 1) for a in self.all("ARG") if "=" in a)

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (what the base image sets, e.g. PATH) updated by every ENV of the image, each
        value's ``$VAR`` taken from what was set before it."""
        env = dict(base or {})
        for arguments in self.all("ENV"):
            for token in shlex.split(arguments):
                key, sep, value = token.partition("=")
                assert sep, f"{self.path.name}: write ENV as KEY=VALUE, not {token!r}"
                env[key] = substitute(value, env)
        return env

    def pip_installs(self) -> list[list[str]]:
        """Every ``pip install ...`` of the RUN lines, build arguments substituted, as arguments."""
        installs = []
        for run in self.all("RUN"):
            for command in run.split("&&"):
                words = shlex.split(substitute(command, self.arguments()))
                if words[:2] == ["pip", "install"]:
                    installs.append(words[2:])
        return installs

    def copies(self) -> list[tuple[list[str], str]]:
        """The COPY instructions as (sources, destination)."""
        out = []
        for arguments in self.all("COPY"):
            *sources, destination = shlex.split(arguments)
            assert not any(s.startswith("--") for s in sources), "COPY options are not handled here"
            out.append((sources, destination))
        return out

    def python_version(self) -> tuple[int, int] | None:
        """The Python of a ``python:X.Y-...`` base image (None for another base)."""
        match = re.match(r"python:(\d+)\.(\d+)", self.all("FROM")[0])
        return (int(match.group(1)), int(match.group(2))) if match else None


def substitute(text: str, values: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced as Docker does (unknown names become empty)."""
    return _VARIABLE.sub(lambda m: values.get(m.group(1) or m.group(2), ""), text)


def _parse(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "a Dockerfile may not end inside a continued line"
    return instructions


def dockerignore_included(dockerfile: str) -> set[str]:
    """The paths a whitelist ``.dockerignore`` lets back in (``!path`` lines)."""
    text = (DEPLOY / f"{dockerfile}.dockerignore").read_text(encoding="utf-8")
    return {line[1:].strip() for line in text.splitlines() if line.startswith("!")}


# -- compose.yaml ---------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    """compose.yaml as YAML (anchors and ``<<`` merges resolved, as Compose does)."""
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8")))


def interpolate(value: Any) -> Any:
    """Compose's interpolation with the defaults: ``${VAR:-default}`` is the default, ``${VAR:?msg}``
    and ``${VAR}`` are ``secret`` (what .env must provide), ``$$`` is ``$``; through lists and maps."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return match.group(3) if match.group(2) == ":-" else "secret"

    return re.sub(r"\$\$|\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)
