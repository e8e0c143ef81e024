"""Name -> function registries, and calling a registered function with the inputs it declares.

Each registered function keeps its natural signature (tensors of documented shape plus a mask, plain keyword
options). A trainer holding a pool of named inputs calls ``registry.call(name, **inputs)``: only the parameters
the function declares are passed, and a missing required input is an error that names it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class Registry:
    """A named collection of functions of one kind (advantage estimators, policy losses, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._functions: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers ``fn`` under ``name``; a name can be registered once."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._functions:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._functions[name] = fn
            return fn

        return decorate

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._functions)

    def get(self, name: str) -> Callable[..., Any]:
        """The function registered as ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
        try:
            return self._functions[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}") from None

    def inputs(self, name: str) -> tuple[list[str], list[str]]:
        """``(required, optional)`` parameter names of the function registered as ``name``."""
        params = inspect.signature(self.get(name)).parameters.values()
        required = [p.name for p in params if p.default is inspect.Parameter.empty]
        optional = [p.name for p in params if p.default is not inspect.Parameter.empty]
        return required, optional

    def call(self, name: str, /, **available: Any) -> Any:
        """Call ``name`` with the subset of ``available`` that its signature declares.

        Inputs the function does not take are ignored (a trainer passes one pool to every estimator);
        a required input that is absent or ``None`` raises ``TypeError`` naming it.
        """
        required, optional = self.inputs(name)
        missing = [p for p in required if available.get(p) is None]
        if missing:
            raise TypeError(f"{self.kind} {name!r} needs {', '.join(missing)}; it takes {required + optional}")
        kwargs = {p: available[p] for p in required + optional if p in available}
        return self.get(name)(**kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._functions
