"""The one exception type the CLI turns into a one-line message and exit code 2,
and the key check every config dataclass uses at its boundary."""

import dataclasses
import re
from collections.abc import Mapping


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class ArgumentError(UserError):
    """A bad argument of a library function, named as the function names it.
    `text` holds `{arg}` where this argument goes, and `{name}` where another
    argument is named (`"{arg}=0: use 1 to 1000."` reads `num_steps=0: use 1 to
    1000.`). A front end that calls arguments otherwise rewords the message with
    `renamed` (the CLI: `--steps=0: use 1 to 1000.`)."""

    def __init__(self, arg: str, text: str):
        self.arg, self.text = arg, text
        super().__init__(self._words({}))

    def _words(self, names: Mapping[str, str]) -> str:
        def name(m):
            key = self.arg if m[1] == "arg" else m[1]
            return names.get(key, key)

        return re.sub(r"\{(\w+)\}", name, self.text)

    def renamed(self, names: str | Mapping[str, str]) -> "ArgumentError":
        """The same error, its arguments named by `names` (a name for this one, or
        {argument: name}); arguments it does not name keep their own names."""
        if isinstance(names, str):
            names = {self.arg: names}
        err = ArgumentError(self.arg, self.text)
        err.args = (self._words(names),)
        return err


def check_keys(cls: type, d: Mapping, what: str) -> None:
    """Refuses keys of `d` that are not fields of the dataclass `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown keys {unknown} in {what}; known: {sorted(known)}.")
