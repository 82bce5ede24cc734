"""Learning-rate schedules: functions of the step count, composable with ``join_schedules``.

A schedule is any callable ``schedule(count) -> learning rate`` (a :data:`Schedule`), ``count``
being the number of steps the optimizer has taken (0 for the first step); pass one wherever a
learning rate goes. The ones here are small frozen dataclasses, so they print, compare and
pickle. Their names and arguments follow optax; the decays match ``torch.optim.lr_scheduler``
(``cosine_decay_schedule`` is ``CosineAnnealingLR`` up to ``decay_steps``, ``step_decay_schedule``
is ``StepLR``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from diffprog.optim._optimizer import Schedule

__all__ = [
    "ConstantSchedule",
    "CosineDecaySchedule",
    "JoinedSchedules",
    "LinearSchedule",
    "StepDecaySchedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "join_schedules",
    "linear_schedule",
    "linear_warmup_schedule",
    "step_decay_schedule",
    "warmup_cosine_decay_schedule",
]


def _check_steps(name: str, steps: int, minimum: int = 0) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {steps!r}.")


@dataclasses.dataclass(frozen=True)
class ConstantSchedule:
    """The same learning rate at every step (see :func:`constant_schedule`)."""

    value: float

    def __call__(self, count: int) -> float:
        """The learning rate after ``count`` steps."""
        return self.value


@dataclasses.dataclass(frozen=True)
class LinearSchedule:
    """A linear ramp from ``init_value`` to ``end_value`` (see :func:`linear_schedule`)."""

    init_value: float
    end_value: float
    transition_steps: int
    transition_begin: int = 0

    def __call__(self, count: int) -> float:
        """The learning rate after ``count`` steps."""
        if self.transition_steps == 0:
            return self.end_value if count >= self.transition_begin else self.init_value
        done = min(max(count - self.transition_begin, 0), self.transition_steps)
        frac = done / self.transition_steps
        return self.init_value + frac * (self.end_value - self.init_value)


@dataclasses.dataclass(frozen=True)
class CosineDecaySchedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` (see
    :func:`cosine_decay_schedule`)."""

    init_value: float
    decay_steps: int
    alpha: float = 0.0

    def __call__(self, count: int) -> float:
        """The learning rate after ``count`` steps."""
        progress = min(count, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.init_value * ((1.0 - self.alpha) * cosine + self.alpha)


@dataclasses.dataclass(frozen=True)
class StepDecaySchedule:
    """``init_value * gamma ** (count // step_size)`` (see :func:`step_decay_schedule`)."""

    init_value: float
    step_size: int
    gamma: float = 0.1

    def __call__(self, count: int) -> float:
        """The learning rate after ``count`` steps."""
        return self.init_value * self.gamma ** (count // self.step_size)


@dataclasses.dataclass(frozen=True)
class JoinedSchedules:
    """Schedules one after another (see :func:`join_schedules`)."""

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __call__(self, count: int) -> float:
        """The learning rate after ``count`` steps."""
        start = 0
        chosen = self.schedules[0]
        for boundary, schedule in zip(self.boundaries, self.schedules[1:], strict=True):
            if count < boundary:
                break
            start, chosen = boundary, schedule
        return chosen(count - start)  # type: ignore[return-value]


def constant_schedule(value: float) -> ConstantSchedule:
    """A schedule that is ``value`` at every step.

    Example:
        >>> constant_schedule(0.1)(1000)
        0.1
    """
    return ConstantSchedule(float(value))


def linear_schedule(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> LinearSchedule:
    """A linear ramp: ``init_value`` until ``transition_begin``, then linearly to ``end_value``
    over ``transition_steps`` steps, then ``end_value`` (optax's ``linear_schedule``).

    Args:
        init_value: the learning rate at the start.
        end_value: the learning rate after the ramp.
        transition_steps: the length of the ramp (0: jump at ``transition_begin``).
        transition_begin: the step count at which the ramp starts.

    Returns:
        The schedule.

    Raises:
        ValueError: a step count is negative or not an integer.

    Example:
        >>> s = linear_schedule(1.0, 0.0, 4)
        >>> [s(count) for count in range(6)]
        [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    """
    _check_steps("transition_steps", transition_steps)
    _check_steps("transition_begin", transition_begin)
    return LinearSchedule(float(init_value), float(end_value), transition_steps, transition_begin)


def linear_warmup_schedule(
    peak_value: float, warmup_steps: int, init_value: float = 0.0
) -> LinearSchedule:
    """Linear warm-up: from ``init_value`` up to ``peak_value`` in ``warmup_steps`` steps, then
    ``peak_value`` (``linear_schedule(init_value, peak_value, warmup_steps)``).

    Example:
        >>> s = linear_warmup_schedule(0.1, 4)
        >>> [round(s(count), 3) for count in range(6)]
        [0.0, 0.025, 0.05, 0.075, 0.1, 0.1]
    """
    return linear_schedule(init_value, peak_value, warmup_steps)


def cosine_decay_schedule(
    init_value: float, decay_steps: int, alpha: float = 0.0
) -> CosineDecaySchedule:
    """Cosine decay from ``init_value`` to ``alpha * init_value`` over ``decay_steps`` steps,
    constant after (optax's ``cosine_decay_schedule``; ``torch.optim.lr_scheduler``'s
    ``CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * init_value)`` up to ``decay_steps``).

    Args:
        init_value: the learning rate at step count 0.
        decay_steps: the length of the decay, at least 1.
        alpha: the final value as a fraction of ``init_value``.

    Returns:
        The schedule.

    Raises:
        ValueError: ``decay_steps`` is not a positive integer.

    Example:
        >>> s = cosine_decay_schedule(1.0, 2)
        >>> [round(s(count), 3) for count in range(4)]
        [1.0, 0.5, 0.0, 0.0]
    """
    _check_steps("decay_steps", decay_steps, 1)
    return CosineDecaySchedule(float(init_value), decay_steps, float(alpha))


def step_decay_schedule(init_value: float, step_size: int, gamma: float = 0.1) -> StepDecaySchedule:
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps (``StepLR``).

    Args:
        init_value: the learning rate at step count 0.
        step_size: how many steps between decays, at least 1.
        gamma: the factor applied at each decay.

    Returns:
        The schedule.

    Raises:
        ValueError: ``step_size`` is not a positive integer.

    Example:
        >>> s = step_decay_schedule(1.0, 2, gamma=0.5)
        >>> [s(count) for count in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    """
    _check_steps("step_size", step_size, 1)
    return StepDecaySchedule(float(init_value), step_size, float(gamma))


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> JoinedSchedules:
    """Run ``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]``, ... (optax's
    ``join_schedules``). Each schedule after the first sees the count *since its boundary*, so
    it starts from its own step 0.

    Args:
        schedules: the schedules, in order.
        boundaries: the step counts at which to switch, increasing; one fewer than schedules.

    Returns:
        The joined schedule.

    Raises:
        ValueError: the lengths do not fit or the boundaries do not increase.

    Example:
        >>> s = join_schedules([linear_warmup_schedule(1.0, 2), cosine_decay_schedule(1.0, 2)], [2])
        >>> [round(s(count), 3) for count in range(5)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    schedules, boundaries = tuple(schedules), tuple(boundaries)
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules needs one boundary fewer than schedules, got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries."
        )
    for b in boundaries:
        _check_steps("each boundary", b)
    if any(a >= b for a, b in itertools.pairwise(boundaries)):
        raise ValueError(f"the boundaries must increase, got {list(boundaries)}.")
    return JoinedSchedules(schedules, boundaries)


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> JoinedSchedules:
    """Linear warm-up from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``;
    ``decay_steps`` counts the warm-up too (optax's ``warmup_cosine_decay_schedule``).

    Args:
        init_value: the learning rate at step count 0.
        peak_value: the learning rate at the end of the warm-up.
        warmup_steps: the length of the warm-up.
        decay_steps: the total length of warm-up and decay, more than ``warmup_steps``.
        end_value: the learning rate after ``decay_steps``.

    Returns:
        The joined schedule.

    Raises:
        ValueError: ``decay_steps`` is not more than ``warmup_steps``.

    Example:
        >>> s = warmup_cosine_decay_schedule(0.0, 1.0, 2, 4)
        >>> [round(s(count), 3) for count in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    if decay_steps <= warmup_steps:
        raise ValueError(
            f"decay_steps ({decay_steps}) counts the warm-up steps too, so it must be more than "
            f"warmup_steps ({warmup_steps})."
        )
    alpha = end_value / peak_value if peak_value else 0.0
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha),
        ],
        [warmup_steps],
    )
