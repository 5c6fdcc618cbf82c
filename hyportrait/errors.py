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
