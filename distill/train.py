"""The trainer of `hyportrait distill train`: teacher mode (SVD's denoising loss) and distill mode (consistency
distillation of a LoRA student, distill/objective.py), on one GPU or many (torchrun + DistributedDataParallel).

RUN/checkpoint.pt   trainables (full UNet or LoRA), EMA, optimizer, step, RNG states and config, written
                    atomically every `checkpoint_every` steps; a run started on a RUN that has one resumes it
RUN/log.csv         one row per step (loss, lr, seconds) and per validation (val_mse); TensorBoard too if installed
RUN/lora/           distill: the PEFT adapter (adapter_config.json, adapter_model.safetensors) that
                    `animate --lora` and `export --lora` read;  RUN/unet.safetensors in teacher mode
RUN/run.json        which weights, data, config and git commit made the run
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hyportrait.errors import OptionError, RunError, WeightsError
from hyportrait.files import atomic_path, write_json
from hyportrait.runtime.pipeline import AnimateConfig, check_range
from hyportrait.runtime.sampling import (
    c_noise,
    karras_sigmas,
    sample_euler_windows,
    sample_lcm_windows,
    scale_input,
)

from . import objective as obj
from .data import DataError, TrainingData

# the LCM fork's attention projections; "all-linear" (peft's shorthand) adds every other Linear of the UNet
LORA_TARGETS = {"attention": ["to_q", "to_k", "to_v", "to_out.0"], "all-linear": "all-linear"}
LR_SCHEDULES = ("constant", "cosine")
WARMUP = 0.05  # cosine: the first 5 % of the steps ramp up linearly
CHECKPOINT = "checkpoint.pt"
# fields a resumed run may change (how long, how often); any other change is refused
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "val_every"}


# The numeric options' valid ranges (runtime/pipeline.py's check_range), checked before any network loads: a 0
# batch, step count or checkpoint interval would fail only inside training, a nan learning rate not at all (0 is
# the toy's control: a student that does not move). The seed bound keeps the per-micro-step generator seeds
# (seed * ~1.07e12 + ...) within 64 bits.
_LIMITS = (
    ("steps", 1, 10_000_000), ("batch", 1, 4096), ("accumulate", 1, 4096), ("lr", 0.0, 1.0),
    ("weight_decay", 0.0, 1.0), ("seed", 0, 10_000_000), ("rank", 1, 4096), ("phases", 1, 1000),
    ("grid", 2, 100_000), ("ema", 0.0, 1.0), ("huber_c", 1e-12, 1e3), ("drop_all", 0.0, 1.0),
    ("drop_motion", 0.0, 1.0), ("val_examples", 0, 10_000_000),
    # intervals past the last step mean never (2**62: any Python int torch or a checkpoint holds)
    ("spatial_steps", 0, 2**62), ("checkpoint_every", 1, 2**62), ("val_every", 0, 2**62),
)
_LIMITS_OF_PAIRS = (("appearance_guidance", 0.0, 50.0), ("motion_guidance", 0.0, 50.0))


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "distill"  # "teacher": SVD's denoising loss on all UNet weights; "distill": LoRA student
    steps: int = 1000
    batch: int = 1  # examples per GPU per micro-step
    accumulate: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4
    lr_schedule: str = "constant"  # cosine: warm-up, then decay to 0 at the last step
    weight_decay: float = 0.0
    seed: int = 0
    rank: int = 64
    lora_targets: str = "attention"
    phases: int = 1
    grid: int = obj.GRID_POINTS
    target: str = "ema"  # ema: EMA of the LoRA; student: the student itself (no grad); same-sigma: control
    ema: float = 0.95
    huber_c: float = obj.HUBER_C
    sigma_weight: str = "uniform"
    appearance_guidance: tuple[float, float] = (AnimateConfig.min_appearance_guidance,) * 2  # drawn per example
    motion_guidance: tuple[float, float] = (AnimateConfig.min_motion_guidance,) * 2
    drop_all: float = 0.1  # teacher mode: P(uncond branch: no appearance, image latent, motion)
    drop_motion: float = 0.1  # teacher mode: P(drop branch: no motion)
    spatial_steps: int = 0  # > 0: LoRA of spatial blocks only for these steps, then temporal blocks only
    checkpointing: bool = False
    checkpoint_every: int = 100
    val_every: int = 0
    val_examples: int = 0  # the last examples of DATA, held out and sampled at each validation
    init_lora: str | None = None  # distill: start from this PEFT adapter (same rank, same base UNet)

    def __post_init__(self):
        if self.mode not in ("teacher", "distill"):
            raise OptionError("mode", f"must be teacher or distill, got {self.mode!r}")
        if self.target not in ("ema", "student", "same-sigma"):
            raise OptionError("target", f"must be ema, student or same-sigma, got {self.target!r}")
        if self.lora_targets not in LORA_TARGETS:
            raise OptionError("lora_targets", f"must be one of {', '.join(LORA_TARGETS)}, got {self.lora_targets!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise OptionError("lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        for option, *_ in _LIMITS:
            check_range(option, getattr(self, option), _LIMITS)
        for option in ("appearance_guidance", "motion_guidance"):
            if len(getattr(self, option)) != 2:
                raise OptionError(option, f"must be a (min, max) pair, got {getattr(self, option)!r}")
            for value in getattr(self, option):
                check_range(option, value, _LIMITS_OF_PAIRS)
        try:
            obj.phase_edges(self.grid, self.phases)
        except ValueError as exc:
            raise OptionError("phases", f"{self.phases}: {exc}") from None

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): a pure function of the step, so a resumed run
        continues the schedule with no scheduler state."""
        if self.lr_schedule == "constant":
            return self.lr
        warmup = max(1, round(WARMUP * self.steps))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, self.steps - warmup)))

    def changes(self, other: TrainConfig) -> list[str]:
        return [f.name for f in fields(self) if f.name not in RESUMABLE_CHANGES
                and getattr(self, f.name) != getattr(other, f.name)]


def _tuple_fields(raw: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


class Batches:
    """The first `count` examples of DATA, each epoch in a new order seeded by (seed, epoch): shards in a random
    order, each shard's examples shuffled, so a shard is read once per epoch. A position in this stream is all
    the data state a checkpoint needs."""

    def __init__(self, data: TrainingData, count: int, seed: int):
        self.data, self.count, self.seed = data, count, seed
        self._epoch: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = []
            for shard in torch.randperm(len(self.data.shards), generator=g).tolist():
                start, stop = self.data.starts[shard], min(self.data.starts[shard + 1], self.count)
                order += [start + int(k) for k in torch.randperm(max(stop - start, 0), generator=g)]
            self._epoch = (epoch, order)
        return self._epoch[1]

    def __call__(self, positions: range) -> dict[str, torch.Tensor]:
        rows = [self.data[self._order(p // self.count)[p % self.count]] for p in positions]
        return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


def unet_v(unet, x: torch.Tensor, sigma: torch.Tensor, cond: dict, keep_app: torch.Tensor,
           keep_motion: torch.Tensor, pose_map: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """The UNet's v-prediction for (B,F,4,h,w) latents at per-example sigmas (B,), with the conditions of
    each example kept or zeroed as the guidance branches do (keep_app: appearance and image latent)."""
    b, f = x.shape[:2]
    s = sigma.reshape(b, 1, 1, 1, 1)
    image = (cond["image_latent"] * keep_app.reshape(b, 1, 1, 1))[:, None].expand(-1, f, -1, -1, -1)
    sample = torch.cat([scale_input(x, s), image.to(x.dtype)], dim=2)
    return unet(sample, c_noise(sigma), cond["appearance"] * keep_app.reshape(b, 1, 1),
                cond["motion"] * keep_motion.reshape(b, 1, 1, 1), pose_map, time_ids[None].expand(b, -1))


def branch_masks(branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Branch 0 uncond, 1 drop (appearance only), 2 cond -> (keep_app, keep_motion) as floats."""
    return (branch >= 1).float(), (branch == 2).float()


def guided_teacher_v(unet, x, sigma, cond, pose_map, time_ids, g_app, g_mot) -> torch.Tensor:
    """Three-branch guided v of the teacher: one UNet batch of 3B (uncond, drop, cond)."""
    b = x.shape[0]
    branch = torch.arange(3, device=x.device).repeat_interleave(b)
    keep_app, keep_motion = branch_masks(branch)
    triple = {k: torch.cat([v] * 3) for k, v in cond.items()}
    v = unet_v(unet, torch.cat([x] * 3), sigma.repeat(3), triple, keep_app, keep_motion, pose_map, time_ids)
    uncond, drop, full = v.chunk(3)
    shape = (b, 1, 1, 1, 1)
    return obj.guided_v(uncond, drop, full, g_app.reshape(shape).to(v.dtype), g_mot.reshape(shape).to(v.dtype))


def sample_clips(denoise, noise: torch.Tensor, sigmas: torch.Tensor, sampler: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,F,4,h,w) clips sampled with the runtime's own samplers: the B clips are laid end to end as one
    window of B*F frames, which the denoiser `denoise(x (B,F,...), step)` sees split again."""
    b, f = noise.shape[:2]
    x = (noise * sigmas[0]).flatten(0, 1)
    window = {"window": b * f, "overlap": 0, "shift_offset": 0}

    def flat(xw, step, index):
        return denoise(xw.reshape(b, f, *xw.shape[1:]), step).flatten(0, 1)

    if sampler == "lcm":
        out = sample_lcm_windows(flat, x, sigmas, generator, **window)
    else:
        out = sample_euler_windows(flat, x, sigmas, **window)
    return out.reshape(noise.shape)


def student_sigmas(phases: int, steps: int) -> tuple[torch.Tensor, str]:
    """The runtime's fast-mode schedule for a student: LCM over `steps` Karras sigmas for one phase, the
    deterministic Euler sampler over the K phase edges for K > 1 (`animate --mode fast --sampler euler
    --steps K`)."""
    a = AnimateConfig()
    if phases == 1:
        return karras_sigmas(steps, a.sigma_min, a.sigma_max), "lcm"
    return karras_sigmas(phases, a.sigma_min, a.sigma_max), "euler"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Logger:
    """log.csv (and TensorBoard when installed), rank 0 only; rows appended, so a resumed run continues it."""

    COLUMNS = ("step", "loss", "lr", "seconds", "val_mse")

    def __init__(self, run: Path, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = run / "log.csv"
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():  # drop rows after the checkpoint: they are about to be redone
            rows = list(csv.DictReader(self.path.open()))
            rows = [r for r in rows if int(r["step"]) <= resume_step]
        else:
            rows = []
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tb = None

    def row(self, step: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow({"step": step, **values})
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)


@dataclass
class TrainResult:
    run: Path
    steps: int
    loss: float
    output: Path


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (WORLD_SIZE set) or alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def check_data_fits(data: TrainingData, unet, pose_map: torch.Tensor) -> None:
    latents, appearance = data.fields["latents"][0], data.fields["appearance"][0]
    if latents[2:] != list(pose_map.shape[-2:]) or latents[1] != unet.config.out_channels:
        raise DataError(f"{data.path}: the data's latents are {latents[1:]}, the model makes "
                        f"{[unet.config.out_channels, *pose_map.shape[-2:]]} (data prepared for another crop size?)")
    if appearance[-1] != unet.config.cross_attention_dim:
        raise DataError(f"{data.path}: tokens of width {appearance[-1]}, the UNet attends to "
                        f"{unet.config.cross_attention_dim}")


@torch.no_grad()
def load_initial_lora(trainable: dict[str, torch.nn.Parameter], path: str, rank: int) -> None:
    """Copy a saved adapter into the student's LoRA weights; one of another rank or base is refused."""
    from hyportrait.networks.lora import read_lora

    state, adapter = read_lora(path)
    if adapter.get("r", rank) != rank:
        raise WeightsError(f"{path}: a LoRA of rank {adapter['r']}, this run trains rank {rank} (--rank)")
    own = {n.replace(".default.", "."): p for n, p in trainable.items()}
    problems = sorted(set(own) ^ set(state))[:3] or [n for n in own if own[n].shape != state[n].shape][:3]
    if problems:
        raise WeightsError(f"{path}: a LoRA of another base UNet (e.g. {', '.join(problems)})")
    for name, param in own.items():
        param.copy_(state[name])


def _is_temporal(name: str) -> bool:
    return "temporal_transformer_blocks" in name


class EMA:
    """Exponential moving average of the LoRA weights, swapped into the student for the target's forward."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    # one fused launch per list, not one per LoRA matrix (hundreds of them): the step is partly launch-bound
    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_([self.shadow[n] for n in self.params], list(self.params.values()), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        params = list(self.params.values())
        with torch.no_grad():
            saved = torch._foreach_mul(params, 1.0)
            torch._foreach_copy_(params, [self.shadow[n] for n in self.params])
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)


class Trainer:
    """One run: the model set up for its mode, the optimizer, and the loss of one micro-batch."""

    def __init__(self, config: TrainConfig, unet, pose_map: torch.Tensor, device: torch.device, world: int):
        self.config, self.device = config, device
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        unet.set_engine_rewrites(True)  # the same function up to rounding; shared contexts projected once
        if config.checkpointing:
            unet.enable_gradient_checkpointing()
        if config.mode == "teacher":
            self.model = unet.requires_grad_(True)
        else:
            try:
                from peft import LoraConfig, get_peft_model
                from peft.tuners.tuners_utils import BaseTunerLayer
            except ImportError:
                raise RunError("distill mode needs peft: pip install 'hyportrait[train]'") from None

            unet.requires_grad_(False)
            torch.manual_seed(config.seed)  # peft draws lora_A from the global generator: same run, same start
            self.model = get_peft_model(unet, LoraConfig(r=config.rank, lora_alpha=config.rank,
                                                         target_modules=LORA_TARGETS[config.lora_targets]))
            self.adapter_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]  # teacher()
        self.model.to(device).train()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if config.init_lora:
            load_initial_lora(self.trainable, config.init_lora, config.rank)
        self.ddp = self.model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # static graph: every step uses the same parameters (checkpointing recomputes the forward in backward),
            # but not with gradient accumulation: DDP's static graph fails under no_sync() (pytorch#143580);
            # gradients stay views into the all-reduce buckets (no copy back); no buffers differ between ranks
            self.ddp = DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None,
                                               static_graph=config.accumulate == 1, gradient_as_bucket_view=True,
                                               broadcast_buffers=False)
        groups = [[p for n, p in self.trainable.items() if _is_temporal(n) == t] for t in (False, True)]
        self.optimizer = torch.optim.AdamW([{"params": g} for g in groups if g], lr=config.lr,
                                           weight_decay=config.weight_decay, fused=device.type == "cuda",
                                           foreach=device.type != "cuda")  # CPU: one call per list, not per tensor
        self.ema = EMA(self.trainable, config.ema) if config.mode == "distill" and config.target == "ema" else None
        self.pose_map = pose_map.to(device)
        a = AnimateConfig()
        self.time_ids = torch.tensor([a.fps_condition, a.motion_bucket_id, a.noise_aug_strength], device=device)
        self.sigmas = obj.sigma_grid(config.grid, a.sigma_min, a.sigma_max).to(device)
        self.edges = obj.phase_edges(config.grid, config.phases)

    @contextlib.contextmanager
    def teacher(self):
        """The frozen base UNet: every adapter layer switched off, as peft's `disable_adapter()` does, without
        its check of the whole model's state on each call (at the toy's size 60 ms a step, 7 % of it)."""
        for layer in self.adapter_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.adapter_layers:
                layer.enable_adapters(True)

    def _uniform(self, bounds, b, g) -> torch.Tensor:
        return (bounds[0] + (bounds[1] - bounds[0]) * torch.rand(b, generator=g)).to(self.device)

    def loss(self, batch: dict, g: torch.Generator) -> torch.Tensor:
        c = self.config
        x0 = batch["latents"]
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        cond = {k: batch[k] for k in ("image_latent", "appearance", "motion")}
        ones = torch.ones(b, device=self.device)
        if c.mode == "teacher":
            sigma = obj.edm_training_sigma(g, b, device=self.device)
            r = torch.rand(b, generator=g).to(self.device)
            branch = torch.where(r < c.drop_all, 0, torch.where(r < c.drop_all + c.drop_motion, 1, 2))
            noisy = x0 + sigma.reshape(b, 1, 1, 1, 1) * noise
            with self.autocast:
                v = unet_v(self.ddp, noisy, sigma, cond, *branch_masks(branch), self.pose_map, self.time_ids)
            return obj.denoising_loss(x0, v, noisy, sigma.reshape(b, 1, 1, 1, 1))
        index = torch.randint(0, c.grid, (b,), generator=g).to(self.device)
        sig, sig_next = self.sigmas[index], self.sigmas[index + 1]
        edge = self.sigmas[obj.lower_edge(index, self.edges)]
        s5, n5, e5 = (t.reshape(b, 1, 1, 1, 1) for t in (sig, sig_next, edge))
        x = x0 + s5 * noise
        g_app, g_mot = self._uniform(c.appearance_guidance, b, g), self._uniform(c.motion_guidance, b, g)
        with torch.no_grad(), self.autocast:
            with self.teacher():
                v_teacher = guided_teacher_v(self.model, x, sig, cond, self.pose_map, self.time_ids, g_app, g_mot)
            x_next = obj.teacher_step(x, v_teacher.float(), s5, n5)
            target = None
            if c.target != "same-sigma":
                with self.ema.swapped() if self.ema else contextlib.nullcontext():
                    v_target = unet_v(self.model, x_next, sig_next.clamp_min(self.sigmas[c.grid - 1]), cond,
                                      ones, ones, self.pose_map, self.time_ids)
                target = obj.distill_target(x_next, v_target.float(), n5, e5)
        with self.autocast:
            v = unet_v(self.ddp, x, sig, cond, ones, ones, self.pose_map, self.time_ids)
        pred = obj.consistency(x, v.float(), s5, e5)
        if target is None:  # negative control: the student's own value at the same sigma
            target = pred.detach()
        return obj.pseudo_huber(pred, target, obj.interval_weight(sig, sig_next, c.sigma_weight), c.huber_c)

    def mask_stage(self, step: int) -> None:
        """Spatial-then-temporal option: the other stage's gradients are dropped (AdamW skips them)."""
        if self.config.spatial_steps <= 0 or self.config.mode != "distill":
            return
        temporal_now = step >= self.config.spatial_steps
        for n, p in self.trainable.items():
            if _is_temporal(n) != temporal_now:
                p.grad = None

    @torch.no_grad()
    def sample(self, batch: dict, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Held-out clips as the runtime samples them: the student in fast mode, the teacher in quality mode."""
        self.model.eval()
        cond = {k: batch[k].to(self.device) for k in ("image_latent", "appearance", "motion")}
        args = (self.model, cond, noise.to(self.device), self.pose_map, self.time_ids)
        with self.autocast:
            if self.config.mode == "teacher":
                out = sample_teacher(*args, steps=AnimateConfig().num_steps)
            else:
                out = sample_student(*args, steps=AnimateConfig.fast().num_steps, phases=self.config.phases,
                                     generator=generator)
        self.model.train()
        return out.float()


@torch.no_grad()
def sample_teacher(unet, cond: dict, noise: torch.Tensor, pose_map, time_ids, steps: int,
                   guidance: float = AnimateConfig.min_appearance_guidance) -> torch.Tensor:
    """Quality mode: Euler over `steps` Karras sigmas with the three guidance branches."""
    a, b = AnimateConfig(), noise.shape[0]
    sigmas = karras_sigmas(steps, a.sigma_min, a.sigma_max).to(noise.device)
    g = torch.full((b,), guidance, device=noise.device)

    def denoise(x, step):
        return guided_teacher_v(unet, x, sigmas[step].expand(b), cond, pose_map, time_ids, g, g)

    return sample_clips(denoise, noise, sigmas, "euler")


@torch.no_grad()
def sample_student(unet, cond: dict, noise: torch.Tensor, pose_map, time_ids, steps: int, phases: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Fast mode: one UNet call per step, no guidance (LCM for one phase, Euler over the phase edges else)."""
    sigmas, sampler = student_sigmas(phases, steps)
    sigmas, b = sigmas.to(noise.device), noise.shape[0]
    ones = torch.ones(b, device=noise.device)

    def denoise(x, step):
        return unet_v(unet, x, sigmas[step].expand(b), cond, ones, ones, pose_map, time_ids)

    return sample_clips(denoise, noise, sigmas, sampler, generator)


def _checkpoint_state(trainer: Trainer, step: int) -> dict:
    return {"config": asdict(trainer.config), "step": step,
            "trainable": {n: p.detach().cpu() for n, p in trainer.trainable.items()},
            "ema": trainer.ema.shadow if trainer.ema else None, "optimizer": trainer.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}


def _resume(trainer: Trainer, path: Path) -> int:
    """Load RUN/checkpoint.pt into the trainer; returns the step it was written after."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = TrainConfig(**_tuple_fields(state["config"]))
    changed = trainer.config.changes(saved)
    if changed:
        raise RunError(f"{path.parent} was started with another config ({', '.join(changed)} differ): resume "
                       "with the same options or use a new --out")
    with torch.no_grad():
        for n, p in trainer.trainable.items():
            p.copy_(state["trainable"][n])
    if trainer.ema:
        trainer.ema.shadow = {n: t.to(trainer.device) for n, t in state["ema"].items()}
    trainer.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def _save_output(trainer: Trainer, run: Path) -> Path:
    """distill: RUN/lora (PEFT folder); teacher: RUN/unet.safetensors (the whole UNet's weights)."""
    if trainer.config.mode == "teacher":
        path = run / "unet.safetensors"
        state = {k: v.detach().float().contiguous().cpu() for k, v in trainer.model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))
        return path
    import shutil

    path, partial = run / "lora", run / ".lora.partial"
    shutil.rmtree(partial, ignore_errors=True)
    trainer.model.save_pretrained(str(partial))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)
    return path


def data_identity(data: TrainingData) -> dict:
    return {"path": str(data.path), "examples": len(data), "config": data.config,
            "shards_sha256": [s["sha256"] for s in data.shards]}


def train(config: TrainConfig, data_path: str | Path, run: str | Path, unet, pose_map: torch.Tensor,
          weights: str = "tiny-random", log_every: int = 1) -> TrainResult:
    """Train `unet` (a UNetWithAdapters; teacher mode changes it in place) on DATA into RUN, resuming RUN's
    checkpoint when there is one. Random draws come from a generator seeded by (seed, step, rank), so a resumed
    run draws what the uninterrupted run would have."""
    rank, world, device = _distributed()
    run = Path(run)
    data = TrainingData(data_path)
    check_data_fits(data, unet, pose_map)
    count = len(data) - config.val_examples
    if count < 1:
        raise DataError(f"{data.path}: {len(data)} examples, {config.val_examples} held out for validation: "
                        "none left to train on")
    trainer = Trainer(config, unet, pose_map, device, world)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
    start = _resume(trainer, run / CHECKPOINT) if (run / CHECKPOINT).is_file() else 0
    logger = Logger(run, rank == 0, start)
    batches = Batches(data, count, config.seed)
    held_out = {k: torch.stack([data[i][k] for i in range(count, len(data))]) for k in data.fields} \
        if config.val_examples else None
    record = {"weights": weights, "data": data_identity(data), "config": asdict(config), "commit": git_commit(),
              "world_size": world, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    loss_value, per_step = float("nan"), config.batch * world * config.accumulate
    for step in range(start, config.steps):
        tic = time.perf_counter()
        total = torch.zeros((), device=device)  # summed on the device: no host sync per micro-batch
        for micro in range(config.accumulate):
            base = step * per_step + micro * config.batch * world + rank * config.batch
            batch = {k: v.to(device) for k, v in batches(range(base, base + config.batch)).items()}
            g = torch.Generator().manual_seed(((config.seed * 1_000_003 + step) * 8191 + micro) * 131 + rank)
            last = micro == config.accumulate - 1
            sync = contextlib.nullcontext() if last or world == 1 else trainer.ddp.no_sync()
            with sync:
                loss = trainer.loss(batch, g) / config.accumulate
                loss.backward()
            total += loss.detach()
        trainer.mask_stage(step)
        lr = config.lr_at(step)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.ema:
            trainer.ema.update()
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            if world > 1:
                dist.all_reduce(total)
            loss_value = total.item() / world
            logger.row(done, loss=f"{loss_value:.6g}", lr=f"{lr:.6g}", seconds=f"{time.perf_counter() - tic:.4f}")
        if held_out is not None and config.val_every and (done % config.val_every == 0 or done == config.steps):
            noise = torch.randn(held_out["latents"].shape, generator=torch.Generator().manual_seed(config.seed))
            sample = trainer.sample(held_out, noise, torch.Generator(device).manual_seed(config.seed))
            logger.row(done, val_mse=f"{(sample.cpu() - held_out['latents'].float()).square().mean().item():.6g}")
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            with atomic_path(run / CHECKPOINT) as tmp:
                torch.save(_checkpoint_state(trainer, done), tmp)
    output = run / ("unet.safetensors" if config.mode == "teacher" else "lora")
    if rank == 0:
        output = _save_output(trainer, run)
        record.update(finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), steps=config.steps,
                      final_loss=loss_value, output=output.name)
        write_json(run / "run.json", record)
    if world > 1:
        dist.barrier()
    return TrainResult(run, config.steps, loss_value, output)


def load_networks_for(weights: str | Path | None):
    """The official networks of a weights folder, or the tiny random-weight ones (as `animate` without
    --weights); bad folders raise bad_weights with the per-file report."""
    from hyportrait.networks.weights import load_networks, random_networks

    if weights is None:
        return random_networks("tiny")
    if not Path(weights).is_dir():
        raise WeightsError(f"{weights}: no such weights folder")
    return load_networks(weights)
