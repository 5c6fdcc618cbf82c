"""`hyportrait distill toy`: the proof that the trainer works, on a model it trains itself.

A tiny HunyuanPortrait-architecture UNet (the project's UNetWithAdapters at a toy config; 16 tokens of width 64
instead of the real 64 x 1024, see ToySize) learns a synthetic conditional video task in which every condition matters: a shape moves over the
clip; the appearance tokens choose its shape and colour, the image latent is the first frame, the motion tokens
carry each frame's position. The data is written with distill/data.py, so the trainer reads it as real data.
The trainer's teacher mode trains the teacher (conditions dropped at random, so three-branch guidance means
something; kept in fp16 as DIR/teacher.safetensors, which a later run may start from: `--teacher`), its distill
mode the student; two negative controls run the same way (learning rate 0; the target
taken from the student itself at the same sigma). On held-out clips, from the same starting noise:

    reference      teacher, 25 Euler steps, three-branch guidance
    teacher@4      teacher, 4 Euler steps, guidance
    student@4      the runtime's fast mode: 4 steps, no guidance      (and student@1 for a 1-phase student)

each with its error against the reference (latent MSE) and its position error (the shape's centroid against
the driven trajectory, latent pixels). Pass line: student@4 error <= 0.5 x teacher@4 error and student@4
position error <= 1.5 x the reference's; each control must fail it. The last printed line is the verdict.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from hyportrait.errors import WeightsError
from hyportrait.files import atomic_path, write_json
from hyportrait.networks.unet import UNetConfig, UNetWithAdapters
from hyportrait.runtime.pipeline import AnimateConfig

from .data import MANIFEST, write_dataset
from .train import TrainConfig, sample_student, sample_teacher, train

FEATURES = 8  # sin/cos position features carried by the motion tokens and the pose map


@dataclass(frozen=True)
class ToySize:
    latent: int
    frames: int
    channels: int
    train_clips: int
    eval_clips: int
    teacher: TrainConfig
    student: TrainConfig
    # Fewer and narrower tokens than the official (64, 1024): the projections of 1024-wide tokens were half of
    # the toy's compute, and the task needs only a few features per frame. (64, 1024) fits the tiny networks.
    tokens: int = 16
    width: int = 64
    # The controls' weights cannot move (learning rate 0; the same-sigma target is the prediction itself, so the
    # loss and its gradients are 0), so a few steps make the weights a full run would: the run checks they stayed.
    control_steps: int = 5


# The student's recipe, found by a sweep on the CPU toy (benchmarks/RESULTS.md): LoRA on every Linear, the target
# network the student itself (no EMA lag), a cosine-decayed learning rate and a pseudo-Huber c near the toy's
# latent scale.
_STUDENT = TrainConfig(mode="distill", steps=200, batch=8, lr=1e-2, lr_schedule="cosine", rank=16,
                       lora_targets="all-linear", target="student", huber_c=0.03, phases=4, grid=13,
                       checkpoint_every=100)
SIZES = {
    "cpu": ToySize(latent=8, frames=4, channels=32, train_clips=256, eval_clips=8,
                   teacher=TrainConfig(mode="teacher", steps=600, batch=8, lr=2e-3, lr_schedule="cosine",
                                       checkpoint_every=200),
                   student=_STUDENT),
    "gpu": ToySize(latent=16, frames=8, channels=32, train_clips=2048, eval_clips=32,
                   teacher=TrainConfig(mode="teacher", steps=800, batch=32, lr=2e-3, lr_schedule="cosine",
                                       checkpoint_every=200),
                   student=replace(_STUDENT, steps=400, batch=16, rank=32, checkpoint_every=200)),
}


def toy_unet(size: ToySize) -> UNetWithAdapters:
    config = replace(UNetConfig.tiny(), block_out_channels=(size.channels, size.channels),
                     down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                     up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
                     num_attention_heads=(2, 2), num_frames=size.frames, sample_size=size.latent,
                     cross_attention_dim=size.width)
    torch.manual_seed(0)
    return UNetWithAdapters(config)


def _features(pos: torch.Tensor, latent: int) -> torch.Tensor:
    """(..., 2) positions in latent pixels -> (..., FEATURES) sin/cos features."""
    angles = torch.cat([pos * (math.pi * k / latent) for k in (1, 2)], dim=-1)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Task:
    """The fixed random parts of the task: colours, token embeddings, the pose map."""

    def __init__(self, size: ToySize, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        self.size = size
        self.colours = torch.tensor([[1, -1, 1, -1], [-1, 1, 1, 1], [1, 1, -1, 1], [-1, -1, -1, 1]],
                                    dtype=torch.float32)
        self.appearance = torch.randn(len(self.colours), size.tokens, size.width, generator=g)
        self.motion_basis = torch.randn(size.tokens, FEATURES, size.width, generator=g) / math.sqrt(FEATURES)
        grid = torch.stack(torch.meshgrid(*[torch.arange(size.latent, dtype=torch.float32)] * 2, indexing="ij"), -1)
        pose = _features(grid, size.latent) @ torch.randn(FEATURES, size.channels, generator=g)
        self.pose_map = pose.permute(2, 0, 1).contiguous()
        self.grid = grid

    def render(self, kind: int, pos: torch.Tensor) -> torch.Tensor:
        """(F, 2) positions -> (F, 4, S, S): a soft square (even kinds) or soft disk (odd kinds)."""
        d = self.grid[None] - pos[:, None, None, :]
        if kind % 2 == 0:
            mask = torch.sigmoid((1.6 - d.abs()) * 4).prod(-1)
        else:
            mask = torch.sigmoid((1.8 - d.norm(dim=-1)) * 4)
        return mask[:, None] * self.colours[kind][None, :, None, None]

    def clip(self, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        s, f = self.size.latent, self.size.frames
        kind = int(torch.randint(len(self.colours), (1,), generator=g))
        start = 2 + torch.rand(2, generator=g) * (s - 5)
        angle = torch.rand(1, generator=g) * 2 * math.pi
        speed = 0.6 + 0.6 * torch.rand(1, generator=g)
        step = torch.cat([angle.cos(), angle.sin()]) * speed * s / 8  # latent pixels per frame
        pos = torch.stack([start + step * k for k in range(f)])
        pos = 1.5 + (pos - 1.5) % (2 * (s - 4))  # bounce between 1.5 and s - 2.5
        pos = torch.where(pos > s - 2.5, 2 * (s - 2.5) - pos, pos)
        latents = self.render(kind, pos)
        motion = torch.einsum("fc,tcw->ftw", _features(pos, s), self.motion_basis)
        example = {"latents": latents, "image_latent": latents[0].clone(), "appearance": self.appearance[kind],
                   "motion": motion}
        return example, pos, kind

    def clips(self, count: int, seed: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor, int]]:
        g = torch.Generator().manual_seed(seed)
        return [self.clip(g) for _ in range(count)]

    def position_error(self, latents: torch.Tensor, pos: torch.Tensor, kinds: list[int]) -> float:
        """Mean distance (latent pixels) between each frame's colour-weighted centroid and the driven position."""
        colours = self.colours[kinds]  # (B, 4)
        weight = torch.einsum("bfchw,bc->bfhw", latents.float(), colours).clamp_min(0) + 1e-6
        centroid = torch.einsum("bfhw,hwk->bfk", weight, self.grid) / weight.sum((-1, -2))[..., None]
        return (centroid - pos).norm(dim=-1).mean().item()


def write_toy_data(task: Task, out: Path, count: int, seed: int) -> Path:
    if (out / MANIFEST).is_file():  # written by an earlier run of the same size (the writer refuses another)
        return out
    examples = ((example, f"clip-{i:05d}") for i, (example, _, _) in enumerate(task.clips(count, seed)))
    return write_dataset(examples, out, {"toy": "moving-shapes", "seed": seed, "latent": task.size.latent,
                                         "frames": task.size.frames}, per_shard=64)


def _stack(clips) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[int]]:
    batch = {k: torch.stack([c[0][k] for c in clips]) for k in clips[0][0]}
    return batch, torch.stack([c[1] for c in clips]), [c[2] for c in clips]


TEACHER = "teacher.safetensors"  # DIR/teacher.safetensors: the teacher every later stage of the proof uses


def teacher_identity(size: ToySize) -> dict:
    """What a toy teacher is made from: the task's shapes, its data and the teacher's recipe."""
    shapes = {k: getattr(size, k) for k in ("latent", "frames", "channels", "train_clips", "tokens", "width")}
    return {**shapes, "teacher": asdict(size.teacher)}


def save_teacher(size: ToySize, trained: Path, path: Path) -> None:
    """The trained teacher in fp16 (half the file: the tests bundle one; the rounding is far below what the
    proof measures), with the identity of what made it."""
    weights = {k: v.half() for k, v in load_file(str(trained)).items()}
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp), metadata={"toy": json.dumps(teacher_identity(size), sort_keys=True)})


def use_teacher(size: ToySize, given: Path, path: Path) -> None:
    """A teacher saved by an earlier run (`save_teacher`) copied in as this run's, if made for this toy."""
    try:
        with safe_open(str(given), "pt") as f:
            made_for = json.loads((f.metadata() or {}).get("toy", "null"))
    except (OSError, SafetensorError, ValueError) as e:  # missing, not safetensors, not our metadata
        raise WeightsError(f"{given}: not a toy teacher ({e})") from None
    if made_for is None:
        raise WeightsError(f"{given}: not a toy teacher (no record of the toy that made it)")
    if made_for != json.loads(json.dumps(teacher_identity(size))):  # lists and tuples compared as JSON
        raise WeightsError(f"{given}: a teacher of another toy or recipe ({made_for}); make it again with "
                           f"`hyportrait distill toy --out DIR` and copy DIR/{TEACHER}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(given.read_bytes())


def load_teacher(size: ToySize, path: Path) -> UNetWithAdapters:
    unet = toy_unet(size)
    unet.load_state_dict(load_file(str(path)))
    return unet


@dataclass
class Row:
    name: str
    unet_calls: int
    error: float  # latent MSE against the reference
    position_error: float
    samples: torch.Tensor


def evaluate(task: Task, teacher: UNetWithAdapters, students: dict[str, UNetWithAdapters], phases: int,
             clips) -> list[Row]:
    """Each model sampled in fp32 from the same noise (on the GPU when there is one)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, pos, kinds = _stack(clips)
    cond = {k: batch[k].to(device) for k in ("image_latent", "appearance", "motion")}
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(7)).to(device)
    a = AnimateConfig()
    time_ids = torch.tensor([a.fps_condition, a.motion_bucket_id, a.noise_aug_strength], device=device)
    shared = (cond, noise, task.pose_map.to(device), time_ids)
    for model in (teacher, *students.values()):
        model.set_engine_rewrites(True).eval().to(device)
    runs = [("reference (teacher 25, guided)", 75, sample_teacher(teacher, *shared, steps=a.num_steps)),
            ("teacher 4, guided", 12, sample_teacher(teacher, *shared, steps=4))]
    for name, model in students.items():
        for steps in ((4, 1) if name == "student" else (4,)) if phases == 1 else (phases,):
            out = sample_student(model, *shared, steps=steps, phases=phases,
                                 generator=torch.Generator(device).manual_seed(8))
            runs.append((f"{name} {steps}, no guidance", steps if phases == 1 else phases, out))
    runs = [(name, calls, out.cpu()) for name, calls, out in runs]
    reference = runs[0][2]
    return [Row(name, calls, (out - reference).square().mean().item(), task.position_error(out, pos, kinds), out)
            for name, calls, out in runs]


def passes(row: Row, teacher4: Row, reference: Row) -> bool:
    return row.error <= 0.5 * teacher4.error and row.position_error <= 1.5 * reference.position_error


def side_by_side(rows: list[Row], path: Path, clips: int = 4) -> None:
    """Frames of reference / teacher@4 / student@4 (rows of the picture), a few clips side by side; the
    first three latent channels shown as RGB."""
    from PIL import Image

    picked = [rows[0], rows[1], next(r for r in rows if r.name.startswith("student 4"))]
    lines = []
    for row in picked:
        x = row.samples[:clips, :, :3]  # (B, F, 3, S, S)
        x = ((x.clamp(-1.5, 1.5) + 1.5) / 3 * 255).byte()
        frames = x.permute(0, 1, 3, 4, 2)  # B F S S 3
        line = torch.cat([torch.cat(list(clip), dim=1) for clip in frames], dim=1)
        lines.append(line)
    image = torch.cat(lines, dim=0).numpy()
    scale = max(1, 256 // image.shape[0])
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image)).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                  Image.NEAREST).save(tmp, format="PNG")


def run_toy(out: str | Path, size: str | ToySize = "cpu", phases: int | None = None, print_fn=print,
            teacher: str | Path | None = None) -> dict:
    """The whole proof: data, teacher, student, the two controls, the table (DIR/table.json, DIR/frames.png).
    Runs already finished in DIR are reused (each trainer run resumes from its checkpoint). `teacher`: the
    DIR/teacher.safetensors of an earlier run of this toy, used instead of training the teacher again."""
    out = Path(out)
    size_name = size if isinstance(size, str) else "custom"
    size = SIZES[size] if isinstance(size, str) else size
    phases = size.student.phases if phases is None else phases
    replace(size.student, phases=phases)  # phases the grid cannot hold fail here, before the teacher trains
    teacher_file = out / TEACHER
    if teacher is not None:
        print_fn(f"toy: the teacher of {teacher}")
        use_teacher(size, Path(teacher), teacher_file)
    task = Task(size)
    data = write_toy_data(task, out / "data", size.train_clips, seed=1)
    pose = task.pose_map
    if not teacher_file.is_file():
        print_fn(f"toy: teacher, {size.teacher.steps} steps on {size.train_clips} clips")
        trained = train(size.teacher, data, out / "teacher", toy_unet(size), pose, weights="toy (random init)")
        save_teacher(size, trained.output, teacher_file)
    students, steps, moved = {}, {}, {}
    controls = {"steps": size.control_steps, "checkpoint_every": size.control_steps}
    variants = {"student": {}, "control lr=0": {"lr": 0.0, **controls},
                "control same-sigma target": {"target": "same-sigma", **controls}}
    for name, change in variants.items():
        config = replace(size.student, phases=phases, **change)
        print_fn(f"toy: {name}, {config.steps} distillation steps")
        folder = out / name.replace(" ", "-").replace("=", "")
        result = train(config, data, folder, load_teacher(size, teacher_file), pose, weights=str(teacher_file))
        students[name] = merged_student(size, teacher_file, result.output)
        steps[name] = config.steps
        moved[name] = _adapter_moved(result.output)
    clips = task.clips(size.eval_clips, seed=2)  # held out: another seed than the training data
    rows = evaluate(task, load_teacher(size, teacher_file), students, phases, clips)
    reference, teacher4 = rows[0], rows[1]
    verdicts = {r.name: passes(r, teacher4, reference) for r in rows[2:] if " 4," in r.name}
    student_ok = verdicts["student 4, no guidance"]
    controls_fail = not any(ok for name, ok in verdicts.items() if name.startswith("control"))
    if any(moved[name] for name in variants if name.startswith("control")):  # then control_steps is not enough
        raise RuntimeError(f"a control's weights moved: {moved}")
    table = {"size": size_name, "train_steps": {"teacher": size.teacher.steps, **steps}, "latent": size.latent, "frames": size.frames, "phases": phases,
             "rows": [{"run": r.name, "unet_calls": r.unet_calls, "error_vs_reference": r.error,
                       "position_error": r.position_error, "passes": verdicts.get(r.name)} for r in rows],
             "student_passes": student_ok, "controls_fail": controls_fail, "verdict": student_ok and controls_fail}
    write_json(out / "table.json", table)
    side_by_side(rows, out / "frames.png")
    print_fn(f"{'run':32s} {'UNet calls':>10s} {'error vs ref':>13s} {'position err':>13s}  pass line")
    for r in rows:
        mark = {True: "pass", False: "FAIL", None: ""}[verdicts.get(r.name)]
        print_fn(f"{r.name:32s} {r.unet_calls:10d} {r.error:13.5f} {r.position_error:13.3f}  {mark}")
    print_fn(f"pass line: student@4 error <= {0.5 * teacher4.error:.5f} and position error <= "
             f"{1.5 * reference.position_error:.3f}; wrote {out / 'table.json'} and {out / 'frames.png'}")
    print_fn(f"verdict: {'PASS' if table['verdict'] else 'FAIL'} (student {'passes' if student_ok else 'fails'}, "
             f"controls {'fail as they must' if controls_fail else 'PASS, which they must not'})")
    return table


def _adapter_moved(lora: Path) -> bool:
    """Whether a trained adapter differs from peft's start (every lora_B zero: the teacher unchanged)."""
    return any(bool(t.any()) for k, t in load_file(str(lora / "adapter_model.safetensors")).items() if "lora_B" in k)


def merged_student(size: ToySize, teacher: Path, lora: Path) -> UNetWithAdapters:
    """The teacher with the trained adapter merged by networks/lora.py, as `animate --lora` does."""
    from hyportrait.networks.lora import merge_lora

    unet = load_teacher(size, teacher)
    merge_lora(unet, lora)
    return unet
