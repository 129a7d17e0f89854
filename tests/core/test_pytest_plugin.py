"""The pytest plugin that installing the library registers in every pytest session of
the environment: it costs nothing to a project that does not use its fixture."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_plugin_imports_nothing_of_the_library_until_its_fixture_is_used(
    tmp_path: Path,
) -> None:
    """The entry point's module imported the whole package into every pytest session
    (about 0.3 s, and a ``gc.callbacks`` hook), in projects that never use it. The
    fixture still records what the test emits."""
    (tmp_path / "test_a_plain.py").write_text(
        textwrap.dedent(
            """
            import sys

            def test_plain():
                assert "instrumentation_pytest" in sys.modules  # the plugin is loaded
                assert "instrumentation" not in sys.modules
            """
        )
    )
    (tmp_path / "test_b_uses.py").write_text(
        textwrap.dedent(
            """
            def test_uses(instrumentation_capture):
                from instrumentation import BaseEvent, get_dispatcher

                get_dispatcher("kit.app").event(BaseEvent())
                assert len(instrumentation_capture.events) == 1
            """
        )
    )
    # (Collecting both files runs before either test: neither imports the library.)
    # The plugin as the entry point names it, from this checkout, whatever an
    # installation in the environment registers.
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    plugin = ["-p", "no:cacheprovider", "-p", "instrumentation_pytest"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *plugin, "test_a_plain.py", "test_b_uses.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


def test_the_entry_point_is_the_module_outside_the_package() -> None:
    """What ``pip install`` registers is that module, and the distribution ships it."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["entry-points"]["pytest11"] == {
        "instrumentation": "instrumentation_pytest"
    }
    assert "instrumentation_pytest" in project["tool"]["setuptools"]["py-modules"]


def test_the_former_module_gives_the_fixture_where_the_new_one_cannot_be_imported(
    tmp_path: Path,
) -> None:
    """A checkout installed (``pip install -e .``) before ``instrumentation_pytest``
    existed registers ``instrumentation.testing.pytest_plugin``, and its import finder
    knows only the package: that module imported the new one, so every pytest run in
    the environment stopped at loading the plugin, whether it used the fixture or not."""
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            """
            import sys

            sys.modules["instrumentation_pytest"] = None  # as that installation: not found
            pytest_plugins = ["instrumentation.testing.pytest_plugin"]
            """
        )
    )
    (tmp_path / "test_uses.py").write_text(
        textwrap.dedent(
            """
            def test_uses(instrumentation_capture):
                from instrumentation import BaseEvent, get_dispatcher

                get_dispatcher("kit.app").event(BaseEvent())
                assert len(instrumentation_capture.events) == 1
            """
        )
    )
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_uses.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
