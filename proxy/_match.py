"""Which route a request takes: matches on path, method, headers and query parameters. Sans-I/O.

Semantics follow Istio's HTTPMatchRequest: within one match every condition must hold; a route
with several matches takes a request that satisfies any of them; a route without matches takes
everything. String matches are ``exact``, ``prefix`` or ``regex``; a regex must match the whole
value (RE2 syntax, linear time: a route cannot be turned into a denial of service).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import re2

#: A regex longer than this in a config is refused: RE2 is linear in the input, not in the program.
MAX_REGEX_LEN = 1024


class MatchError(ValueError):
    pass


@dataclass(frozen=True)
class StringMatch:
    kind: str  # exact | prefix | regex | present
    value: str = ""
    _regex: object = field(default=None, compare=False, repr=False)

    @classmethod
    def make(cls, kind: str, value: str = "") -> "StringMatch":
        if kind not in ("exact", "prefix", "regex", "present"):
            raise MatchError(f"unknown match kind {kind!r}; one of exact, prefix, regex, present")
        if kind == "regex":
            if len(value) > MAX_REGEX_LEN:
                raise MatchError(f"regex longer than {MAX_REGEX_LEN} characters")
            try:
                compiled = re2.compile(value)
            except re2.error as exc:
                raise MatchError(f"regex {value!r} does not compile: {exc}") from None
            return cls(kind, value, compiled)
        return cls(kind, value)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.kind == "exact":
            return value == self.value
        if self.kind == "prefix":
            return value.startswith(self.value)
        if self.kind == "regex":
            return self._regex.fullmatch(value) is not None
        return True  # present


@dataclass(frozen=True)
class RequestMatch:
    path: StringMatch | None = None
    methods: frozenset[str] = frozenset()
    headers: tuple[tuple[str, StringMatch], ...] = ()  # names lower-case
    query: tuple[tuple[str, StringMatch], ...] = ()

    def matches(self, method: str, path: str, header: Callable[[str], str | None], query: Mapping[str, str]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        for name, m in self.headers:
            if not m.matches(header(name)):
                return False
        for name, m in self.query:
            if not m.matches(query.get(name)):
                return False
        return True


def any_matches(matches: tuple[RequestMatch, ...], method: str, path: str, header, query) -> bool:
    return not matches or any(m.matches(method, path, header, query) for m in matches)
