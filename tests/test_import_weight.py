"""Loading params and building the ``dinoalign`` argument parser stay light (issue #14).

``dinoalign.config`` is imported by every command and ``dinoalign --help`` by every user:
neither may load torch, FAISS or the other heavy libraries that only the stages need. Each
check runs in a fresh interpreter, since this test process has imported them already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# kept out of ``import dinoalign.config`` and of building every ``--help`` of ``dinoalign``
HEAVY = ("torch", "faiss", "pandas", "pyarrow", "ray", "mlflow", "open_clip", "timm", "numpy", "PIL")

BUILD_EVERY_HELP = """
import argparse
import dinoalign.cli

def helps(parser):
    yield parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from helps(sub)

assert sum(1 for _ in helps(dinoalign.cli.build_parser())) > 10
"""


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter has loaded after running ``code``."""
    probe = code + textwrap.dedent(f"""
        import json, sys
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import dinoalign.config",
        "import dinoalign.cli",
        "import dinoalign.curate, dinoalign.evaluate, dinoalign.train, dinoalign.ops.config",
        BUILD_EVERY_HELP,
    ],
    ids=["config", "cli", "package-inits", "every-help"],
)
def test_light_imports(code: str) -> None:
    assert _loaded_after(code) == []


def test_loading_the_params_file_is_light(repo_root) -> None:
    """``dinoalign params`` (and every command) loads params.yaml without the libraries."""
    params = repr(str(repo_root / "params.yaml"))
    assert _loaded_after(f"from dinoalign.config import load_params; load_params({params}, [])") == []


def test_source_names_are_the_registered_sources() -> None:
    """``data.source`` is checked against the light list first; it must be the registry's."""
    from dinoalign.data.config import SOURCE_NAMES
    from dinoalign.data.sources import SOURCES

    assert sorted(SOURCE_NAMES) == SOURCES.names()


def test_help_lists_the_commands() -> None:
    """``python -m dinoalign.cli --help`` prints the commands (and exits 0)."""
    done = subprocess.run(
        [sys.executable, "-m", "dinoalign.cli", "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    for command in ("prepare", "params", "infra", "retrain", "segment", "import-talk2dino"):
        assert command in done.stdout


def test_lazy_names_still_import() -> None:
    """The light package ``__init__``s still give every public name (loaded on first use)."""
    import dinoalign.curate as curate
    import dinoalign.evaluate as evaluate
    from dinoalign.curate import CurateConfig, curate as curate_fn  # noqa: F401
    from dinoalign.evaluate import SegmentationConfig, segment  # noqa: F401

    for package in (curate, evaluate):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    with pytest.raises(AttributeError):
        curate.no_such_name  # noqa: B018
