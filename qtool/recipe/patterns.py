"""Matching the recipe's name regexes against names the model chose, in bounded time.

A pattern such as `(a+)+$` backtracks exponentially on a name like `aaaa...a!` under Python's `re`;
names come from the model, so every match runs under the `regex` package's timeout (same syntax as
`re`) and a match that runs over it is a RecipeError naming the pattern.
"""

from __future__ import annotations

from functools import lru_cache

import regex

from qtool.errors import RecipeError

MATCH_TIMEOUT_S = 1.0  # per name; ordinary patterns take microseconds


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> regex.Pattern:
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except regex.error as exc:
        raise RecipeError(f"recipe pattern {pattern!r} is not a valid regular expression: {exc}") from None


def fullmatch(pattern: str, name: str) -> bool:
    """Whether the whole of `name` matches `pattern` (as re.fullmatch), or a RecipeError within
    MATCH_TIMEOUT_S."""
    try:
        return _compiled(pattern).fullmatch(name, timeout=MATCH_TIMEOUT_S) is not None
    except TimeoutError:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise RecipeError(f"recipe pattern {pattern!r} took over {MATCH_TIMEOUT_S:g} s to match the name "
                          f"{shown!r} ({len(name)} characters): nested repeats such as (a+)+ backtrack "
                          "without end; simplify the pattern") from None
