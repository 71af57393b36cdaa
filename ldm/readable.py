"""Files from outside (model folders, caches, logs) read as untrusted input: a file that is not what
it should be (not UTF-8, not JSON or YAML, a safetensors header that does not parse, a pickle that
a weights-only load refuses) is one `LdmError` line naming it, not a traceback from deep inside a
loader. Nothing here ever unpickles: the loaders it wraps load weights-only or safetensors.
"""

from contextlib import contextmanager

from ldm.errors import LdmError


@contextmanager
def reading(path, what: str, fix: str = ""):
    """Run the block that reads `path` (`what` it should be); its failure becomes one line."""
    try:
        yield
    except LdmError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read is the refusal; the reason is kept short
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise LdmError(f"{path} is not {what} ({type(e).__name__}: {reason})" + (f"; {fix}" if fix else "")) from None
