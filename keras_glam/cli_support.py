"""What every keras_glam command (`glam-train`, `glam-plan`, ...) shares: quiet start-up, one-line
errors, exit code 2.

A command parses its arguments before it imports anything heavy (an instant `--help`), hides the
libraries' start-up logs, and reports a problem the user can fix in one line on stderr naming the
problem and the fix, with exit code 2 and no traceback. Bugs keep their traceback. This module
imports nothing of keras_glam and nothing heavy.
"""

import argparse
import contextlib
import errno
import logging
import os
import sys
import warnings

# The exit code of a problem the user can fix (argparse's own for a bad command line).
USER_ERROR_EXIT_CODE = 2

# The errors a user causes and can fix: keras_glam raises these with a message that names the
# problem and the fix. Raised inside Keras, JAX or TensorFlow, the same types are bugs and keep
# their traceback; the operating system's errors (a full disk, a permission) are the user's
# wherever they are raised.
USER_ERROR_TYPES = (ValueError, OSError, MemoryError, RuntimeError)


class OneLineErrorParser(argparse.ArgumentParser):
    """Reports a bad command line in one line (argparse's own error prints the usage first)."""

    def error(self, message):
        self.exit(
            USER_ERROR_EXIT_CODE, f"{self.prog}: error: {message}. See {self.prog} --help.\n"
        )


def quiet_library_logs():
    """Hide what TensorFlow, XLA, JAX, absl and Keras log or warn below errors; their errors
    still surface as exceptions. Takes effect for libraries imported afterwards (TensorFlow
    reads `TF_CPP_MIN_LOG_LEVEL`, which XLA's C++ logging shares, once); a value the user set
    wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("absl", "jax", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(absl|jax|jaxlib|keras|keras_hub|tensorflow)\b")


@contextlib.contextmanager
def native_stderr_hidden():
    """Send what native code writes straight to file descriptor 2 to the null device.

    TensorFlow prints its start-up banners ("oneDNN custom operations are on", "Could not find
    cuda drivers") and SentencePiece its notes that way, before any log level applies. Python's
    own writes to stderr inside the block are lost too, so the block holds only imports and
    checks: their errors are raised, and reported after it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def user_error_message(error):
    """The one line that tells a command-line user what went wrong and what to do about it, or
    None when `error` is a bug (its traceback is then what helps).

    Example:

    >>> user_error_message(OSError(28, "No space left on device", "run/metrics.json"))
    'No space left on device (run/metrics.json). Free some space, then continue with --resume.'
    >>> user_error_message(KeyError("token_ids")) is None
    True
    """
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "Free some space, then continue with --resume."
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "Fix the permissions or choose another path."
        else:
            fix = "Check the path."
        return f"{error.strerror}{where}. {fix}"
    if isinstance(error, USER_ERROR_TYPES) and _raised_in_keras_glam(error):
        return " ".join(str(error).split())
    return None


def report_user_error(program, error):
    """Print `error` as `<program>: error: <one line>` on stderr and return exit code 2; raise
    it again when it is a bug (`user_error_message` is None), keeping its traceback.

    Use it in a command's `main`:

    ```python
    try:
        ...
    except Exception as error:
        return report_user_error("glam-plan", error)
    ```
    """
    message = user_error_message(error)
    if message is None:
        raise error
    print(f"{program}: error: {message}", file=sys.stderr)
    return USER_ERROR_EXIT_CODE


def _raised_in_keras_glam(error):
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame.f_globals.get("__name__", "").split(".")[0] == "keras_glam"
