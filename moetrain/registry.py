"""Names a config can use for pluggable parts: model families, MoE routers, dispatch algorithms.

Each registry maps a name to an object (a class or a function). Built-in entries are written as
``"module:attribute"`` strings and imported on first use, so listing and checking names (config
validation, ``moetrain validate``) needs neither torch nor the modules that implement them.

A user's part plugs in two ways:
- ``ROUTERS.register("mine", MyRouter)`` (or as a decorator) in the process that builds the model:
  scripts that build models themselves, and ranks started by torchrun / srun / mpiexec that import
  the user's module;
- the name ``"package.module:MyRouter"`` in the config (``moe.router: mypkg.routing:MyRouter``): every
  rank imports it, whichever launcher started it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "MODEL_FAMILIES", "ROUTERS", "DISPATCHERS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> object`` for the config key ``key``; built-ins resolve lazily from import paths."""

    def __init__(self, key: str, builtins: dict[str, str]):
        self.key = key
        self._paths = dict(builtins)
        self._objects: dict[str, T] = {}

    def names(self) -> list[str]:
        """Every registered name (import paths ``module:attr`` are accepted too, but not listed)."""
        return sorted({*self._paths, *self._objects})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._paths or name in self._objects or _is_import_path(name))

    def register(self, name: str, obj: T | None = None) -> Any:
        """Add ``obj`` under ``name`` (also usable as ``@registry.register(name)``); a name is taken once."""
        if not name or ":" in name:
            raise ValueError(f"{self.key}: a registered name needs no ':' (got {name!r})")

        def add(o: T) -> T:
            if name in self._paths or (name in self._objects and self._objects[name] is not o):
                raise ValueError(f"{self.key}: {name!r} is already registered")
            self._objects[name] = o
            return o

        return add if obj is None else add(obj)

    def check(self, name: str) -> str | None:
        """None when ``name`` is usable, else the reason (for a config error)."""
        if name in self:
            return None
        known = ", ".join(repr(n) for n in self.names())
        return f"unknown name {name!r}; expected one of {known} (or an import path 'package.module:Name')"

    def get(self, name: str) -> T:
        """The object for ``name``, importing a built-in or an import path on first use."""
        if name in self._objects:
            return self._objects[name]
        path = self._paths.get(name, name if _is_import_path(name) else None)
        if path is None:
            raise ValueError(f"{self.key}: {self.check(name)}")
        module, _, attr = path.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"{self.key}: cannot import {path!r} ({exc})") from None
        self._objects[name] = obj
        return obj


def _is_import_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()


MODEL_FAMILIES: Registry[Callable[..., Any]] = Registry("model.family", {
    "llama": "moetrain.models.llama:LlamaSpec",
    "mixtral": "moetrain.models.llama:MixtralSpec",
    "qwen2_moe": "moetrain.models.llama:Qwen2MoeSpec",
    "qwen3_moe": "moetrain.models.llama:Qwen3MoeSpec",
    "olmoe": "moetrain.models.llama:OlmoeSpec",
    "deepseek_v3": "moetrain.models.llama:DeepseekV3Spec",
})
"""Model specs (:class:`moetrain.models.spec.ModelSpec` subclasses)."""

ROUTERS: Registry[Callable[..., Any]] = Registry("moe.router", {
    "topk": "moetrain.moe.routers:TopKRouter",
    "switch": "moetrain.moe.routers:SwitchRouter",
    "gshard": "moetrain.moe.routers:GShardRouter",
    "sigmoid": "moetrain.moe.routers:SigmoidRouter",
    "xmoe": "moetrain.moe.routers:XMoERouter",
    "expert_choice": "moetrain.moe.routers:ExpertChoiceRouter",
    "softmoe": "moetrain.moe.routers:SoftMoERouter",
})
"""MoE routers (:class:`moetrain.moe.routers.Router` subclasses)."""

DISPATCHERS: Registry[Callable[..., Any]] = Registry("moe.dispatch", {
    "flat": "moetrain.moe.dispatch:flat_steps",
    "hier2d": "moetrain.moe.dispatch:hier2d_steps",
    "hier1d": "moetrain.moe.dispatch:hier1d_steps",
})
"""Dispatch algorithms: functions from a :class:`moetrain.moe.dispatch.Counts` view to plan steps."""
