"""What every command-line entry point shares: one-line errors instead of tracebacks."""

import sys

from ldm.errors import LdmError


def run_main(main, argv=None) -> int:
    """Run `main(argv)`; print an `LdmError` as one line on stderr and exit with status 2."""
    try:
        return main(argv) or 0
    except LdmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
