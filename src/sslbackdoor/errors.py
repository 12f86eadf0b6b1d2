"""The one exception type for bad user input.

Anything a user can get wrong (a path, a class index, a trigger size, a config field, a
corrupt checkpoint) raises `UserInputError` with a single line naming what is wrong and
what would be valid. The CLI turns it into exit code 2 without a traceback.
"""


class UserInputError(ValueError):
    """Bad input from the user; the message is one line, shown verbatim."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message (or its type), for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
