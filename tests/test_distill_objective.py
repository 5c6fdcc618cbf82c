"""The consistency objective's pure functions (distill/objective.py) against the runtime's sampler."""
import torch

from hyportrait.distill import objective as obj
from hyportrait.runtime.pipeline import AnimateConfig
from hyportrait.runtime.sampling import denoised_from_v, karras_sigmas


def test_grid_contains_the_fast_mode_sigmas():
    grid = obj.sigma_grid()
    fast = karras_sigmas(AnimateConfig.fast().num_steps)
    assert len(grid) == obj.GRID_POINTS + 1 and grid[-1] == 0
    assert torch.equal(grid[[0, 13, 26, 39, 40]], fast)  # bit-identical grid points
    edges = obj.phase_edges(obj.GRID_POINTS, 4)
    assert edges == [0, 13, 26, 39, 40] and torch.equal(grid[edges], fast)
    assert obj.phase_edges(40, 1) == [0, 40]


def test_phase_edges_refuse_a_grid_that_does_not_divide():
    try:
        obj.phase_edges(40, 5)
    except ValueError as exc:
        assert "divide" in str(exc)
    else:
        raise AssertionError("40 points cannot hold 5 phases")


def test_consistency_function_and_boundary():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 2, 4, 2, 2, generator=g), torch.randn(3, 2, 4, 2, 2, generator=g)
    sigma = torch.tensor([700.0, 13.7, 0.002]).reshape(3, 1, 1, 1, 1)
    zero = torch.zeros_like(sigma)
    # one phase: the EDM denoiser itself, what the runtime's LCM sampler computes
    assert torch.equal(obj.consistency(x, v, sigma, zero), denoised_from_v(x, v, sigma))
    # at its own edge the function is the identity (the boundary condition)
    assert torch.allclose(obj.consistency(x, v, sigma, sigma), x, atol=1e-5)
    # lower edges: an index maps to the lower edge of its phase
    edges = obj.phase_edges(40, 4)
    assert obj.lower_edge(torch.tensor([0, 12, 13, 38, 39]), edges).tolist() == [13, 13, 26, 39, 40]
    # the target at a phase edge is the teacher's step itself, never a network value
    x_next = torch.randn(3, 2, 4, 2, 2, generator=g)
    nan = torch.full_like(v, float("nan"))
    target = obj.distill_target(x_next, nan, zero, zero)
    assert torch.equal(target, x_next)


def test_pseudo_huber_and_weights():
    a = torch.zeros(2, 3)
    b = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    loss = obj.pseudo_huber(a, b, c=1e-3)
    expected = ((b**2 + 1e-6).sqrt() - 1e-3).mean()
    assert torch.allclose(loss, expected)
    assert obj.pseudo_huber(b, b) == 0
    s, n = torch.tensor([700.0]), torch.tensor([600.0])
    assert torch.allclose(obj.interval_weight(s, n, "animatelcm"), torch.tensor([0.01 ** 0.1]))
