"""Algorithm registry.

Every module in this package is discovered automatically; a module registers its classes with::

    from fedrac.algorithms import register
    from fedrac.algorithms.base import Algorithm

    @register("myalgo", aliases=("my-algo",))
    class MyAlgo(Algorithm):
        options = {...}
        ...

so adding an algorithm is adding one file. ``get(name)`` returns the class (names are
case-insensitive); ``available()`` lists the registered names; ``options_of(name)`` returns the
merged option declarations of the class and its bases (what ``--set`` accepts for it).
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable

from ..config import ConfigError, Option

_REGISTRY: dict[str, type] = {}
_ALIASES: dict[str, str] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_DISCOVERED = False


def register(name: str, *, aliases: tuple = ()) -> Callable[[type], type]:
    """Class decorator: make the algorithm available as ``name`` (and ``aliases``)."""
    key = name.lower()

    def deco(cls: type) -> type:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"algorithm name {name!r} registered twice "
                             f"({_REGISTRY[key].__module__} and {cls.__module__})")
        cls.name = key
        _REGISTRY[key] = cls
        for a in aliases:
            _ALIASES[a.lower()] = key
        return cls

    return deco


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as e:  # noqa: BLE001 - reported when the user asks for this module
            _IMPORT_ERRORS[info.name] = f"{type(e).__name__}: {e}"


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> type:
    """The algorithm class called ``name``; ConfigError (with the nearest names) if unknown."""
    _discover()
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _IMPORT_ERRORS:
        raise ConfigError(f"algorithm {name!r} failed to import ({_IMPORT_ERRORS[key]}); fix "
                          f"fedrac/algorithms/{key}.py")
    names = sorted(set(_REGISTRY) | set(_ALIASES))
    near = difflib.get_close_matches(key, names, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
    raise ConfigError(f"unknown algorithm {name!r}; {hint}available: {', '.join(available())}")


def options_of(name_or_cls, *, strict: bool = False) -> dict[str, Option]:
    """Merged option declarations along the class hierarchy (subclass entries win).

    An option may not reuse a core key (``fedrac.config.CORE``): the core keys are shared by every
    algorithm and the loop reads them. Such options are left out here; with ``strict=True`` (what a
    run of that algorithm uses) they are a ConfigError naming the module.
    """
    from ..config import CORE

    cls = get(name_or_cls) if isinstance(name_or_cls, str) else name_or_cls
    merged: dict[str, Option] = {}
    for klass in reversed(cls.__mro__):
        merged.update(getattr(klass, "__dict__", {}).get("options", {}) or {})
    clash = sorted(set(merged) & set(CORE))
    if clash and not strict:
        return {k: v for k, v in merged.items() if k not in CORE}
    if clash:
        raise ConfigError(f"algorithm {getattr(cls, 'name', cls.__name__)!r} ({cls.__module__}) declares option(s) "
                          f"{', '.join(clash)} that are core keys; rename them (e.g. "
                          f"{getattr(cls, 'name', 'algo')}_{clash[0]})")
    return merged


def _options_or_empty(name: str) -> dict[str, Option]:
    try:
        return options_of(name)
    except ConfigError:     # a module that fails to import
        return {}


def foreign_options(name: str) -> dict[str, str]:
    """Option keys of the *other* algorithms -> their owner (for 'belongs to X' messages)."""
    own = set(_options_or_empty(name))
    out: dict[str, str] = {}
    for other in available():
        for key in _options_or_empty(other):
            if key not in own:
                out.setdefault(key, other)
    return out


def all_options() -> dict[str, dict[str, Option]]:
    """Every algorithm's options (an algorithm whose declaration is invalid is listed without them)."""
    return {name: _options_or_empty(name) for name in available()}


__all__ = ["register", "get", "available", "options_of", "foreign_options", "all_options"]
