"""The one exception type the CLI turns into a one-line message and exit code 2,
and the key check every config dataclass uses at its boundary."""

import dataclasses
from collections.abc import Mapping


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class ArgumentError(UserError):
    """A bad argument of a library function, named as the function names it:
    `text` holds `{arg}` where the argument goes (`"{arg}=0: use 1 to 1000."` reads
    `num_steps=0: use 1 to 1000.`). A front end that calls the argument otherwise
    rewords it with `renamed` (the CLI: `--steps=0: use 1 to 1000.`)."""

    def __init__(self, arg: str, text: str):
        self.arg, self.text = arg, text
        super().__init__(text.replace("{arg}", arg))

    def renamed(self, name: str) -> "ArgumentError":
        return ArgumentError(name, self.text)


def check_keys(cls: type, d: Mapping, what: str) -> None:
    """Refuses keys of `d` that are not fields of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown keys {unknown} in {what}; known: {sorted(known)}.")
