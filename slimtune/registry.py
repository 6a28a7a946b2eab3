"""Plain registries for plug-ins: a dict from the name users type (`method=lora`, `strategy=ddp`) to a class.

Four axes: METHODS (`method=`), STRATEGIES (`strategy=`), WORKLOADS (what is trained on, chosen by the model
family) and FAMILIES (the kind of model: slimtune's GPT, a Hugging Face causal LM or classifier), which
`slimtune.families.family_of` picks from the config.

A class registers itself where it is defined, with a decorator; nothing else in slimtune keeps a list of names or
branches on them. An unknown name is an error that lists the registered ones.

Plug-ins outside slimtune: the environment variable `SLIMTUNE_PLUGINS=package.module[,other.module]` names modules
that are imported, after slimtune's own, the first time a registry is read; each registers its classes as
slimtune's modules do (`@METHODS.register("mine")`). Then `slimtune train method=mine` works like a built-in name,
also in the processes a launcher starts (torchrun passes the environment on). It is an environment variable rather
than a config key because the config is parsed through the registries: a plug-in's section must be known first.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from typing import Callable, Generic, TypeVar

from slimtune.errors import SlimtuneError

T = TypeVar("T")

PLUGINS_ENV = "SLIMTUNE_PLUGINS"
"""Environment variable: comma-separated modules that register plug-ins (see the module docstring)."""


def import_plugin_modules() -> list[str]:
    """Import the modules `SLIMTUNE_PLUGINS` names (already imported ones are not run again); returns their names."""
    names = [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SlimtuneError(f"{PLUGINS_ENV} names the module {name!r}, which cannot be imported ({exc}): make it "
                                f"importable (installed, or on PYTHONPATH), or remove it from {PLUGINS_ENV}") from None
    return names


class Registry(Generic[T]):
    """Names → classes for one kind of plug-in (`kind` is the config key that selects one, e.g. "method")."""

    def __init__(self, kind: str, package: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}
        self._package = package
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: `@METHODS.register("lora")`. The class gets `name` as its `name` attribute."""

        def add(cls: type[T]) -> type[T]:
            existing = self._classes.get(name)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({existing.__qualname__}, {cls.__qualname__})")
            cls.name = name
            self._classes[name] = cls
            return cls

        return add

    def unregister(self, name: str) -> None:
        self._classes.pop(name, None)

    def _load_builtins(self) -> None:
        # Every module of the package registers what it defines when imported. Imported on first use, so that
        # `import slimtune.config` (and `slimtune --help`) does not import torch; optional libraries (peft,
        # bitsandbytes, deepspeed) are imported by the plug-ins only when they are used.
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self._package)
            # A package registers what its modules define; a plain module (workloads, families) what it defines.
            for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
                importlib.import_module(f"{self._package}.{info.name}")
            import_plugin_modules()

    def names(self) -> list[str]:
        self._load_builtins()
        return list(self._classes)

    def classes(self) -> dict[str, type[T]]:
        self._load_builtins()
        return dict(self._classes)

    def get(self, name: str) -> type[T]:
        self._load_builtins()
        if name not in self._classes:
            hint = difflib.get_close_matches(name, list(self._classes), n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise SlimtuneError(f"{self.kind}={name!r} is not one of {', '.join(sorted(self._classes))}.{did_you_mean}")
        return self._classes[name]


METHODS: Registry = Registry("method", "slimtune.methods")
STRATEGIES: Registry = Registry("strategy", "slimtune.parallel")
WORKLOADS: Registry = Registry("workload", "slimtune.train.workloads")
FAMILIES: Registry = Registry("model family", "slimtune.families")
