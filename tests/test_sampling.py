import math

import numpy as np
import pytest
import torch

from hyportrait.runtime.sampling import (
    c_noise,
    combine_guidance,
    denoised_from_v,
    euler_step,
    guidance_ramp,
    i2i_start_index,
    karras_sigmas,
    sample_euler_windows,
    scale_input,
    window_calls,
)
from hyportrait.runtime.windows import pad_motion_tokens, pad_weights, window_indices

# The 25-step schedule of the official release (architecture notes, section 4.1).
OFFICIAL_SIGMAS = [700, 545.7, 421.6, 322.5, 244.0, 182.5, 134.9, 98.3, 70.5, 49.8, 34.5, 23.5, 15.6, 10.1,
                   6.35, 3.87, 2.27, 1.27, 0.678, 0.339, 0.157, 0.066, 0.025, 0.0079, 0.002, 0]


def test_karras_sigmas_match_the_official_schedule():
    sigmas = karras_sigmas(25)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (26,)
    np.testing.assert_allclose(sigmas.numpy(), OFFICIAL_SIGMAS, rtol=6e-3, atol=1e-4)
    assert sigmas[0] == pytest.approx(700.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0


def test_karras_sigmas_closed_form():
    rho, lo, hi = 7.0, 0.002, 700.0
    for i, s in enumerate(karras_sigmas(5, lo, hi, rho)[:-1].tolist()):
        expected = (hi ** (1 / rho) + i / 4 * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert s == pytest.approx(expected, rel=1e-6)


def test_karras_sigmas_equal_diffusers_euler_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0, timestep_type="continuous",
        timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(25)
    assert torch.equal(karras_sigmas(25), sched.sigmas)
    assert torch.equal(c_noise(karras_sigmas(25)[:-1]), sched.timesteps)


def test_c_noise_and_input_scaling():
    sigma = torch.tensor(3.0)
    assert c_noise(sigma).item() == pytest.approx(math.log(3.0) / 4)
    x = torch.full((2,), 10.0)
    assert torch.allclose(scale_input(x, sigma), torch.full((2,), 10.0 / math.sqrt(10.0)))


def test_euler_step_v_prediction_closed_form():
    x, v = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.25])
    s, s_next = torch.tensor(2.0), torch.tensor(1.0)
    x0 = v * (-2 / math.sqrt(5)) + x / 5
    assert torch.allclose(denoised_from_v(x, v, s), x0)
    assert torch.allclose(euler_step(x, v, s, s_next), x + (x - x0) / 2 * (1.0 - 2.0))
    # stepping to sigma 0 lands on the denoised estimate
    assert torch.allclose(euler_step(x, v, s, torch.tensor(0.0)), x0, atol=1e-6)


def test_euler_step_keeps_fp16_like_the_reference():
    x = torch.randn(4, dtype=torch.float16)
    out = euler_step(x, torch.randn(4, dtype=torch.float16), torch.tensor(5.0), torch.tensor(3.0))
    assert out.dtype == torch.float16


def test_combine_guidance():
    u, d, c = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([4.0])
    assert combine_guidance(u, d, c, torch.tensor(2.0), torch.tensor(3.0)).item() == 1 + 2 * 2 + 3 * 1
    # scales of 1 give the fully conditioned prediction
    assert combine_guidance(u, d, c, torch.tensor(1.0), torch.tensor(1.0)).item() == 4.0


def test_guidance_ramp_and_i2i_start():
    assert guidance_ramp(1.0, 3.0, 5).tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert i2i_start_index(25, 1.0) == 0 and i2i_start_index(25, 0.5) == 13 and i2i_start_index(4, 0.25) == 3
    with pytest.raises(ValueError):
        i2i_start_index(25, 0.0)


def test_window_plan_long_clip():
    plan = window_indices(150, 25, 3, shift=0)
    assert len(plan) == 7 and [w[0] for w in plan] == [0, 22, 44, 66, 88, 110, 132]
    assert all(len(w) == 25 for w in plan)
    assert plan[-1][-1] == (132 + 24) % 150  # wraps to the start of the clip
    covered = np.bincount(np.concatenate(plan), minlength=150)
    assert covered.min() >= 1 and covered.max() == 2


def test_window_plan_shift_moves_windows_back():
    plan = window_indices(55, 25, 3, shift=3)
    assert [w[0] for w in plan] == [52, 19, 41]
    assert plan[0][:4] == [52, 53, 54, 0]


def test_window_plan_short_clips():
    assert window_indices(25, 25, 3) == [list(range(25)), [(22 + k) % 25 for k in range(25)]]
    short = window_indices(10, 25, 3)  # shorter than a window: frames repeat inside it
    assert len(short) == 1 and short[0] == [k % 10 for k in range(25)]
    with pytest.raises(ValueError):
        window_indices(0)


def test_pad_weights_and_tokens():
    lead, tail = pad_weights(15)
    assert lead[0] == 0 and lead[-1] == pytest.approx(14 / 15)
    assert tail[0] == 1 and tail[-1] == pytest.approx(1 / 15)
    tokens = torch.arange(1, 4, dtype=torch.float32)[:, None].expand(3, 2)
    padded = pad_motion_tokens(tokens, 3)
    assert padded.shape == (9, 2)
    assert padded[:3, 0].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])  # first frame faded in
    assert padded[3:6, 0].tolist() == [1.0, 2.0, 3.0]
    assert padded[6:, 0].tolist() == pytest.approx([3.0, 2.0, 1.0])  # last frame (3) faded out


def test_windowed_sampler_averages_overlaps_uniformly():
    # A denoiser that predicts v = 0 makes each window step x -> x * (1 + (s_next - s) / (s (s^2+1)))
    # frame by frame, so overlapping windows agree and averaging must reproduce the per-frame step.
    sigmas = karras_sigmas(3)
    x = torch.randn(40, 1, 2, 2, dtype=torch.float64)
    seen = []

    def denoise(xw, step, index):
        seen.append((step, index.tolist()))
        return torch.zeros_like(xw)

    out = sample_euler_windows(denoise, x, sigmas.double(), window=25, overlap=3, shift_offset=3)
    ref = x
    for i in range(3):
        ref = euler_step(ref, torch.zeros_like(ref), sigmas[i].double(), sigmas[i + 1].double())
    assert torch.allclose(out, ref)
    assert len(seen) == window_calls(40, 3) == 6
    assert seen[2][1][0] == (0 - 3) % 40  # second step's first window starts 3 frames back


def test_windowed_sampler_weights_windows_equally():
    sigmas = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = torch.zeros(30, 1, 1, 1, dtype=torch.float64)

    def denoise(xw, step, index):  # window k predicts x0 = -k for its frames (v = -x0 / ... at x = 0)
        k = 0 if index[0] == 0 else 1
        return torch.full_like(xw, k * math.sqrt(2.0))

    out = sample_euler_windows(denoise, x, sigmas, window=25, overlap=3).flatten()
    # x0 = v * (-1/sqrt(2)) = -k; frames 0..21 only window 0, 22..24 both, 25..29 plus wrap 0..16 window 1
    assert out[23].item() == pytest.approx(-0.5)
    assert out[26].item() == pytest.approx(-1.0)
    assert out[5].item() == pytest.approx(-0.5)  # frame 5 is in window 0 and, wrapped, in window 1
    assert out[20].item() == pytest.approx(0.0)
