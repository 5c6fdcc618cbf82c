"""The runtime: one loop over torch / onnxruntime sessions, the samplers and guidance modes, the embedding API.

The expensive fixtures are shared: the session's tiny export and tiny torch models (conftest.py), two
module-scoped Animators and the torch one's frames of the sample; the clip is 6 driving frames.
"""
import gc
import io
import json
import signal
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from hyportrait.engines.quality import psnr
from hyportrait.errors import HyportraitError, InputError
from hyportrait.files import SAMPLE_IMAGE, SAMPLE_VIDEO
from hyportrait.networks.weights import random_networks
from hyportrait.runtime import distributed
from hyportrait.runtime.api import Animator
from hyportrait.runtime.backends import BackendError, TorchSession, resolve_device
from hyportrait.runtime.float8 import Float8Linear, check_float8_device, to_float8
from hyportrait.runtime.models import torch_models
from hyportrait.runtime.pipeline import (
    GUIDANCE_BRANCHES,
    AnimateConfig,
    Conditioning,
    build_conditioning,
    consumed_in_background,
    decode_frames,
    guided_denoiser,
    motion_tokens,
    prefetched,
    sample_latents,
    sampler_sigmas,
)
from hyportrait.runtime.sampling import (
    c_noise,
    denoised_from_v,
    karras_sigmas,
    sample_lcm_windows,
    scale_input,
)
from hyportrait.runtime.video import probe_video

FRAMES = 6
# the tiny export makes 64 px crops with a 4-frame UNet; overlap 1 and one pad frame at each end (not the
# official 15) keep the windows few
CLIP = {"max_frames": FRAMES, "num_steps": 2, "overlap": 1, "pad_frames": 1}
TINY = {"size": 64, "window": 4, **CLIP}



@pytest.fixture(scope="module")
def torch_animator(tiny_models):
    return Animator(tiny_models, window=4, **CLIP)


@pytest.fixture(scope="module")
def torch_frames(torch_animator) -> np.ndarray:
    """The torch Animator's frames of the sample, given as paths (the reference several tests compare with)."""
    return np.stack(list(torch_animator.frames(SAMPLE_IMAGE, SAMPLE_VIDEO)))


@pytest.fixture(scope="module")
def ort_animator(tiny_export):
    return Animator(tiny_export, backend="onnxruntime", device="cpu", **CLIP)


def small_conditioning(models, config, seed=0) -> tuple[Conditioning, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    motion = motion_tokens(models, torch.rand(5, 3, 256, 256, generator=gen), torch.rand(5, 3, 256, 256, generator=gen),
                           3, 7)
    generator = torch.Generator().manual_seed(config.seed)
    cond = build_conditioning(models, config, ref_image=torch.rand(3, 64, 64, generator=gen) * 2 - 1,
                              dino_image=torch.randn(3, 224, 224, generator=gen),
                              id_embedding=torch.nn.functional.normalize(torch.randn(512, generator=gen), dim=0),
                              motion=motion, generator=generator)
    return cond, generator


def test_the_faithful_unet_session_is_the_official_call_bit_for_bit():
    """The loop's UNet batch through the torch session equals calling the UNet as the official pipeline does:
    appearance and pose map expanded per frame, 0-dim timestep, three branches."""
    config = AnimateConfig(precision="fp32", device="cpu", size=64, window=4, num_steps=2, pad_frames=2)
    nets = random_networks("tiny")
    models = torch_models(nets, device="cpu", dtype=torch.float32, size=64)
    cond, _ = small_conditioning(models, config)
    sigmas = sampler_sigmas(config, "cpu")
    x = torch.randn(4, 4, 8, 8)
    index = torch.tensor([0, 1, 2, 3])
    calls = []
    original = models.unet.module.forward
    models.unet.module.forward = lambda **kw: calls.append(kw) or original(**kw)
    guided = guided_denoiser(models.unet, cond, sigmas, config)(x, 0, index)

    x_in = scale_input(x, sigmas[0])[None].expand(3, *x.shape)
    image = torch.stack([torch.zeros_like(cond.image_latent), cond.image_latent, cond.image_latent])
    appearance = torch.stack([torch.zeros_like(cond.appearance), cond.appearance, cond.appearance])
    motion = cond.motion.index_select(0, index)
    with torch.no_grad():
        v = nets.unet(torch.cat([x_in, image[:, None].expand(3, 4, -1, -1, -1)], dim=2), c_noise(sigmas[0]),
                      appearance[:, None].expand(3, 4, -1, -1),
                      torch.stack([torch.zeros_like(motion), torch.zeros_like(motion), motion]),
                      cond.pose[None, None].expand(3, 4, -1, -1, -1), cond.added_time_ids[None].expand(3, -1))
    uncond, drop, full = v
    expected = uncond + 2.0 * (drop - uncond) + 2.0 * (full - drop)
    assert len(calls) == 1 and calls[0]["sample"].shape[0] == 3
    assert torch.equal(guided, expected)


@pytest.mark.parametrize("branches", [1, 2, 3])
def test_guidance_branches_set_the_unet_batch(tiny_models, branches):
    config = AnimateConfig(precision="fp32", device="cpu", size=64, window=4, num_steps=2, pad_frames=1,
                           guidance_branches=branches, min_motion_guidance=3.0, max_motion_guidance=3.0)
    cond, _ = small_conditioning(tiny_models, config)
    seen = []

    def unet(**kw):
        seen.append(kw)
        # branches 0, 1, 2 (uncond, appearance, full) output 1, 2, 3
        values = [1.0 + b for b in GUIDANCE_BRANCHES[branches]]
        return torch.tensor(values)[:, None, None, None, None].expand(branches, 4, 4, 8, 8)

    out = guided_denoiser(unet, cond, sampler_sigmas(config, "cpu"), config)(torch.zeros(4, 4, 8, 8), 0,
                                                                               torch.arange(4))
    batch = seen[0]
    assert batch["sample"].shape[0] == batch["appearance_tokens"].shape[0] == batch["motion_tokens"].shape[0] == branches
    # the last branch always has motion; an earlier one never does
    assert batch["motion_tokens"][-1].abs().sum() > 0 and batch["motion_tokens"][:-1].abs().sum() == 0
    expected = {1: 3.0, 2: 2.0 + 3.0 * (3.0 - 2.0), 3: 1.0 + 2.0 * (2.0 - 1.0) + 3.0 * (3.0 - 2.0)}[branches]
    assert torch.allclose(out, torch.full_like(out, expected))


def test_lcm_sampler_reaches_a_perfect_models_target_and_reuses_windows():
    """A model whose denoised estimate is always `target` must give `target` after the last step, whatever the
    noise; and every frame of the clip is covered by the windows each step."""
    target = torch.randn(7, 4, 2, 2)
    sigmas = karras_sigmas(4)
    seen = []

    def denoise(xw, step, index):
        seen.append((step, index.tolist()))
        sigma = sigmas[step]
        # v such that denoised_from_v(xw, v, sigma) == target[index]
        return (xw / (sigma**2 + 1) - target[index]) * (sigma**2 + 1) ** 0.5 / sigma

    x = torch.randn(7, 4, 2, 2) * sigmas[0]
    out = sample_lcm_windows(denoise, x, sigmas, torch.Generator().manual_seed(0), window=4, overlap=1,
                             shift_offset=1)
    assert torch.allclose(out, target, atol=1e-4)
    assert torch.allclose(denoised_from_v(x[:4], denoise(x[:4], 0, torch.arange(4)), sigmas[0]), target[:4],
                          atol=1e-3)
    for step in range(4):
        covered = {i for s, index in seen if s == step for i in index}
        assert covered == set(range(7))


def test_fast_mode_config():
    fast = AnimateConfig.fast(seed=3)
    assert (fast.sampler, fast.num_steps, fast.guidance_branches, fast.seed) == ("lcm", 4, 1, 3)
    assert (fast.video_preset, AnimateConfig().video_preset) == ("veryfast", "medium")
    with pytest.raises(ValueError, match="guidance_branches"):
        AnimateConfig(guidance_branches=4)
    with pytest.raises(ValueError, match="video_preset must be one of ultrafast"):
        AnimateConfig(video_preset="quick")


def test_the_video_preset_reaches_the_encoder(tmp_path, torch_animator):
    fast = Animator(torch_animator.models, mode="fast", window=4, **CLIP)
    for animator, subme in ((torch_animator, b"subme=7"), (fast, b"subme=2")):  # x264 writes its settings
        result = animator.animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / animator.config.video_preset)
        assert subme in result.cropped.read_bytes() and subme in result.full_resolution.read_bytes()


def small_run(config_options: dict | None = None, **model_options) -> tuple:
    """A short clip through tiny random torch models (the same networks each call): (models, config,
    conditioning, the sampling generator's start state, latents, decoded frames). One guidance branch (the
    branches' batch is tested on its own) and one decoder chunk of all 7 latents keep the UNet's and the
    decoder's calls to one shape each, which also keeps test_compiled_torch_models_follow_the_eager_ones's
    tracing short."""
    config = AnimateConfig(**{"precision": "fp32", "device": "cpu", "size": 64, "window": 4, "num_steps": 2,
                              "pad_frames": 1, "guidance_branches": 1, "decode_chunk": 7,
                              **(config_options or {})})
    models = torch_models(random_networks("tiny"), device="cpu", dtype=torch.float32, size=64, **model_options)
    cond, generator = small_conditioning(models, config)
    start = generator.get_state()
    latents = sample_latents(models, cond, config, generator)
    return models, config, cond, start, latents, np.stack(list(decode_frames(models, latents, config, cond.num_pad)))


def small_run_frames(config_options: dict | None = None, **model_options) -> np.ndarray:
    return small_run(config_options, **model_options)[-1]


@pytest.fixture(scope="module")
def rewritten_frames() -> np.ndarray:
    """`small_run_frames` of the models with the engine rewrites (the reference of the faithful and float8 runs)."""
    return small_run_frames(faithful=False)


def test_rewritten_torch_models_follow_the_faithful_ones(rewritten_frames):
    faithful = small_run_frames(faithful=True)
    assert faithful.shape == (5, 64, 64, 3)
    assert psnr(faithful, rewritten_frames, data_range=255) > 45


def test_compiled_torch_models_follow_the_eager_ones(rewritten_frames):
    # the graphs inductor would compile, decomposed as it does, run without its code generation (minutes on a
    # CPU); small_run's one UNet and one decoder shape keep the tracing short (decoder chunks of 5 traced the
    # decoder twice, at 5 and 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked workers below run one thread (rounding depends on the thread count)
    try:
        models, config, cond, start, latents, compiled = small_run(faithful=False,
                                                                   compile="aot_eager_decomp_partition")
        assert compiled.shape == rewritten_frames.shape
        assert psnr(compiled, rewritten_frames, data_range=255) > 45

        # the compiled models in window-parallel sampling over 2 processes (gloo; forked, they reuse the traced
        # graphs): the one-process latents, bit for bit
        def worker(group):
            generator = torch.Generator()
            generator.set_state(start)
            mine = sample_latents(models, cond, config, generator, map_windows=distributed.window_parallel(group))
            return torch.equal(mine, latents)

        assert distributed.launch(worker, 2, device_type="cpu", timeout_s=120) is True
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device)")
def test_cuda_graph_sessions_called_from_several_threads_take_turns():
    """The service calls one session from several threads (overlapped stages): each call gets its own inputs'
    outputs, as eager runs give them, although the captured graph has one set of static buffers."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.GELU(),
                                 torch.nn.Conv2d(32, 4, 3, padding=1)).cuda().eval()
    session = TorchSession("toy", module, {"input": torch.float32}, cuda_graph=True)
    inputs = [torch.randn(2, 4, 64, 64, device="cuda") for _ in range(16)]
    with torch.no_grad():
        expected = [module(x) for x in inputs]
    results: list = []  # (input index, output) of every call

    def calls(thread: int):
        stream = torch.cuda.Stream()  # each thread on a stream of its own, as the service's stages may be
        with torch.cuda.stream(stream):
            for _ in range(20):
                for i in range(thread, len(inputs), 2):
                    results.append((i, session(input=inputs[i])))
        stream.synchronize()

    threads = [threading.Thread(target=calls, args=(t,)) for t in (0, 1)]
    torch.cuda.synchronize()  # the inputs, made on the default stream, are ready for the threads' streams
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 320 and all(torch.allclose(out, expected[i], atol=1e-4) for i, out in results)


def test_a_float8_linear_is_the_gemm_of_its_quantized_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(2, 7, 64) * 3
    fp8 = Float8Linear(linear)
    # the same values through an fp32 matmul: e4m3 operands times their per-tensor scales, plus the bias
    (xq, xs), (wq, ws) = to_float8(x), to_float8(linear.weight.detach())
    expected = (xq.float() * xs) @ (wq.float() * ws).T + linear.bias
    with torch.no_grad():
        out, exact = fp8(x), linear(x)
    assert out.shape == (2, 7, 48) and fp8.bias is linear.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert 0.005 < ((out - exact).norm() / exact.norm()).item() < 0.05  # e4m3 keeps 3 mantissa bits


def test_float8_models_convert_the_transformer_linears_of_a_copy(rewritten_frames):
    nets = random_networks("tiny")
    models = torch_models(nets, device="cpu", dtype=torch.float32, size=64, faithful=False, float8=True)
    converted = [name for name, m in models.unet.module.named_modules() if isinstance(m, Float8Linear)]
    assert converted and all(".attentions." in name and "time_pos_embed" not in name for name in converted)
    assert any(name.endswith("attn2.to_q") for name in converted)
    assert any(name.endswith("ff.net.2") for name in converted)
    assert not any(isinstance(m, Float8Linear) for m in nets.unet.modules())  # the fp32 UNet is untouched
    assert "float8-linears" in models.description
    frames = small_run_frames(faithful=False, float8=True)
    assert frames.shape == rewritten_frames.shape and 24 < psnr(frames, rewritten_frames, data_range=255) < 45


def test_float8_is_refused_where_it_cannot_run(tiny_export, monkeypatch):
    with pytest.raises(InputError, match="float8 applies to the torch backend"):
        Animator(tiny_export, backend="onnxruntime", device="cpu", float8=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="compute capability 8.9 or newer.*A100 is 8.0"):
        check_float8_device(torch.device("cuda"))


def test_onnxruntime_backend_matches_the_torch_reference(tmp_path, torch_animator, ort_animator, torch_frames):
    """CI's end-to-end check: the same tiny networks through the exported models (onnxruntime CPU, fp32)
    and through PyTorch, same seed: same frame count, fps and audio, PSNR >= 40 dB."""
    results = [a.animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / name)
               for name, a in (("torch", torch_animator), ("ort", ort_animator))]
    infos = [(probe_video(r.cropped), probe_video(r.full_resolution)) for r in results]
    for cropped, full in infos:
        assert (cropped.num_frames, cropped.has_audio, full.has_audio) == (FRAMES, True, True)
        assert cropped.fps == full.fps == probe_video(SAMPLE_VIDEO).fps
    frames = [torch_frames, np.stack(list(ort_animator.frames(SAMPLE_IMAGE, SAMPLE_VIDEO)))]
    assert frames[0].shape == frames[1].shape == (FRAMES, 64, 64, 3)
    assert psnr(*frames, data_range=255) >= 40
    assert set(results[1].timings) >= {"preprocess", "conditioning", "denoise", "decode_encode", "total",
                                       "busy_decode", "busy_write_cropped", "busy_write_full"}
    assert 0 < results[1].timings["busy_write_full"] < results[1].timings["decode_encode"]


def test_api_takes_bytes_and_arrays(torch_animator, torch_frames):
    image_bytes = SAMPLE_IMAGE.read_bytes()
    array = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    from_plain = np.stack(list(torch_animator.frames(array, SAMPLE_VIDEO.read_bytes())))
    assert np.array_equal(torch_frames, from_plain)


def test_an_animator_over_models_built_by_the_caller(torch_animator, torch_frames):
    """Models built outside the Animator (custom sessions, the benchmarks) run the same animation as the
    Animator that builds the torch backend's models itself."""
    animator = Animator(backend="torch", device="cpu", faithful=False, **TINY)
    assert (torch_animator.backend, torch_animator.config.size, torch_animator.config.window) == ("torch", 64, 4)
    assert np.array_equal(torch_frames, np.stack(list(animator.frames(SAMPLE_IMAGE, SAMPLE_VIDEO))))


def test_prefetched_keeps_order_raises_and_stops_early():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("decoder failed")

    with pytest.raises(ValueError, match="decoder failed"):
        list(prefetched(failing(), depth=2))
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    stream = prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # stops and joins the producer
    assert len(produced) <= 5


def test_background_work_runs_on_reused_threads():
    """CUDA libraries keep caches per thread (cuDNN's execution plans): the next stream's background work runs on
    the thread the last one used, which has them, not on a new thread that builds them again."""
    def where():
        yield threading.current_thread()

    first, second = (list(prefetched(where(), depth=1)) for _ in range(2))
    assert first == second and first[0] is not threading.current_thread()
    assert first[0].name == "idle worker"  # named after its task only while it runs one


def test_an_idle_worker_keeps_nothing_of_its_last_task():
    """A stream stopped early: its producer's source (here a stand-in for a URL's container, or the clip's
    latents) is freed when the stream closes, not kept by the idle worker until its next task."""
    class Source:
        pass

    def endless(source):
        while True:
            yield source

    source = Source()
    freed = weakref.ref(source)
    stream = prefetched(endless(source), depth=1)
    del source
    next(stream)
    stream.close()
    assert freed() is None


def test_consumed_in_background_keeps_order_and_raises_a_failure_in_the_caller():
    seen = []
    with consumed_in_background(seen.append, depth=2, name="test") as hand_over:
        for i in range(50):
            hand_over(i)
    assert seen == list(range(50))

    def failing(item):
        if item == 3:
            raise OSError(28, "No space left on device")
        seen.append(item)

    seen.clear()
    # a full queue never blocks the caller once the consumer failed
    with pytest.raises(OSError, match="No space"), consumed_in_background(failing, depth=1, name="t") as hand_over:
        for i in range(1000):
            hand_over(i)
    assert seen == [0, 1, 2]
    # a failure on the last items surfaces when the block ends
    with pytest.raises(OSError, match="No space"), consumed_in_background(failing, depth=8, name="t") as hand_over:
        for i in range(4):
            hand_over(i)


class _Interrupted(Exception):
    pass


def test_an_interrupt_while_the_block_waits_for_its_consumer_still_waits_for_it():
    """The CLI's SIGINT/SIGTERM handler raises in the main thread while it waits for an encoder thread: the block
    must not end (and close the writers) before that thread has. A Thread.join interrupted there marks the
    thread as ended before Python 3.13, which crashed the encoder in a full suite (SIGTERM at frame 2)."""
    log = []

    def consume(item):
        time.sleep(0.2)  # the caller has handed its one item over and waits for the end
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        time.sleep(0.3)
        log.append(item)

    def raise_interrupted(signum, frame):
        raise _Interrupted

    handler = signal.signal(signal.SIGUSR1, raise_interrupted)
    try:
        with pytest.raises(_Interrupted), consumed_in_background(consume, depth=2, name="t") as hand_over:
            hand_over("frame")
        assert log == ["frame"]  # consumed before the block ended, not after
    finally:
        deadline = time.monotonic() + 5
        while not log and time.monotonic() < deadline:  # a late consumer never signals the next test
            time.sleep(0.05)
        signal.signal(signal.SIGUSR1, handler)


@pytest.mark.parametrize("segmented", [False, True])
def test_a_failing_output_write_is_a_clear_error_and_leaves_nothing(tmp_path, torch_animator, monkeypatch,
                                                                    segmented):
    """The full-resolution video is pasted and encoded on its own thread: its failure still reaches the
    caller as an input error, neither video nor the result folder is left behind, and the thread that decodes
    (or preprocesses, sampling in segments) ahead of the writing has stopped when the call returns, not when
    the garbage collector finds it (at the interpreter's exit it could wait for it forever)."""
    from hyportrait.runtime import api

    calls = []

    class PasteBackUntilTheDiskFills(api.PasteBack):
        def __call__(self, frame):
            calls.append(1)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            return super().__call__(frame)

    monkeypatch.setattr(api, "PasteBack", PasteBackUntilTheDiskFills)
    # the whole sample (36 frames), decoded a frame at a time: its threads are still at work when the write fails
    animator = torch_animator.with_options(max_frames=36, decode_chunk=1, **({"segment": 4} if segmented else {}))
    before = set(threading.enumerate())  # other files' threads (a service's) may live in this process
    gc.disable()  # only the call itself may stop its threads
    try:
        with pytest.raises(InputError, match="cannot write the output videos.*No space left"):
            animator.animate(SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path)
        assert not [t.name for t in set(threading.enumerate()) - before if t.name.startswith("hyportrait-")]
    finally:
        gc.enable()
    assert not list(tmp_path.rglob("*"))


def test_a_clip_shorter_than_one_window(torch_animator):
    animator = Animator(torch_animator.models, **{**TINY, "num_steps": 1, "pad_frames": 0, "max_frames": 2})
    frames = list(animator.frames(SAMPLE_IMAGE, SAMPLE_VIDEO))
    assert len(frames) == 2 and frames[0].shape == (64, 64, 3)


def test_errors_are_clear(tmp_path, tiny_export, torch_animator):
    with pytest.raises(InputError, match="needs `models`"):
        Animator(backend="onnxruntime", device="cpu")
    with pytest.raises(InputError, match="no manifest.json"):
        Animator(tmp_path, backend="onnxruntime", device="cpu")
    with pytest.raises(InputError, match="unknown option"):
        Animator(backend="torch", device="cpu", num_stepz=3)
    with pytest.raises(InputError, match="overlap must be in"):
        Animator(backend="torch", device="cpu", **{**TINY, "overlap": 4})
    with pytest.raises(InputError, match="unknown backend"):
        resolve_device("cpu", "openvino")
    with pytest.raises(BackendError, match="CUDA GPU"):
        resolve_device("cpu", "tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            Animator(tiny_export, backend="onnxruntime", device="cuda")
    with pytest.raises(InputError, match="size 64 .px crops., size=128"):
        Animator(tiny_export, backend="onnxruntime", device="cpu", size=128)
    with pytest.raises(InputError, match="compile applies to the torch backend"):
        Animator(tiny_export, backend="onnxruntime", device="cpu", compile=True)
    with pytest.raises(HyportraitError, match="no face") as info:
        torch_animator.animate(np.zeros((64, 64, 3), np.uint8), SAMPLE_VIDEO, tmp_path)
    assert info.value.code == "no_face"
    assert not list(tmp_path.rglob("*"))


def test_calibration_set_recorded_from_a_sample(tiny_export, ort_animator, tmp_path):
    """`hyportrait calibrate`'s recorder: the UNet's inputs at steps spread over the schedule, first and last
    included, in the --calibration format the engine builder reads (over the module's onnxruntime sessions,
    which it must leave as they were)."""
    from hyportrait.engines.calibration import record_calibration
    from hyportrait.engines.quantize import load_calibration_npz

    animator = Animator(ort_animator.models, max_frames=2, num_steps=5, overlap=1, pad_frames=0)
    path = record_calibration(animator, SAMPLE_IMAGE, SAMPLE_VIDEO, tmp_path / "calibration.npz", sets=3)
    sets = load_calibration_npz(path)
    unet = json.loads((tiny_export / "manifest.json").read_text())["models"]["unet"]
    assert len(sets) == 3
    for feed in sets:
        assert set(feed) == {t["name"] for t in unet["inputs"]}
        assert feed["sample"].shape == (3, 4, 8, 8, 8) and feed["sample"].dtype == np.float32
    sigmas = sampler_sigmas(animator.config, "cpu")
    expected = [c_noise(sigmas[i]).item() for i in (0, 2, 4)]
    assert [float(f["timestep"][0]) for f in sets] == pytest.approx(expected)
    assert animator.models.unet.name == "unet" and not hasattr(animator.models.unet, "feeds")  # restored


def test_calibrate_command_needs_an_export(tmp_path, capsys):
    from hyportrait.cli import main

    code = main(["calibrate", "--models", str(tmp_path), "--image", str(SAMPLE_IMAGE), "--video", str(SAMPLE_VIDEO),
                 "--out", str(tmp_path / "c.npz"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "error [bad_input]" in err and "no manifest.json" in err
    assert not (tmp_path / "c.npz").exists()


def test_every_backend_detects_faces_with_the_same_detector_and_makes_the_same_crops(torch_animator, ort_animator):
    """The onnxruntime backend runs the export's MTCNN nets (not the PyTorch ones) and crops as torch does."""
    from hyportrait.networks.face_detector import MTCNNDetector, PNet
    from hyportrait.runtime.api import load_image
    from hyportrait.runtime.backends import OnnxRuntimeSession
    from hyportrait.runtime.models import ExportedNet
    from hyportrait.runtime.preprocess import DrivingPreprocessor, preprocess_source
    from hyportrait.runtime.video import read_frames

    torch_detector, ort_detector = torch_animator.models.face_detector, ort_animator.models.face_detector
    assert isinstance(torch_detector.pnet, PNet)
    assert isinstance(ort_detector, MTCNNDetector)
    for net, name in ((ort_detector.pnet, "mtcnn_pnet"), (ort_detector.rnet, "mtcnn_rnet"),
                      (ort_detector.onet, "mtcnn_onet")):  # the export's models, run by onnxruntime
        assert isinstance(net, ExportedNet) and isinstance(net.session, OnnxRuntimeSession)
        assert net.session.name == name
    image = load_image(SAMPLE_IMAGE)
    sources = [preprocess_source(image, detector) for detector in (torch_detector, ort_detector)]
    assert sources[0].crop_box == sources[1].crop_box
    np.testing.assert_array_equal(sources[0].ref_image, sources[1].ref_image)
    frames = list(read_frames(SAMPLE_VIDEO, limit=FRAMES))
    chunks = [next(DrivingPreprocessor(detector).chunks(frames)) for detector in (torch_detector, ort_detector)]
    np.testing.assert_allclose(chunks[0].landmarks, chunks[1].landmarks, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(chunks[0].pose_images, chunks[1].pose_images)
