"""Runs unmodified code written for the `tinker` SDK (0.38) on this one: `import tinker` and its
submodules resolve to tinker_client in this process and in every Python process it starts.

    python -m tinker_client.as_tinker -m tinker_cookbook.recipes.sl_loop base_url=localhost:50051 ...
    python -m tinker_client.as_tinker my_training_script.py --its-args

An installed official `tinker` package stays as it is: only these processes see the alias.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import runpy
import sys
import types
from pathlib import Path

_SHIM_DIR = Path(__file__).resolve().parent / "_tinker_alias"
"""Holds a `tinker` package that installs the alias; child processes find it on PYTHONPATH."""

# Where tinker's modules live in this SDK. Every `tinker.types.*` module is `tinker_client.types`.
_MODULES = {
    "tinker": "tinker_client",
    "tinker.types": "tinker_client.types",
    "tinker.lib.public_interfaces": "tinker_client",
    "tinker.lib.public_interfaces.api_future": "tinker_client.futures",
    "tinker.lib.public_interfaces.backcompat_client_future": "tinker_client.futures",
    "tinker.lib.public_interfaces.backcompat_training_client_future": "tinker_client.training_client",
    "tinker.lib.public_interfaces.backcompat_sampling_client_future": "tinker_client.sampling_client",
    "tinker.lib.public_interfaces.service_client": "tinker_client.service_client",
    "tinker.lib.public_interfaces.training_client": "tinker_client.training_client",
    "tinker.lib.public_interfaces.sampling_client": "tinker_client.sampling_client",
    "tinker.lib.public_interfaces.rest_client": "tinker_client.rest_client",
    "tinker.lib.public_interfaces.admin_client": "tinker_client.admin_client",
    "tinker.lib.public_interfaces.custom_loss": "tinker_client.custom_loss",
}
_PACKAGES = {"tinker.lib"}
"""Intermediate packages with nothing of their own."""


def target_of(name: str) -> str | None:
    """The tinker_client module that stands for tinker module `name`, if any."""
    if name in _MODULES:
        return _MODULES[name]
    if name.startswith("tinker.types."):
        return "tinker_client.types"
    return None


class TinkerAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of `tinker...` with the tinker_client module of the same role."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in _PACKAGES or target_of(fullname) is not None:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if fullname.startswith("tinker."):
            raise ModuleNotFoundError(
                f"{fullname}: the tinker SDK's internal module has no counterpart in tinker_client "
                "(python -m tinker_client.as_tinker serves its public API)",
                name=fullname,
            )
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        target = target_of(spec.name)
        if target is None:
            module = types.ModuleType(spec.name)
            module.__path__ = []
            return module
        module = importlib.import_module(target)
        self._spec_of_target = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system stamped the alias's spec on the real module; give it back its own.
        if target_of(module.__spec__.name) is not None:
            module.__spec__ = self._spec_of_target


def install() -> None:
    """Aliases `tinker` here, and (through PYTHONPATH) in the Python processes started from here."""
    if not any(isinstance(finder, TinkerAlias) for finder in sys.meta_path):
        sys.meta_path.insert(0, TinkerAlias())
    imported = sys.modules.get("tinker")
    if imported is not None and not _is_ours(imported):
        raise RuntimeError(f"the official tinker SDK ({imported.__file__}) was imported before the alias")
    # Children started by multiprocessing get this process's sys.path; others read PYTHONPATH.
    if str(_SHIM_DIR) not in sys.path:
        sys.path.insert(0, str(_SHIM_DIR))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(_SHIM_DIR) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(_SHIM_DIR), *filter(None, paths)])


def _is_ours(module: types.ModuleType) -> bool:
    return module.__name__ == "tinker_client" or Path(module.__file__ or "").is_relative_to(_SHIM_DIR)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        print(__doc__.strip())
        raise SystemExit(0 if args else 2)
    install()
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path.insert(0, str(Path(args[0]).resolve().parent))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
