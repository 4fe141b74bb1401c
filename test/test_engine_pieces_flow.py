"""Flow-matching Euler sampler and the FlashDrive adaptive schedule (flashdrive.md §5)."""

import pytest
import torch

from flashdrive_ros.engine.flow import FlowSchedule, sample


def _nonlinear_field(x, t):
    return torch.sin(3 * x) - x * t[:, None, None] + 0.5


class CountingField:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, t):
        self.calls.append(float(t[0]))
        return self.fn(x, t)


def test_uniform_schedule_is_the_reference_loop():
    noise = torch.randn(3, 64, 2, generator=torch.Generator().manual_seed(0))
    field = CountingField(_nonlinear_field)
    out = sample(field, noise, FlowSchedule.uniform(10))
    x = noise.clone()
    for i in range(10):
        x = x + 0.1 * _nonlinear_field(x, torch.full((3,), i / 10))
    torch.testing.assert_close(out, x)
    assert field.calls == pytest.approx([i / 10 for i in range(10)])


def test_adaptive_schedule_layout():
    s = FlowSchedule.from_name("adaptive")
    assert s.times == pytest.approx([i * 0.125 for i in range(8)])
    assert s.dts == (0.125,) * 8
    assert s.sources == (0, 1, 2, 2, 2, 2, 2, 7)
    assert s.computed_steps == (0, 1, 2, 7) and s.num_evaluations == 4
    assert FlowSchedule.from_name("uniform").num_evaluations == 10


def test_adaptive_calls_velocity_four_times_and_reuses_step_two():
    noise = torch.randn(2, 64, 2, generator=torch.Generator().manual_seed(1))
    field = CountingField(_nonlinear_field)
    out, used = sample(field, noise, FlowSchedule.adaptive(), return_velocities=True)
    assert field.calls == pytest.approx([0.0, 0.125, 0.25, 0.875])
    assert all(used[i] is used[2] for i in (3, 4, 5, 6))
    # Hand-written FlashDrive loop.
    x, cached = noise.clone(), None
    for i in range(8):
        if i in (3, 4, 5, 6):
            v = cached
        else:
            v = _nonlinear_field(x, torch.full((2,), i * 0.125))
            cached = v
        x = x + 0.125 * v
    torch.testing.assert_close(out, x)


def test_adaptive_without_reuse_equals_uniform_eight():
    noise = torch.randn(4, 64, 2, generator=torch.Generator().manual_seed(2))
    a = sample(_nonlinear_field, noise, FlowSchedule.adaptive(reuse_steps=()))
    b = sample(_nonlinear_field, noise, FlowSchedule.uniform(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and reuse really changes the result for a nonlinear field.
    assert not torch.allclose(sample(_nonlinear_field, noise, FlowSchedule.adaptive()), b)


@pytest.mark.parametrize("schedule", [FlowSchedule.uniform(10), FlowSchedule.uniform(3), FlowSchedule.adaptive()])
def test_straight_flow_is_integrated_exactly(schedule):
    # The optimal field towards a fixed target, v = (target - x) / (1 - t), is constant along the
    # straight path x_t = t*target + (1-t)*noise, so Euler lands exactly on the target (reuse too).
    g = torch.Generator().manual_seed(3)
    noise, target = torch.randn(2, 64, 2, generator=g), torch.randn(2, 64, 2, generator=g)
    out = sample(lambda x, t: (target - x) / (1 - t[:, None, None]), noise, schedule)
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)


def test_bad_schedules_and_fields_are_named():
    with pytest.raises(ValueError, match="unknown flow schedule"):
        FlowSchedule.from_name("cosine")
    with pytest.raises(ValueError, match="reuse step 0"):
        FlowSchedule.adaptive(reuse_steps=(0,))
    with pytest.raises(ValueError, match="not an earlier computed step"):
        FlowSchedule(times=(0.0, 0.5), dts=(0.5, 0.5), sources=(1, 1))
    with pytest.raises(ValueError, match="sum to"):
        FlowSchedule(times=(0.0, 0.5), dts=(0.5, 0.4), sources=(0, 1))
    with pytest.raises(ValueError, match="velocity_fn returned shape"):
        sample(lambda x, t: x[..., :1], torch.zeros(1, 64, 2), FlowSchedule.uniform(2))
