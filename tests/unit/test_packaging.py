"""Every package of the tree is in pyproject's list: `make install` is not editable.

A package left out installs nothing, and the daemon dies at import under
systemd while every editable test passes (it happened with daemon.commands).
"""

from __future__ import annotations

import tomllib

from tests.harness import REPO


def test_every_directory_of_modules_is_a_listed_package() -> None:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = set()
    for name, base in conf["package-dir"].items():
        root = REPO / base
        for py in root.rglob("*.py"):
            rel = py.parent.relative_to(root)
            found.add(".".join((name, *rel.parts)))
    assert found - listed == set(), f"not in pyproject's packages: {sorted(found - listed)}"
