"""Exceptions raised by bfq.

Every problem found in a ``.bfq`` file -- malformed, truncated, corrupted or hostile -- raises
:class:`BfqFormatError`. Problems with a recipe or a sensitivity file raise :class:`RecipeError`.
Both subclass :class:`ValueError`, so callers that only care about "bad input" can catch that.
"""


class BfqFormatError(ValueError):
    """A ``.bfq`` file is not valid: the message names the field and the offending value."""


class RecipeError(ValueError):
    """A bit recipe (or the analysis it came from) does not fit the model or the rules."""
