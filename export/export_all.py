"""`hyportrait export`: every network of the inference path to ONNX, each validated, plus a manifest.

Output folder:
    unet.onnx (+ unet.onnx.data past 2 GB), appearance.onnx, motion.onnx, vae_encoder.onnx, vae_decoder.onnx,
    pose_guider.onnx, pose_constant.npy, mtcnn_{pnet,rnet,onet}.onnx, yoloface.onnx and arcface.onnx when
    the weights folder has them, manifest.json (written last: a folder without it is not a finished export).
Every model is run with onnxruntime against its PyTorch module right after it is written; an fp32 model
must agree to 1e-4 relative error, an fp16 one (against the fp32 module) to 1e-2. A model that fails is
removed and the export stops with an ExportError. An export that fails or is interrupted removes every file
it wrote, and the folder if it created it: no unfinished export is left.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from hyportrait.errors import InputError
from hyportrait.files import sha256_file
from hyportrait.networks.contract import LATENT_SIZE
from hyportrait.networks.lora import merge_lora
from hyportrait.networks.weights import (
    ARCFACE_FILE,
    CHECKPOINTS,
    CONFIG_FILES,
    DETECTOR_FILE,
    Networks,
    Size,
    load_networks,
    random_networks,
)

from .export_appearance import appearance_spec
from .export_arcface import copy_arcface
from .export_face_detector import mtcnn_specs, yoloface_spec
from .export_motion import motion_spec
from .export_pose_guider import pose_guider_spec, write_pose_constant
from .export_unet import unet_spec
from .export_vae import vae_decoder_spec, vae_encoder_spec
from .manifest import MANIFEST_FILE, Manifest, write_manifest
from .onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    ExportError,
    ExportSpec,
    ModelRecord,
    check_precision,
    ensure_writable,
    export_onnx,
    validate_onnx,
)

log = logging.getLogger(__name__)


def network_specs(nets: Networks, image_size: int = 64, **unet_options) -> list[ExportSpec]:
    """The specs of every network built from the checkpoints (the face detectors come separately), the UNet
    last. image_size: the pixels of the example inputs of the image models (their H and W are dynamic; small
    keeps CPU validation cheap). unet_options: `unet_spec`'s."""
    return [pose_guider_spec(nets, image_size=image_size), vae_encoder_spec(nets, image_size=image_size),
            vae_decoder_spec(nets, latent_size=image_size // 8), motion_spec(nets), appearance_spec(nets),
            unet_spec(nets, **unet_options)]


def _remove_model(out: Path, record: ModelRecord) -> None:
    for name in (record.file, record.data_file):
        if name:
            (out / name).unlink(missing_ok=True)


def export_and_validate(spec: ExportSpec, out: Path, precision: str, providers: Sequence[str] | None = None,
                        external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, validate: bool = True) -> ModelRecord:
    """Export one spec and check it against its module; a model off by more than the tolerance is removed."""
    record = export_onnx(spec, out, precision, external_data_threshold=external_data_threshold)
    if not validate:
        record.validation = {"skipped": "validation not asked for"}
        return record
    tolerance = FP32_TOLERANCE if record.precision == "fp32" else FP16_TOLERANCE
    provider = (providers or ["CPUExecutionProvider"])[0]
    start = time.perf_counter()
    try:
        errors = validate_onnx(spec, out / record.file, providers)
    except (ExportError, KeyboardInterrupt, SystemExit):  # and an interrupt: not in the manifest yet
        _remove_model(out, record)
        raise
    except Exception as exc:  # onnxruntime's own exception types
        if record.precision == "fp32":
            _remove_model(out, record)
            raise ExportError(f"{spec.name}: onnxruntime could not run the exported model: {exc}") from exc
        # onnxruntime's CPU provider has no fp16 kernel for some ops: the model stays, marked unchecked
        record.validation = {"provider": provider, "skipped": f"onnxruntime cannot run it: {exc}"}
        log.warning("%s: fp16 model not validated (%s has no kernel for it)", spec.name, provider)
        return record
    worst = max(errors)
    record.validation = {"provider": provider, "tolerance": tolerance, "max_relative_error": worst,
                         "relative_errors": errors, "reference": "the PyTorch module in fp32",
                         "input_sets": len(errors), "seconds": round(time.perf_counter() - start, 3)}
    if not worst <= tolerance:  # also catches NaN
        _remove_model(out, record)
        raise ExportError(f"{spec.name}: the exported model differs from PyTorch by relative error {worst:.3g} "
                          f"(allowed {tolerance:g}); the model was removed")
    log.info("%s: exported in %.1f s, validated in %.1f s, max relative error %.2g", spec.name,
             record.export_seconds, record.validation["seconds"], worst)
    return record


def export_all(weights: Path | None, out: Path, precision: str = "fp32", lora: Path | None = None,
               size: Size = "official", *, providers: Sequence[str] | None = None,
               external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
               onnxruntime_attention: bool = False, networks: Networks | None = None,
               validate: bool = True) -> Manifest:
    """Export every network of `weights` (None: random networks of `size`, for trying and for tests) into
    `out` and write `out/manifest.json`. lora: a PEFT LoRA merged into the UNet before export.
    providers: onnxruntime providers for the validation runs (default CPU). onnxruntime_attention: the UNet's
    attention as onnxruntime's fused MultiHeadAttention op, for the onnxruntime backend on a GPU (the plain
    MatMul-Softmax-MatMul chain is the form TensorRT fuses, but onnxruntime materialises its scores).
    networks: random networks already built (e.g. on a GPU, where tracing the official size is fast) instead
    of building them from `size`. validate=False skips the onnxruntime checks (benchmarks that measure
    accuracy themselves)."""
    check_precision(precision)
    if lora is not None and not Path(lora).exists():
        raise InputError(f"LoRA {lora} does not exist")
    created = not Path(out).exists()
    out = ensure_writable(Path(out))  # before the long work
    manifest = Manifest(precision=precision, weights="")
    try:
        return _export(weights, out, manifest, lora, size, providers, external_data_threshold,
                       onnxruntime_attention, networks, validate)
    except BaseException:  # an error or an interrupt: no unfinished export is left behind
        for record in manifest.models.values():
            _remove_model(out, record)
        for entry in manifest.files.values():
            (out / entry["file"]).unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _export(weights, out, manifest, lora, size, providers, external_data_threshold, onnxruntime_attention,
            networks, validate) -> Manifest:
    """export_all's work, recording in `manifest` each file as it is written (what a failure removes)."""
    if networks is not None:
        nets, origin, size = networks, f"random:{networks.size}", networks.size
    elif weights is None:
        nets, origin = random_networks(size), f"random:{size}"
    else:
        nets, origin = load_networks(weights, size), str(weights)
    manifest.weights = origin
    if lora is not None:
        merged = merge_lora(nets.unet, lora)
        manifest.lora = str(lora)
        if Path(lora).is_file():
            manifest.sources[Path(lora).name] = sha256_file(Path(lora))
        log.info("merged a LoRA into %d UNet layers", len(merged))

    # an earlier export's manifest would describe models about to be replaced: the folder is unfinished
    # until the new one is written
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    manifest.unet_attention = "onnxruntime" if onnxruntime_attention else "plain"
    specs = network_specs(nets, onnxruntime_attention=onnxruntime_attention) + mtcnn_specs()
    detector = Path(weights) / DETECTOR_FILE if weights is not None else None
    if detector is not None and detector.is_file():
        specs.append(yoloface_spec(detector))
    else:
        manifest.skipped["yoloface"] = f"no {DETECTOR_FILE} in the weights folder (MTCNN is the detector)"
    for spec in specs:
        try:
            manifest.models[spec.name] = export_and_validate(spec, out, manifest.precision, providers,
                                                             external_data_threshold, validate)
        except ExportError as exc:
            if spec.name != "yoloface":
                raise
            # the official detector is an opaque TorchScript file: MTCNN remains when it will not export
            manifest.skipped["yoloface"] = str(exc)
            log.warning("yoloface not exported: %s", exc)

    # at the crop size of the exported UNet's latent
    manifest.files["pose_constant"] = write_pose_constant(nets, out, size=8 * LATENT_SIZE[size])
    if weights is not None and (Path(weights) / ARCFACE_FILE).is_file():
        manifest.files["arcface"] = copy_arcface(Path(weights), out)
    else:
        manifest.skipped["arcface"] = f"no {ARCFACE_FILE} in the weights folder (a zero identity embedding is used)"

    if weights is not None:
        used = {source for record in manifest.models.values() for source in record.sources}
        used |= {source for entry in manifest.files.values() for source in entry.get("sources", [])}
        known = {spec.path for spec in CHECKPOINTS} | {DETECTOR_FILE, ARCFACE_FILE}
        # the UNet and VAE configs shape the networks too, when the folder has them
        used |= {name for name in CONFIG_FILES if (Path(weights) / name).is_file()}
        for source in sorted(used & (known | set(CONFIG_FILES))):
            manifest.sources[source] = sha256_file(Path(weights) / source)
    write_manifest(manifest, out)
    return manifest
