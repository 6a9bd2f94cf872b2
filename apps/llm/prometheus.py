"""A small reader of the Prometheus text format (what SGLang serves at /metrics), enough for
the backend probe (apps.llm.probe): samples with labels, comments and HELP/TYPE lines
skipped, NaN and ±Inf values, escaped label values, optional timestamps. A line it cannot
read is skipped, never fatal: a backend's metrics are advice, not a contract."""

import math
import re
from dataclasses import dataclass, field

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass(frozen=True)
class Sample:
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


def _labels(line: str, at: int) -> tuple[dict[str, str], int]:
    """Parse `{a="x",b="y"}` starting at line[at] == "{"; returns (labels, index after})."""
    labels: dict[str, str] = {}
    at += 1
    while True:
        while at < len(line) and line[at] in " \t,":
            at += 1
        if at < len(line) and line[at] == "}":
            return labels, at + 1
        match = _LABEL_NAME.match(line, at)
        if match is None:
            raise ValueError("bad label name")
        name, at = match.group(), match.end()
        while at < len(line) and line[at] in " \t":
            at += 1
        if line[at : at + 2] != '="':
            raise ValueError("bad label")
        at += 2
        value = []
        while True:
            if at >= len(line):
                raise ValueError("unterminated label value")
            char = line[at]
            if char == "\\" and at + 1 < len(line):
                value.append(_ESCAPES.get(line[at + 1], "\\" + line[at + 1]))
                at += 2
            elif char == '"':
                at += 1
                break
            else:
                value.append(char)
                at += 1
        labels[name] = "".join(value)


def parse_line(line: str) -> Sample | None:
    """One sample line, or None for a blank line, a comment or a line it cannot read."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    match = _NAME.match(line)
    if match is None:
        return None
    name, at = match.group(), match.end()
    labels: dict[str, str] = {}
    try:
        if at < len(line) and line[at] == "{":
            labels, at = _labels(line, at)
        parts = line[at:].split()
        if not parts:
            return None
        value = float(parts[0])  # also "NaN", "+Inf", "-Inf"
    except (ValueError, IndexError):
        return None
    return Sample(name=name, value=value, labels=labels)


def parse(text: str) -> list[Sample]:
    """Every sample in the text, in order."""
    return [sample for line in text.splitlines() if (sample := parse_line(line)) is not None]


# --- reading SGLang's metrics ------------------------------------------------------------


def _series(samples: list[Sample], name: str) -> list[Sample]:
    """The samples of one metric, without NaNs and without the copies that tensor-parallel
    ranks other than 0 report (SGLang labels its scheduler metrics with tp_rank, pp_rank,
    dp_rank, …; with data-parallel attention each dp_rank is its own series)."""
    return [
        s
        for s in samples
        if s.name == name and not math.isnan(s.value) and s.labels.get("tp_rank", "0") == "0"
    ]


def total(samples: list[Sample], name: str) -> float | None:
    """The sum over a metric's series (requests, tokens per second); None when absent."""
    found = _series(samples, name)
    return sum(s.value for s in found) if found else None


def highest(samples: list[Sample], name: str) -> float | None:
    """The highest of a metric's series (a usage ratio: the fullest rank is what binds)."""
    found = _series(samples, name)
    return max(s.value for s in found) if found else None


def histogram(samples: list[Sample], name: str) -> tuple[float, float] | None:
    """(sum, count) of a histogram over its series (`NAME_sum`, `NAME_count`); None when
    absent. Both are cumulative since the backend started."""
    found_sum, found_count = total(samples, f"{name}_sum"), total(samples, f"{name}_count")
    if found_sum is None or found_count is None:
        return None
    return found_sum, found_count
