"""Print the requirements that ``pip install '.[EXTRA,...]'`` would install, from pyproject.toml alone.

The images install these in a layer of their own, before the code is copied in, so that a change to
the code does not reinstall the dependencies. Standard library only (it runs before anything is
installed). Usage, beside a pyproject.toml::

    python requirements.py [--only NAME,...] [EXTRA ...]

``--only`` keeps the named distributions (the trainer image installs torch from PyTorch's own index).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The base dependencies and those of ``extras``; the project's own extras (``me[a,b]``) are expanded."""
    own = canonical(project["name"])
    optional = {canonical(k): v for k, v in project.get("optional-dependencies", {}).items()}
    wanted, seen, todo = list(project.get("dependencies", [])), set(), [canonical(e) for e in extras]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"no extra {extra!r} in pyproject.toml (it has: {', '.join(sorted(optional))})")
        seen.add(extra)
        wanted.extend(optional[extra])
    result: list[str] = []
    for line in wanted:
        match = NAME.match(line)
        if match is None:
            raise SystemExit(f"cannot read the requirement {line!r}")
        if canonical(match[1]) == own:
            todo = [canonical(e) for e in (match[2] or "").split(",") if e.strip()]
            result.extend(r for r in requirements(project, todo) if r not in result)
        elif line not in result:
            result.append(line)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="extras to include, e.g. teacher train")
    parser.add_argument("--only", default="", help="comma-separated distribution names to keep")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))["project"]
    keep = {canonical(n) for n in args.only.split(",") if n.strip()}
    for line in requirements(project, args.extras):
        match = NAME.match(line)
        if not keep or (match is not None and canonical(match[1]) in keep):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
