"""The one error type for problems of the user's making (bad settings, paths, data).

Every domain error a user can fix subclasses `UserError`; the CLI prints exactly these as one
`error:` line with exit status 2. Anything else is a bug and keeps its traceback (status 1).
It subclasses ValueError so callers that expect a ValueError for bad input still work.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a setting, a path or a dataset the user can fix. Raised before work starts where possible."""
