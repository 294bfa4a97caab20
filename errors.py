"""The one exception type of flowerclf: a problem the user can act on, printed as one line."""
from __future__ import annotations


class FlowerclfError(Exception):
    """Raised by library code with the file, the problem and the fix; scripts print it as `error: ...`.

    `exit_code` is 2 for bad input (the default) and 1 for a run that failed part-way.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
