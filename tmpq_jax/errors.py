"""The one exception type the CLI turns into a one-line message and exit code 2,
and the key check every config dataclass uses at its boundary."""

import dataclasses
from collections.abc import Mapping


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


def check_keys(cls: type, d: Mapping, what: str) -> None:
    """Refuses keys of `d` that are not fields of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown keys {unknown} in {what}; known: {sorted(known)}.")
