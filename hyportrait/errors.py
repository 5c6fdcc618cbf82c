"""Errors that reach users: each has a stable `code` and a message that names the problem.

The CLI prints these without a traceback; embedders catch `HyportraitError` and switch on `.code`.
"""


class HyportraitError(Exception):
    code = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InputError(HyportraitError):
    code = "bad_input"


class NoFaceError(InputError):
    code = "no_face"


class VideoError(InputError):
    code = "bad_video"


class WeightsError(HyportraitError):
    code = "bad_weights"


class EngineMismatchError(HyportraitError):
    """A TensorRT engine that cannot serve this GPU, TensorRT install or input shapes; the message says what
    differs and the `hyportrait build` command that rebuilds it."""
    code = "engine_mismatch"


class OptionError(InputError, ValueError):
    """An option outside its valid range: `option` is the API keyword (e.g. `num_steps`), so the CLI can name
    its flag (`--steps`) instead; `problem` says what is wrong ("must be between 1 and 1000, got 0")."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem


def describe(exc: BaseException) -> str:
    """An OS or FFmpeg error's reason without its errno number ("[Errno 13] Permission denied: 'x'" ->
    "Permission denied"), for messages that already name the file."""
    reason = getattr(exc, "strerror", None)
    return (reason or str(exc)).strip().rstrip(".")[:300] or type(exc).__name__
