"""Shapes and limits of each model, in one place: read by the networks, exporters, engine profiles, backends
and benchmarks instead of constants imported across folders."""

CROP_SIZE = 512  # source and driving crops, and the generated crop (the official `image_size`)
MOTION_SIZE = 256  # driving crops are resized to 256x256 for both motion encoders
WINDOW = 25  # frames per UNet window: also the chunk of the motion encoders and their bucket ids
