"""The errors paretoopt raises on purpose.

Every user-facing error derives from :class:`ParetoError`; the CLI turns it into one line
on stderr and exit code 2. Messages state where the problem came from (a YAML path or a
flag), the rule and the value, and list the options where there are some.
"""

from __future__ import annotations

from typing import Any


class ParetoError(Exception):
    """Root of paretoopt's deliberate errors: bad input, not a bug."""


class SpaceError(ParetoError):
    """The search-space file breaks a rule of the schema."""


class PlanError(ParetoError):
    """A compression plan holds a value that no technique accepts."""


class ArtifactError(ParetoError):
    """A stored artifact is missing, damaged or does not fit the model."""


class TrialError(ParetoError):
    """A trial cannot finish (diverged fine-tuning, a plan the model cannot take)."""


class StudyError(ParetoError):
    """A study in results/ cannot be opened or resumed as asked."""


def one_line(message: str) -> str:
    """Errors are shown on one line: a user module's multi-line message is folded."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def shown(value: Any, limit: int = 60) -> str:
    """A user's value in a message, cut to `limit` characters: a message stays one short
    line whatever the file held."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
