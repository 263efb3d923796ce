"""One validation layer for every constructor argument: declared once per class, checked
before anything is built, one error naming the field, the value and what is allowed.

    class FedProx(FederatedCallback):
        @arguments(mu=Real(ge=0))
        def __init__(self, mu: float = 0.01) -> None: ...

``FedProx(mu=float("inf"))`` raises ``ConfigError: `FedProx.mu` must be a finite number >= 0,
got inf.`` Bools are not ints here, NaN and infinities are never numbers, and every rule can
list values it refuses (:meth:`Rule.refused`), which the property-based tests draw from.

Hand-written rather than pydantic's ``validate_call``: jsonargparse (LightningCLI) reads the
constructors' signatures, which must stay plain ``int``/``float`` annotations, and the messages
follow the project's one-line ``Class.field`` form.
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """A setting outside what it allows; the message names the field and the value."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Rule(ABC):
    """What one argument allows."""

    optional: bool = False

    @abstractmethod
    def allows(self, value: Any) -> bool:
        """Whether ``value`` (not ``None``) is allowed."""

    @abstractmethod
    def describe(self) -> str:
        """What is allowed, as the end of "must be ..."."""

    @abstractmethod
    def refused(self) -> list[Any]:
        """Values this rule must refuse (for tests)."""

    def check(self, where: str, value: Any) -> None:
        """Raise :class:`ConfigError` unless ``value`` is allowed."""
        if value is None and self.optional:
            return
        if not self.allows(value):
            allowed = ("None or " if self.optional else "") + self.describe()
            raise ConfigError(f"`{where}` must be {allowed}, got {value!r}.")


def _bounds(ge: Any, gt: Any, le: Any, lt: Any) -> str:
    parts = [
        f"{op} {v}" for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if v is not None
    ]
    return " and ".join(parts)


def _in_bounds(value: float, ge: Any, gt: Any, le: Any, lt: Any) -> bool:
    return (
        (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    )


def _outside(ge: Any, gt: Any, le: Any, lt: Any, step: float) -> list[Any]:
    return [
        v
        for v in (
            None if ge is None else ge - step,
            gt,
            None if le is None else le + step,
            lt,
        )
        if v is not None
    ]


@dataclass(frozen=True)
class Int(Rule):
    """An int (not a bool) within the bounds."""

    ge: int | None = None
    le: int | None = None
    optional: bool = False

    def allows(self, value: Any) -> bool:
        return _is_int(value) and _in_bounds(value, self.ge, None, self.le, None)

    def describe(self) -> str:
        bounds = _bounds(self.ge, None, self.le, None)
        return "an int" + (f" {bounds}" if bounds else "")

    def refused(self) -> list[Any]:
        return [True, 1.5, "1", *_outside(self.ge, None, self.le, None, 1)] + (
            [] if self.optional else [None]
        )


@dataclass(frozen=True)
class Real(Rule):
    """A finite number (int or float, not a bool) within the bounds."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    optional: bool = False

    def allows(self, value: Any) -> bool:
        return (
            _is_number(value)
            and math.isfinite(value)
            and _in_bounds(value, self.ge, self.gt, self.le, self.lt)
        )

    def describe(self) -> str:
        bounds = _bounds(self.ge, self.gt, self.le, self.lt)
        return "a finite number" + (f" {bounds}" if bounds else "")

    def refused(self) -> list[Any]:
        out = [math.nan, math.inf, -math.inf, True, "0.5"]
        return (
            out
            + _outside(self.ge, self.gt, self.le, self.lt, 1e-3)
            + ([] if self.optional else [None])
        )


@dataclass(frozen=True)
class Choice(Rule):
    """One of ``options``."""

    options: tuple[Any, ...]
    optional: bool = False

    def allows(self, value: Any) -> bool:
        return isinstance(value, type(self.options[0])) and value in self.options

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def refused(self) -> list[Any]:
        return ["not-an-option", 1] + ([] if self.optional else [None])


@dataclass(frozen=True)
class Flag(Rule):
    """``True`` or ``False`` (not 0/1, not a string)."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"

    def refused(self) -> list[Any]:
        return [1, 0, "yes", None]


@dataclass(frozen=True)
class ClientIds(Rule):
    """A list of distinct client ids (ints >= 0); whether they exist is checked against the
    federation by :func:`check_client_ids` once the number of clients is known."""

    optional: bool = False

    def allows(self, value: Any) -> bool:
        return (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and all(_is_int(c) and c >= 0 for c in value)
            and len(set(value)) == len(value)
        )

    def describe(self) -> str:
        return "a list of distinct client ids (ints >= 0)"

    def refused(self) -> list[Any]:
        return [[1.7], [-1], [True], "1", [2, 2], 3] + ([] if self.optional else [None])


@dataclass(frozen=True)
class Items(Rule):
    """A list (or tuple) of ``min_len`` to ``max_len`` items, each allowed by ``item``
    (layer widths, name prefixes)."""

    item: Rule
    min_len: int = 1
    max_len: int | None = None
    optional: bool = False

    def allows(self, value: Any) -> bool:
        return (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and self.min_len <= len(value) <= (self.max_len or len(value))
            and all(self.item.allows(v) for v in value)
        )

    def describe(self) -> str:
        if self.max_len is None:
            count = "any number of" if self.min_len == 0 else f"at least {self.min_len}"
        elif self.max_len == self.min_len:
            count = str(self.min_len)
        else:
            count = f"{self.min_len} to {self.max_len}"
        return f"a list of {count} item(s), each {self.item.describe()}"

    def refused(self) -> list[Any]:
        bad_item = next(v for v in self.item.refused() if v is not None)
        out = ["12", 3, [bad_item], [None]]
        if self.min_len > 0:
            out.append([])
        return out + ([] if self.optional else [None])


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value)

    def describe(self) -> str:
        return "a non-empty string"

    def refused(self) -> list[Any]:
        return ["", 3, None]


@dataclass(frozen=True)
class AnyOf(Rule):
    """Allowed by one of ``rules`` (e.g. an int count or a fraction)."""

    rules: tuple[Rule, ...]
    optional: bool = False

    def allows(self, value: Any) -> bool:
        return any(r.allows(value) for r in self.rules)

    def describe(self) -> str:
        return " or ".join(r.describe() for r in self.rules)

    def refused(self) -> list[Any]:
        candidates = [v for r in self.rules for v in r.refused()]
        return [v for v in candidates if not self.allows(v) and not (v is None and self.optional)]


def check(owner: str, rules: Mapping[str, Rule], values: Mapping[str, Any]) -> None:
    """Check ``values`` (by argument name) against ``rules``; the first failure raises.

    Raises:
        ConfigError: naming ``owner.name``, the value and what is allowed.
    """
    for name, rule in rules.items():
        if name in values:
            rule.check(f"{owner}.{name}", values[name])


def check_client_ids(where: str, ids: Sequence[int] | None, num_clients: int) -> None:
    """Every id in ``ids`` names a client of a federation of ``num_clients``.

    Raises:
        ConfigError: an id that does not exist.
    """
    missing = sorted(c for c in ids or () if c >= num_clients)
    if missing:
        raise ConfigError(
            f"`{where}` names clients {missing}, but the federation has clients "
            f"0..{num_clients - 1}."
        )


def arguments(**rules: Rule) -> Callable[[F], F]:
    """Decorate an ``__init__``: its arguments are checked against ``rules`` before it runs
    (the owner in messages is the class being built). The rules stay readable as
    ``cls.__init__.argument_rules`` (merged with those of the classes it extends)."""

    def decorate(init: F) -> F:
        signature = inspect.signature(init)
        unknown = set(rules) - set(signature.parameters)
        if unknown:
            raise TypeError(f"Rules for arguments {sorted(unknown)} that {init} does not take.")

        @functools.wraps(init)
        def checked(self: Any, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            check(type(self).__name__, rules, bound.arguments)
            init(self, *args, **kwargs)

        checked.argument_rules = dict(rules)  # type: ignore[attr-defined]
        return checked  # type: ignore[return-value]

    return decorate


def argument_rules(cls: type) -> dict[str, Rule]:
    """The rules of ``cls``'s constructor arguments, also those declared by the constructors
    it extends (for the arguments it still takes)."""
    merged: dict[str, Rule] = {}
    for klass in reversed(cls.__mro__):
        merged.update(getattr(klass.__dict__.get("__init__"), "argument_rules", {}))
    takes = inspect.signature(cls.__init__).parameters
    return {name: rule for name, rule in merged.items() if name in takes}
