"""One exception type for bad user input.

Every check on user input raises `LdmError` with one line that names the problem and
the fix. The command-line entry points print that line and exit with status 2 instead
of a traceback (see `ldm.cli.common.run_main`).
"""


class LdmError(Exception):
    """A user-facing error: the message is one line naming the problem and the fix."""
