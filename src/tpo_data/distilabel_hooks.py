"""Adapter: import distilabel without its traceback hook.

distilabel 1.5.3's ``__init__`` runs ``rich.traceback.install(show_locals=True)``.
From then on every uncaught exception in the process, the user's own included,
prints each frame's local variables: Hub tokens, Argilla API keys and whole
datasets. In a notebook it patches the IPython shell the same way.
:func:`import_distilabel` imports the package once (about 0.1 s; its
submodules stay lazy) and puts the interpreter's and IPython's hooks back.
``tpo_data/__init__`` calls it, before any of our modules imports distilabel.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# The attributes rich.traceback.install sets on the IPython shell instance.
_IPYTHON_HOOKS = ("_showtraceback", "showtraceback", "showsyntaxerror")
_ABSENT = object()


def _ipython_shell() -> Any:
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    return get_ipython() if get_ipython is not None else None


def import_distilabel() -> None:
    """Import distilabel; keep ``sys.excepthook`` and the IPython shell's traceback hooks as they were."""
    if "distilabel" in sys.modules:
        return  # imported before us: whatever hook is installed now is the user's choice
    excepthook = sys.excepthook
    shell = _ipython_shell()
    saved = {name: vars(shell).get(name, _ABSENT) for name in _IPYTHON_HOOKS} if shell is not None else {}
    try:
        importlib.import_module("distilabel")
    except ModuleNotFoundError as err:
        if err.name != "distilabel":
            raise
        return  # .venv-vllm installs tpo-data without dependencies; only its vLLM plugin runs there
    sys.excepthook = excepthook
    for name, value in saved.items():
        if value is _ABSENT:
            vars(shell).pop(name, None)  # the class's own method applies again
        else:
            setattr(shell, name, value)
