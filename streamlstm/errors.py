"""Problems the user can fix: a bad config key, a missing or damaged model file, a topic shaped wrongly,
unreadable training data, an optional package not installed. Each module raises its own subclass; a
command ends with exit code 2 and the message, which names the key or file and what to do. One base, so
the CLI catches them all without importing the modules that raise them (a serve.workers supervisor stays
without torch)."""

from __future__ import annotations

import importlib
from types import ModuleType


class UsageError(ValueError):
    """A problem the user can fix; the message names the key or file and what to do."""


class MissingPackage(UsageError):
    """An optional dependency is not installed; the message names the package and the pip command."""


def optional_import(module: str, package: str, extra: str, needed_by: str) -> ModuleType:
    """Import an optional dependency, turning its absence into one line that says what to install,
    rather than an ImportError traceback."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{needed_by} needs the {package} package: pip install 'streamlstm[{extra}]'") from None
