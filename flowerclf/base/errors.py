"""The one exception type of flowerclf: a problem the user can act on, printed as one line."""
from __future__ import annotations


class FlowerclfError(Exception):
    """Raised by library code with the file, the problem and the fix; scripts print it as `error: ...`.

    `exit_code` is 2 for bad input (the default) and 1 for a run that failed part-way.
    """

    def __init__(self, message: str, exit_code: int = 2):
        # torch's DataLoader re-raises a worker's error as type(e)("Caught ... Original Traceback ...
        # FlowerclfError: message"): keep the message, not the worker's traceback
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            message = message.rsplit(f"{type(self).__name__}: ", 1)[-1].strip()
        super().__init__(message)
        self.exit_code = exit_code


def brief(e: BaseException, limit: int = 200) -> str:
    """A foreign exception in a few words for an error line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__
