"""The layout's rules, checked statically, and the contract that every layer reads.

Layers: networks < export < engines < runtime < (benchmarks, distill, serve, the CLI). A module imports only
its own layer and those below it, lazily imported modules included; `hyportrait.errors` and
`hyportrait.files` and `hyportrait.cuda_graphs` (and the package root, which holds the version) sit under every
layer.
"""
import ast
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from torch import nn

from hyportrait import errors
from hyportrait.export.export_all import network_specs
from hyportrait.export.export_face_detector import mtcnn_specs, yoloface_spec
from hyportrait.export.onnx_io import export_onnx
from hyportrait.networks.contract import MODELS, dtype
from hyportrait.networks.face_detector import YoloFaceDetector
from hyportrait.networks.weights import random_networks
from hyportrait.runtime.backends import OnnxRuntimeSession
from hyportrait.runtime.models import exported_face_detector

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"networks": 0, "export": 1, "engines": 2, "runtime": 3, "benchmarks": 4, "distill": 4, "serve": 4}
UNDER_EVERY_LAYER = {"hyportrait", "hyportrait.errors", "hyportrait.files", "hyportrait.cuda_graphs"}
TOP = 4


def packages() -> dict[str, Path]:
    """hyportrait.X -> its folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in config.items()}


def layer_of(module: str) -> int | None:
    """The layer of a hyportrait module name (None: not a hyportrait module)."""
    parts = module.split(".")
    if parts[0] != "hyportrait" or module in UNDER_EVERY_LAYER:
        return None
    if parts[1] not in LAYERS:
        return TOP  # the CLI
    return LAYERS[parts[1]]


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module a file imports, at any depth of its code, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module)
    return names


def test_no_layer_imports_a_layer_above_it():
    checked, violations = 0, []
    for package, folder in packages().items():
        own = layer_of(package)
        for path in folder.glob("*.py"):
            checked += 1
            for module in imported_modules(path, package):
                target = layer_of(module)
                if target is not None and own is not None and target > own:
                    violations.append(f"{path.relative_to(ROOT)} imports {module}")
    assert checked > 50
    assert not violations, "\n".join(violations)


def test_the_import_check_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from .backends import Models\n\ndef f():\n    from hyportrait.benchmarks.bench import main\n")
    found = imported_modules(source, "hyportrait.runtime")
    assert found == {"hyportrait.runtime.backends", "hyportrait.benchmarks.bench"}
    assert layer_of("hyportrait.benchmarks.bench") > layer_of("hyportrait.runtime.backends")


def error_classes_defined(path: Path, known: set[str]) -> list[str]:
    """Classes in `path` deriving (by name, at any depth of the file) from a class in `known`; `known` grows with
    them, so a subclass of such a class is found too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ClassDef):
            bases = {base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None) for base in node.bases}
            if bases & known:
                known.add(node.name)
                found.append(node.name)
    return found


def test_every_error_class_lives_in_errors_py():
    errors_py = ROOT / "hyportrait" / "errors.py"
    known = {"HyportraitError"}
    assert len(error_classes_defined(errors_py, known)) > 15
    outside = [f"{path.relative_to(ROOT)}: {', '.join(names)}" for folder in [*packages().values(), ROOT / "tests"]
               for path in sorted(folder.glob("*.py")) if path != errors_py
               if (names := error_classes_defined(path, set(known)))]
    assert not outside, "error classes outside hyportrait/errors.py:\n" + "\n".join(outside)


def test_the_error_class_check_sees_subclasses_of_subclasses(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from hyportrait import errors\n\ndef f():\n    class A(errors.InputError): ...\n"
                      "    class B(A): ...\nclass C(ValueError): ...\n")
    assert error_classes_defined(source, {"HyportraitError", "InputError"}) == ["A", "B"]


def test_the_readme_lists_every_error_code_of_errors_py():
    coded = {cls.__name__: cls.code for cls in vars(errors).values() if isinstance(cls, type)
             and issubclass(cls, errors.HyportraitError) and cls is not errors.HyportraitError and "code" in vars(cls)}
    readme = (ROOT / "README.md").read_text()
    listed = dict(re.findall(r"^\| `([a-z_]+)` \| `(\w+)` \|", readme, re.MULTILINE))
    assert {name: code for code, name in listed.items()} == coded
    assert len(set(coded.values())) == len(coded)  # one class per code
    # the codes a ServeError is raised with (the HTTP service's), in its section
    served = {code for path in packages()["hyportrait.serve"].glob("*.py")
              for code in re.findall(r'ServeError\(\s*"([a-z_]+)"', path.read_text())}
    section = readme[readme.index("## Serving over HTTP"):readme.index("### Scale-out on Ray Serve")]
    assert len(served) > 10 and not {code for code in served if f"`{code}`" not in section}


def test_the_exporters_follow_the_contract():
    nets = random_networks("tiny")
    for spec in network_specs(nets) + mtcnn_specs():
        contract = MODELS[spec.name]
        assert tuple(spec.inputs) == contract.input_names
        assert tuple(spec.outputs) == contract.output_names
        if spec.name != "unet":  # the exported UNet leaves its fixed window and latent size static
            assert spec.dynamic_axes == contract.dynamic_axes
        for name, example in spec.inputs.items():
            tensor = next(t for t in contract.inputs if t.name == name)
            fixed = [(axis, size) for axis, size in enumerate(tensor.dims) if isinstance(size, int)]
            assert example.ndim == len(tensor.dims) and all(example.shape[a] == s for a, s in fixed), name
            if tensor.dtype == "int32":
                assert example.dtype == torch.int32


def test_one_dtype_table():
    assert dtype(onnxruntime="tensor(float16)").torch == torch.float16
    assert dtype(torch=torch.int32).name == "int32"
    with pytest.raises(KeyError):
        dtype(name="complex64")


class RandomYolo(nn.Module):
    """YoloFace's interface, (image, [grid per stride]) -> (1, anchors, 16), with random heads whose rows
    pass the detector's thresholds: boxes around their cells, objectness and class score in (0, 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleList([nn.Conv2d(3, 16, s, stride=s) for s in (8, 16, 32)])
        self.strides = [8, 16, 32]

    def forward(self, x, grids: list[torch.Tensor]):
        rows = []
        for i, head in enumerate(self.heads):
            f = head(x).permute(0, 2, 3, 1)[:, None]
            stride = float(self.strides[i])
            centre = (f[..., :2].sigmoid() + grids[i]) * stride
            size = f[..., 2:4].sigmoid() * 4 * stride
            scores = (f[..., 4:5] * 8).sigmoid()
            landmarks = (grids[i].repeat(1, 1, 1, 1, 5) + f[..., 5:15].sigmoid()) * stride
            rows.append(torch.cat([centre, size, scores, landmarks, (f[..., 15:] * 8).sigmoid()], -1)
                        .reshape(1, -1, 16))
        return torch.cat(rows, 1)


def test_an_exported_yoloface_detects_on_onnxruntime_as_the_official_file_does(tmp_path):
    path = tmp_path / "yoloface_v5m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(RandomYolo().eval()).save(str(path))
    record = export_onnx(yoloface_spec(path), tmp_path)
    session = OnnxRuntimeSession("yoloface", tmp_path / record.file, torch.device("cpu"))
    exported = exported_face_detector({"yoloface": session}, torch.device("cpu"))
    assert isinstance(exported, YoloFaceDetector) and exported.exported.session is session
    images = [np.random.default_rng(i).integers(0, 256, shape, np.uint8) for i, shape in
              enumerate([(300, 400, 3), (500, 320, 3)])]
    official, ours = YoloFaceDetector(path).detect_batch(images), exported.detect_batch(images)
    assert [len(faces) for faces in ours] == [len(faces) for faces in official] and sum(map(len, ours)) > 0
    for faces_a, faces_b in zip(official, ours):
        # random boxes of near-equal areas: largest-first order may differ by rounding, so compare by position
        for a, b in zip(sorted(faces_a, key=lambda f: tuple(f.box)), sorted(faces_b, key=lambda f: tuple(f.box))):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
