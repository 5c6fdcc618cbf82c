"""hyportrait: a deployment runtime for HunyuanPortrait."""
import os

__version__ = "0.1.0"

# onnxruntime (1.20+) starts a telemetry client on import that writes a `.ses` file into the temporary folder
# and a database under ~/.cache/Microsoft on every run; a user's export or animation should leave neither.
# Set before any hyportrait module imports onnxruntime; an explicit ORT_DISABLE_TELEMETRY=0 is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
