"""Errors that reach users: each has a stable `code` and a message that names the problem.

The CLI prints these without a traceback; embedders catch `HyportraitError` and switch on `.code`. Every error
class of the project is here (tests/test_structure.py checks it, and that README.md's table lists every code).
"""


class HyportraitError(Exception):
    """The base of every error the project raises on purpose; subclasses set `code`."""
    code = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InputError(HyportraitError):
    """An input, option or output folder the command cannot use."""
    code = "bad_input"


class NoFaceError(InputError):
    """No face in the source image, or in the first driving frame."""
    code = "no_face"


class ImageTooLargeError(InputError):
    """An image over the pixel limit (PIL's 89 MP, or the service's --max-image-pixels), refused from its header
    before it is decoded: a header can claim any size (a decompression bomb)."""
    code = "image_too_large"


class VideoError(InputError):
    """A video that is missing, unreadable, has no decodable frames, or cannot be written."""
    code = "bad_video"


class WeightsError(HyportraitError):
    """A weights folder or checkpoint with missing, unexpected or misshapen keys (or an unsafe pickle)."""
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
    """TensorRT could not parse, configure or build an engine."""
    code = "build_failed"

    def __init__(self, message: str, errors=(), stage: str = "build"):
        super().__init__(message)
        self.errors = list(errors)  # the parser's and TensorRT's own error messages
        self.stage = stage  # "parse", "configure" or "build"


class EngineRunError(HyportraitError):
    """TensorRT refused to run an engine (an input shape, a dtype, the enqueue)."""
    code = "engine_failed"


class TensorRTMissingError(HyportraitError):
    """TensorRT (or TensorRT-RTX) is not installed."""
    code = "tensorrt_missing"


class BackendError(HyportraitError):
    """A backend this machine cannot run: no GPU for a GPU backend, no CUDA provider, a model it cannot load."""
    code = "backend_unavailable"


class OutOfMemoryError(HyportraitError):
    """The GPU ran out of memory."""
    code = "out_of_memory"


class VerifyError(HyportraitError):
    """Engines whose outputs differ from onnxruntime's beyond the tolerance (`hyportrait verify`)."""
    code = "verify_failed"


class DataError(HyportraitError):
    """A training-data folder that is missing, empty, of another format, or whose shards do not match it."""
    code = "bad_data"


class TooFewFramesError(InputError):
    """A training clip too short for one example (`hyportrait distill prepare` skips it and says so)."""
    code = "too_few_frames"


class RunError(HyportraitError):
    """A run folder that cannot be resumed with this command (another config, another LoRA)."""
    code = "bad_run"


class SourceStalledError(HyportraitError):
    """A live driving source gave no frame for the stall timeout."""
    code = "source_stalled"


class DistributedError(HyportraitError):
    """A collective failed or timed out, or a worker died without a coded error."""
    code = "distributed_error"


class WorkerError(HyportraitError):
    """A coded error raised on one rank, carried to the launcher: `code` is that error's."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ServeError(HyportraitError):
    """A request the HTTP service refuses: `code` is one of the service's stable codes (README, "Serving over
    HTTP"), `status` the HTTP status it is answered with."""

    def __init__(self, code: str, message: str, status: int = 422, headers: dict | None = None):
        super().__init__(message)
        self.code, self.status, self.headers = code, status, headers or {}
