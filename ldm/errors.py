"""One exception type for bad user input.

Every check on user input raises `LdmError` with one line that names the problem and
the fix. The command-line entry points print that line and exit with status 2 instead
of a traceback (see `ldm.cli.common.run_main`).
"""


class LdmError(Exception):
    """A user-facing error: the message is one line naming the problem and the fix."""

    def __init__(self, *args):
        # A DataLoader worker's LdmError comes back re-raised as LdmError("Caught LdmError in
        # DataLoader worker process 0.\nOriginal Traceback ...\nldm.errors.LdmError: MESSAGE\n"):
        # keep MESSAGE, so an error met in a worker (a webdataset sample without its control)
        # is still one line.
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught LdmError"):
            args = (args[0].rstrip("\n").rsplit("LdmError: ", 1)[-1],)
        super().__init__(*args)
