"""The docs cover the code: every module has an API page and an ``__all__``, the API overview's tables
name only what their modules export, and every page is in the navigation. (``mkdocs build --strict``
in ``.ci/run`` renders them, with warnings as errors.)"""

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import stepkit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MODULES = sorted(m.name for m in pkgutil.walk_packages(stepkit.__path__, "stepkit.")
                 if not m.name.startswith("stepkit.recipes") and m.name != "stepkit._atomic")


def api_tables() -> list[tuple[list[str], list[str]]]:
    """``(modules, names)`` per table of docs/api/index.md: the modules the line before it names (the
    first table: ``stepkit``), the names its rows' first cells hold."""
    tables, modules, names = [], ["stepkit"], None
    for line in (DOCS / "api" / "index.md").read_text().splitlines():
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


def test_every_name_in_the_api_tables_is_exported_by_a_module_its_table_names():
    tables = api_tables()
    assert len(tables) >= 4 and sum(len(n) for _, n in tables) > 80
    missing = [f"{name} (from {' / '.join(mods)})" for mods, names in tables for name in names
               if not any(name.split(".")[0] in vars(importlib.import_module(m)) for m in mods)]
    assert not missing, missing


def test_stepkit_all_is_exactly_the_core_table():
    modules, names = api_tables()[0]
    assert modules == ["stepkit"]
    assert set(stepkit.__all__) == {n.split(".")[0] for n in names}


def test_every_module_has_an_api_page():
    directives = set(re.findall(r"^::: (\S+)", "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md")),
                                re.M))
    assert sorted(set(MODULES) - directives) == []
    assert sorted(directives - set(MODULES) - {"stepkit"}) == []  # no page for a module that is gone


@pytest.mark.parametrize("name", MODULES)
def test_every_module_exports_exactly_its_public_definitions(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    assert [n for n in module.__all__ if not hasattr(module, n)] == []
    tree = ast.parse(Path(module.__file__).read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    public = [n for n in defined if not n.startswith("_")]
    assert [n for n in public if n not in module.__all__] == [], f"{name}: public but not in __all__"


def test_every_docs_page_is_in_the_navigation():
    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed == on_disk


# Flags of other programs the guides show (torchrun, Slurm, coreutils, pip, mkdocs).
OTHER_TOOLS = {"--nproc_per_node", "--nnodes", "--standalone", "--rdzv-backend", "--rdzv-endpoint",
               "--rdzv-id", "--max-restarts", "--requeue", "--signal", "--preserve-status", "--no-deps",
               "--strict", "--help"}
NOT_FLAGS = {"--flags", "--lr"}  # "[--flags]" in a usage line; the unknown flag of an error example
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]


def recipe_flags() -> dict[str, tuple[set[str], set[str]]]:
    """``{recipe: (every flag of its config and presets, its presets)}``, as tyro spells the flags."""
    import dataclasses

    from conftest import load_recipe

    from stepkit.config import flat_config

    found = {}
    for path in sorted((ROOT / "recipes").glob("*.py")):
        if path.stem == "__init__":
            continue
        recipe = load_recipe(path.stem)
        flags: set[str] = set()
        for config in [recipe.Config(), *(c for _, c in recipe.PRESETS.values())]:
            for name in flat_config(dataclasses.asdict(config)):
                dotted = ".".join(part.rstrip("_") for part in name.split(".")).replace("_", "-")
                head, _, last = dotted.rpartition(".")
                flags |= {f"--{dotted}", f"--{head + '.' if head else ''}no-{last}"}
        found[path.stem] = (flags, set(recipe.PRESETS))
    return found


def argparse_flags(*paths: Path) -> set[str]:
    return {flag for p in paths for flag in re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", p.read_text())}


@pytest.mark.slow
def test_every_flag_the_docs_name_exists():
    """A flag renamed or removed in the code and still in a page fails here, naming the page."""
    recipes = recipe_flags()
    known = set().union(*(flags for flags, _ in recipes.values())) | OTHER_TOOLS
    known |= argparse_flags(ROOT / "stepkit" / "__main__.py", ROOT / "stepkit" / "sweep.py",
                            *(ROOT / "benchmarks").glob("*.py"))
    known |= {"--config"} | NOT_FLAGS  # every recipe's config file (stepkit.cli)
    unknown = sorted({(flag, page.name) for page in PAGES
                      for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9]", page.read_text())
                      if flag not in known and not any(k.startswith(flag + ".") for k in known)})
    assert unknown == []


@pytest.mark.slow
def test_every_recipe_and_preset_the_docs_run_exists():
    recipes = recipe_flags()
    runs = r"(?:python recipes/(\w+)\.py|stepkit run (\w+))(?: ([a-z][\w-]*))?"  # [PRESET] may follow
    named = [(m.group(1) or m.group(2), m.group(3), page.name) for page in PAGES
             for m in re.finditer(runs, page.read_text())]
    named += [(m.group(1), None, page.name) for page in PAGES
              for m in re.finditer(r"stepkit cp (?:--config )?(\w+)", page.read_text())]
    assert len(named) > 20  # the pattern finds the docs' commands
    missing = [(recipe, page) for recipe, _, page in named if recipe not in recipes]
    no_preset = [(recipe, preset, page) for recipe, preset, page in named
                 if recipe in recipes and preset and preset not in recipes[recipe][1]]
    assert missing == [] and no_preset == []
