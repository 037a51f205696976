"""The report's optional dependencies (matplotlib, rich): checked lazily, with the command that installs them."""

from __future__ import annotations

import importlib.util

from gradience.errors import GradienceError

INSTALL_HINT = ("pip install -e '.[report]' from a Gradience checkout (or: pip install 'matplotlib>=3.7' "
                "'rich>=13'); note that the PyPI package named 'gradience' is an unrelated project")


class MissingDependency(GradienceError, ImportError):
    """matplotlib or rich is not installed; the message says how to install them."""


def require(*modules: str) -> None:
    """Raise :class:`MissingDependency` unless every module in ``modules`` (default: both) is importable."""
    missing = [m for m in (modules or ("matplotlib", "rich")) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"gradience report needs {' and '.join(missing)}: {INSTALL_HINT}")
