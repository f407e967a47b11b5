"""Exceptions raised by bfq.

Every error that is the user's to fix -- a bad file, a bad argument, an output that cannot be
written -- is a :class:`UserError`: its message is one line that says what is wrong and, where
there is one, what to do; the ``bfq`` command prints it as ``bfq: error: MESSAGE`` and exits 2.

* :class:`BfqFormatError`: a ``.bfq`` file breaks FORMAT.md (malformed, truncated, corrupted or
  hostile); the message names the field and the offending value. Only for that.
* :class:`RecipeError`: a bit recipe (or the sensitivity analysis it comes from) does not fit the
  model or the rules.
* :class:`InputError`: an argument that cannot be used as given (a step count a file was not made
  for, a missing base pipeline, an output that would replace one of the inputs, ...).
* :class:`OutputError`: an output path cannot be written (read-only file system, full disk, a file
  where a folder should be); the message names the path. Also an ``OSError``.

The first three are also ``ValueError``s, so callers that only care about "bad input" can catch that.
"""


class UserError(Exception):
    """Base of the errors the user can fix; the message is one line."""


class BfqFormatError(UserError, ValueError):
    """A ``.bfq`` file is not valid: the message names the field and the offending value."""


class RecipeError(UserError, ValueError):
    """A bit recipe (or the analysis it came from) does not fit the model or the rules."""


class InputError(UserError, ValueError):
    """An argument (a value, a path, a combination) cannot be used as given."""


class OutputError(UserError, OSError):
    """An output file cannot be written where it was asked for; the old file, if any, is untouched."""
