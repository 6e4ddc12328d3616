"""One error type per layer of the tool; each lists every problem it found at once. They live here,
in the lowest layer, so that ir/ and backends/ raise them without importing tintc/."""

from __future__ import annotations


class TintcError(Exception):
    """Base error: a headline and the list of problems, each saying where and what is allowed."""

    stage = "tintc"

    def __init__(self, problems: list[str] | str, headline: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.headline = headline or f"{self.stage} error"
        super().__init__(self.format())

    def format(self) -> str:
        if len(self.problems) == 1:
            return f"{self.headline}: {self.problems[0]}"
        lines = [f"{self.headline}: {len(self.problems)} problems"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(TintcError):
    stage = "config"


class FrontendError(TintcError):
    stage = "frontend"


class IRError(TintcError):
    stage = "ir"


class PassError(TintcError):
    stage = "pass"


class BackendError(TintcError):
    stage = "backend"


class OutputError(TintcError):
    stage = "output"
