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


class ExportError(HyportraitError):
    """A model that would not export, or whose export differs from its PyTorch module."""
    code = "export_failed"


class ProfileError(HyportraitError):
    """An export whose shapes cannot serve an engine profile."""
    code = "bad_profile"


class EngineBuildError(HyportraitError):
    code = "build_failed"

    def __init__(self, message: str, errors=(), stage: str = "build"):
        super().__init__(message)
        self.errors = list(errors)  # the parser's and TensorRT's own error messages
        self.stage = stage  # "parse", "configure" or "build"


class EngineRunError(HyportraitError):
    code = "engine_failed"


class TensorRTMissingError(HyportraitError):
    code = "tensorrt_missing"


class BackendError(HyportraitError):
    """A backend this machine cannot run: no GPU for a GPU backend, no CUDA provider, a model it cannot load."""
    code = "backend_unavailable"


class OutOfMemoryError(HyportraitError):
    code = "out_of_memory"


class VerifyError(HyportraitError):
    """Engines whose outputs differ from onnxruntime's beyond the tolerance (`hyportrait verify`)."""
    code = "verify_failed"


class DataError(HyportraitError):
    """A training-data folder that is missing, empty, of another format, or whose shards do not match it."""
    code = "bad_data"
