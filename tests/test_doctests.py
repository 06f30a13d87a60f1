"""Every example in stepkit's docstrings runs and prints what it shows; the loop's core documents itself."""

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch

import stepkit

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(stepkit.__path__, "stepkit.")
    # the recipes are scripts, tested by running them
    if m.name != "stepkit.recipes" and not m.name.startswith("stepkit.recipes.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    # examples may use torch without importing it, as a user's session has it
    for test in finder.find(module, name, globs={"torch": torch, **vars(module)}):
        runner.run(test)
    failed, _ = runner.summarize(verbose=False)
    assert failed == 0, f"{failed} docstring example(s) in {name} failed (printed above)"


@pytest.mark.parametrize("name", stepkit.__all__)
def test_core_names_document_args_and_an_example(name):
    obj = getattr(stepkit, name)
    doc = inspect.getdoc(obj) or ""
    assert ">>> " in doc, f"stepkit.{name}: no example"
    if inspect.isfunction(obj) or hasattr(obj, "__wrapped__"):
        params = [p for p in inspect.signature(obj).parameters if p not in ("self",)]
        assert "Args:" in doc, f"stepkit.{name}: no Args section"
        args = doc.split("Args:", 1)[1]
        missing = [p for p in params if f"    {p}:" not in args]
        assert not missing, f"stepkit.{name}: Args does not describe {missing}"
        returns_none = inspect.signature(obj).return_annotation in (None, "None")
        assert returns_none or "Returns:" in doc, f"stepkit.{name}: no Returns section"


def public_definitions(module):
    """The functions and classes a module defines (not imports) under public names."""
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and getattr(obj, "__module__", None) == module.__name__]


@pytest.mark.parametrize("name", [m for m in MODULES if not m.rsplit(".", 1)[-1].startswith("_")
                                  or m.endswith("__main__")])
def test_every_public_function_and_class_has_an_example(name):
    module = importlib.import_module(name)
    missing = [n for n in public_definitions(module)
               if ">>> " not in (inspect.getdoc(getattr(module, n)) or "")]
    assert not missing, f"{name}: no example in the docstring of {missing}"


def test_public_definitions_sees_what_a_module_defines():
    import stepkit.schedules

    names = public_definitions(stepkit.schedules)
    assert "warmup_decay" in names and "lr_at" in names and "_post_init_next" not in names
    assert "dataclass" not in names  # imported, not defined there


def test_the_doctest_check_can_fail():
    def wrong():
        """
        >>> 1 + 1
        3
        """
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(wrong, "wrong", globs={}):
        runner.run(test, out=lambda _: None)
    assert runner.summarize(verbose=False).failed == 1
