"""The README's API tables name only what the named modules export, so they cannot drift."""

import importlib
import re
from pathlib import Path

import stepkit

ROOT = Path(__file__).resolve().parents[1]


def api_tables() -> list[tuple[list[str], list[str]]]:
    """``(modules, names)`` per table of the README's API section: the modules its heading line names
    (the first table: ``stepkit``), the names its rows' first cells hold."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## API\n"):]
    section = section[:section.index("\n## ", 1)]
    tables, modules, names = [], ["stepkit"], None
    for line in section.splitlines():
        if line.startswith("| name |"):
            names = []
        elif line.startswith("| `") and names is not None:
            cell = line.split(" | ")[0]
            names += [n for n in re.findall(r"`([A-Za-z_][\w.]*)", cell) if not n.startswith("stepkit")]
        elif names is not None and not line.startswith("| ---"):
            tables.append((modules, names))
            names = None
            modules = re.findall(r"`(stepkit(?:\.\w+)*)`", line) or modules
        elif names is None and re.findall(r"`(stepkit(?:\.\w+)*)`", line):
            modules = re.findall(r"`(stepkit(?:\.\w+)*)`", line)
    if names is not None:
        tables.append((modules, names))
    return tables


def exported(module: str, name: str) -> bool:
    head = name.split(".")[0]  # Class.method: the class
    return head in vars(importlib.import_module(module))  # defined or imported there, not a deprecated alias


def test_every_name_in_the_api_tables_is_importable_from_a_module_its_table_names():
    tables = api_tables()
    assert len(tables) >= 4 and sum(len(n) for _, n in tables) > 80
    missing = [f"{name} (from {' / '.join(mods)})" for mods, names in tables for name in names
               if not any(exported(m, name) for m in mods)]
    assert not missing, missing


def test_stepkit_all_is_exactly_the_main_table():
    modules, names = api_tables()[0]
    assert modules == ["stepkit"]
    main = {n.split(".")[0] for n in names}
    listed = set(stepkit.__all__)
    assert listed == main, (sorted(listed - main), sorted(main - listed))
