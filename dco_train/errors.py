"""The one exception type for mistakes a user can fix (bad input, bad settings)."""

from __future__ import annotations


class DCOError(ValueError):
    """A problem with the user's input, stated as a full sentence that says how to fix it.

    The command line prints these without a traceback and the ComfyUI nodes show them as node
    errors. Programming errors keep their ordinary exception types.
    """
