"""The library's exception types for problems with what the user passed in.

:class:`UserInputError` marks a bad argument or input that is detected before any work is done
(a ValueError, so ``except ValueError`` keeps working). The command line turns it into one line on
stderr and exit code 2; every other exception is a bug or an environment failure and keeps its
traceback.
"""


class UserInputError(ValueError):
    """A bad argument or input (named in the message), detected before any work was done."""
