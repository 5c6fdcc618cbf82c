"""Training data of the distiller: safetensors shards of per-window examples and a manifest.

    DATA/manifest.json          format, config (what made the data), fields (shape, dtype of one example),
                                shards (file, examples, sha256, sources), the example count and what the
                                writer was told about each written source (sources)
    DATA/shard-00000.safetensors  each field stacked over the shard's examples

One example is one window of a clip, exactly what the runtime feeds the UNet (runtime/pipeline.py):
    latents       (F, 4, h, w)   the clip's frames as VAE latents, scaled (the x0 the sampler produces)
    image_latent  (4, h, w)      the reference frame's unscaled VAE mean (the UNet's 4 conditioning channels)
    appearance    (64, D)        the reference frame's appearance tokens
    motion        (F, 64, D)     the window's motion tokens
The manifest is rewritten (atomically) after every shard, so a killed writer loses at most the shard it was
filling, and a writer opened on an existing folder continues after the sources it already holds.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hyportrait.errors import DataError
from hyportrait.files import atomic_path, sha256_file, write_json

FORMAT = "hyportrait-distill-v1"
MANIFEST = "manifest.json"
FIELDS = ("latents", "image_latent", "appearance", "motion")


def _shape_of(example: dict[str, torch.Tensor]) -> dict[str, list]:
    missing = [name for name in FIELDS if name not in example]
    if missing:
        raise ValueError(f"example lacks {', '.join(missing)}")
    return {name: [list(example[name].shape), str(example[name].dtype).removeprefix("torch.")] for name in FIELDS}


class ShardWriter:
    """Appends examples to DATA, `per_shard` to a shard. Use as a context manager: the last, partial shard is
    written when the block ends without an error."""

    def __init__(self, out: str | Path, config: dict, per_shard: int = 64):
        self.out = Path(out)
        self.per_shard = per_shard
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_sources: list[str] = []
        self.pending_info: dict[str, dict] = {}
        path = self.out / MANIFEST
        if path.is_file():
            self.manifest = read_manifest(self.out)
            if self.manifest["config"] != config:
                raise DataError(f"{self.out} holds data made with another config: use a new folder")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            self.manifest = {"format": FORMAT, "config": config, "fields": None, "shards": [], "examples": 0,
                             "sources": {}}

    def done_sources(self) -> set[str]:
        """Sources whose examples are all in written shards (a resumed writer skips them)."""
        return {source for shard in self.manifest["shards"] for source in shard["sources"]}

    def add(self, example: dict[str, torch.Tensor], source: str) -> None:
        shapes = _shape_of(example)
        if self.manifest["fields"] is None:
            self.manifest["fields"] = shapes
        elif shapes != self.manifest["fields"]:
            raise ValueError(f"example of {source} has shapes {shapes}, the data {self.manifest['fields']}")
        self.pending.append({name: example[name].contiguous().cpu() for name in FIELDS})
        self.pending_sources.append(source)

    def end_source(self, info: dict | None = None) -> None:
        """Call after a source's last example: shards are cut only between sources, so that a resumed writer
        never holds half a source. `info` (plain JSON types) is recorded under the manifest's sources with
        the shard that holds the source."""
        if info is not None and self.pending_sources:
            self.pending_info[self.pending_sources[-1]] = info
        if len(self.pending) >= self.per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        tensors = {field: torch.stack([e[field] for e in self.pending]) for field in FIELDS}
        with atomic_path(self.out / name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        self.manifest["shards"].append({"file": name, "examples": len(self.pending),
                                        "sha256": sha256_file(self.out / name),
                                        "sources": sorted(set(self.pending_sources))})
        self.manifest["examples"] += len(self.pending)
        self.manifest["sources"].update(self.pending_info)
        write_json(self.out / MANIFEST, self.manifest)
        self.pending, self.pending_sources, self.pending_info = [], [], {}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._flush()
            if not self.manifest["shards"]:
                write_json(self.out / MANIFEST, self.manifest)


def write_dataset(examples: Iterable[tuple[dict[str, torch.Tensor], str]], out: str | Path, config: dict,
                  per_shard: int = 64) -> Path:
    """Write (example, source) pairs, each source's examples in a row, as one dataset; returns its folder."""
    with ShardWriter(out, config, per_shard) as writer:
        last = None
        for example, source in examples:
            if last is not None and source != last:
                writer.end_source()
            writer.add(example, source)
            last = source
    return Path(out)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such data folder")
    file = path / MANIFEST
    if not file.is_file():
        raise DataError(f"{path}: not a training-data folder (no {MANIFEST}; make one with `hyportrait distill "
                        "prepare`)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{file}: not a {FORMAT} manifest")
    return manifest


class TrainingData:
    """The examples of DATA in manifest order; shards are checked against the manifest when first opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.config = self.manifest["config"]
        self.fields = self.manifest["fields"]
        self.shards = self.manifest["shards"]
        if not self.shards or self.manifest["examples"] < 1:
            raise DataError(f"{self.path}: the data folder holds no examples")
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard["examples"])
        self._open: tuple[int, dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        shard = self.shards[index]
        file = self.path / shard["file"]
        if not file.is_file():
            raise DataError(f"{file}: shard listed in the manifest is missing")
        if sha256_file(file) != shard["sha256"]:
            raise DataError(f"{file}: corrupt shard (its sha256 differs from the manifest's)")
        try:
            with safe_open(str(file), framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in FIELDS}
        except (SafetensorError, OSError, KeyError) as exc:
            raise DataError(f"{file}: unreadable shard ({exc})") from None
        for name, (shape, _) in self.fields.items():
            if list(tensors[name].shape) != [shard["examples"], *shape]:
                raise DataError(f"{file}: field {name} has shape {list(tensors[name].shape)}, the manifest "
                                f"says {shard['examples']} x {shape}")
        return tensors

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = next(k for k in range(len(self.shards)) if index < self.starts[k + 1])
        if self._open is None or self._open[0] != shard:
            self._open = (shard, self._load(shard))
        row = index - self.starts[shard]
        return {name: tensor[row] for name, tensor in self._open[1].items()}
