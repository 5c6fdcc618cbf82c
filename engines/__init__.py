"""ONNX exports to TensorRT engines (`hyportrait build`) and running them from torch.

profiles.py          min/opt/max input shapes per model, from the export manifest
quantize.py          int8 / fp8 Q/DQ UNet (onnxruntime's placement, in linear time), and its quality report
build.py             the TensorRT builder, one engine per model, and the folder-level build_all
engine_manifest.py   the manifest beside each engine, its cache key, and check_engine
engine.py            TensorRTEngine: a checked engine run on torch CUDA tensors, shared memory, CUDA graphs
tensorrt_module.py   which TensorRT is installed (TensorRT or TensorRT-RTX), and the GPU
calibration.py       the UNet's inputs recorded while the runtime animates a sample (calibration sets)
quality.py           psnr
TensorRT is imported only when an engine is built or loaded.
"""
