"""Collecting a config's problems: every problem is reported at once, each naming its key and value."""

from __future__ import annotations

import contextlib
import math

from tunelens.errors import ConfigError


def config_error(problems: list[str]) -> ConfigError:
    """One ConfigError listing every problem (its `.problems`), so a user fixes them all in one run."""
    problems = list(dict.fromkeys(problems))
    message = problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems)
    error = ConfigError(message)
    error.problems = problems
    return error


class Problems:
    """Collects the problems of a config instead of stopping at the first one.

    `with problems.check():` around one independent check records its ConfigError. Once the config has
    schema errors (`broken`), a later check may meet a value of the wrong type or a missing key; such an
    exception is the schema error's consequence, already reported, and is dropped.
    """

    def __init__(self, messages: list[str] | None = None):
        self.messages: list[str] = messages if messages is not None else []
        self.broken = False

    def add(self, message: str) -> None:
        self.messages.append(message)

    @contextlib.contextmanager
    def check(self):
        try:
            yield
        except ConfigError as exc:
            self.messages.extend(getattr(exc, "problems", None) or [str(exc)])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            if not self.broken:
                raise

    def raise_any(self) -> None:
        if self.messages:
            raise config_error(self.messages)


def non_finite_numbers(node, path: str = "") -> list[tuple[str, float]]:
    """(key path, value) of every NaN or infinite number anywhere in the config."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += non_finite_numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += non_finite_numbers(value, f"{path}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        found.append((path, node))
    return found


def _drop_non_finite(node) -> None:
    """Remove NaN/infinite values (already reported) so the other checks see defaults, not NaN."""
    if isinstance(node, dict):
        for key in [k for k, v in node.items() if isinstance(v, float) and not math.isfinite(v)]:
            del node[key]
        for value in node.values():
            _drop_non_finite(value)
    elif isinstance(node, list):
        node[:] = [v for v in node if not (isinstance(v, float) and not math.isfinite(v))]
        for value in node:
            _drop_non_finite(value)

