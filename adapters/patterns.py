"""Regular expressions from adapter configs, matched under a time bound without the GIL.

adapter_config.json may hold regexes (target_modules and exclude_modules as strings,
rank_pattern/alpha_pattern keys, layers_pattern) that PEFT matches with Python's `re`
against module names. A pattern with catastrophic backtracking (`(?:.|\\.|[a-z])*1$`,
`model\\.layers([\\w.]+)+X` under `re`) runs for seconds to hours, and `re` holds the GIL
all that time: every stream of the server stalls. The names are few and short (the
base's module names), so a bound on time is all that is needed:

- Validity follows PEFT: a pattern must compile with `re`, in the form PEFT wraps it in
  (`rf"(.*\\.)?({p})$"` for rank/alpha keys, where `(?i)` mid-pattern fails).
- Matching uses the `regex` package (PyPI; already installed by transformers) with
  `timeout=` (raises TimeoutError) and `concurrent=True` (releases the GIL while it
  matches), in VERSION0, which is `re`'s syntax and semantics. google-re2 is linear
  time, but RE2 is not `re`: no backreferences or lookarounds, so some patterns PEFT
  accepts would be refused or mean something else; a subprocess per match costs
  milliseconds where a match costs a microsecond.
- A pattern of only letters, digits, `_` and `.` (a plain module name, the common case)
  cannot backtrack beyond O(len(name)²) in any of the wrappers: it is matched by `re`
  directly (~10x cheaper, nothing to bound), so a config with hundreds of per-module
  rank_pattern keys stays far under the budget.

One `PatternMatcher` belongs to one adapter config: all its bounded matches together
get MATCH_BUDGET_S; past it the adapter is refused with an AdapterError naming the
field and the pattern. This module knows nothing of adapter types or module names.
"""

from __future__ import annotations

import re
import time
from typing import Union

import regex

from .errors import AdapterError

MATCH_BUDGET_S = 0.1  # all bounded matches of one adapter config together
_LITERAL = re.compile(r"[A-Za-z0-9_.]*")  # no quantifier, group, class or alternation
_Compiled = Union[re.Pattern, "regex.Pattern"]


class PatternMatcher:
    """Compiled patterns of one adapter config and the matching time they have left."""

    def __init__(self, budget_s: float = MATCH_BUDGET_S):
        self.budget_s = budget_s
        self.left = budget_s  # seconds
        self._compiled: dict[str, _Compiled] = {}

    def compile(self, pattern: str, field: str, wrap: tuple[str, str] = ("", "")) -> _Compiled:
        """`wrap[0] + pattern + wrap[1]` compiled (cached); AdapterError naming `field`
        unless `re` compiles it, as PEFT would."""
        full = wrap[0] + pattern + wrap[1]
        c = self._compiled.get(full)
        if c is not None:
            return c
        try:
            checked = re.compile(full)
            c = checked if _LITERAL.fullmatch(pattern) else regex.compile(full, flags=regex.VERSION0)
        except (re.error, regex.error, OverflowError, RecursionError, ValueError) as e:
            shown = f" (as PEFT matches it: {full!r})" if wrap != ("", "") else ""
            raise AdapterError(
                f"adapter_config.json: {field} {pattern!r} is not a valid regular expression{shown}: {e}"
            ) from None
        self._compiled[full] = c
        return c

    def match(
        self, how: str, pattern: str, text: str, field: str, wrap: tuple[str, str] = ("", "")
    ) -> re.Match | regex.Match | None:
        """`re.<how>(wrap[0] + pattern + wrap[1], text)`, how = "match" or "fullmatch"."""
        c = self.compile(pattern, field, wrap)
        if isinstance(c, re.Pattern):  # a literal pattern: nothing to bound
            return getattr(c, how)(text)
        if self.left <= 0:
            raise self._too_slow(pattern, field)
        t0 = time.perf_counter()
        try:
            return getattr(c, how)(text, timeout=self.left, concurrent=True)
        except TimeoutError:
            raise self._too_slow(pattern, field) from None
        finally:
            self.left -= time.perf_counter() - t0

    def _too_slow(self, pattern: str, field: str) -> AdapterError:
        self.left = 0.0
        return AdapterError(
            f"adapter_config.json: {field} {pattern!r} took longer than {self.budget_s * 1e3:.0f} ms to match "
            "the base model's module names; simplify the pattern"
        )
