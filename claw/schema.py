"""Integer types for what the API reads from paths, query strings and bodies. Python's ints
are unbounded but the database's are 64-bit: a larger number reached the driver and came
back as a 500 (OverflowError). Bounding them here answers 422 validation_error instead."""

from typing import Annotated

from pydantic import Field

DB_INT_MAX = 2**63 - 1

# A row id (tasks, agents, checkpoints, …).
Id = Annotated[int, Field(ge=1, le=DB_INT_MAX)]
# An offset, a seq to read after, a version number.
NonNegative = Annotated[int, Field(ge=0, le=DB_INT_MAX)]


class IdConverter:
    """`<id:name>` in page URLs: a row id that fits the database, else no match (404)."""

    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if not 1 <= number <= DB_INT_MAX:
            raise ValueError(value)  # Django reads a ValueError as "this pattern does not match"
        return number

    def to_url(self, value: int) -> str:
        return str(value)
