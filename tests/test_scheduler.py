"""The one scheduler's batching decision: wait for streams about to be ready only when it pays."""
import pytest

from chorus.stream.scheduler import StepCost, worth_waiting


def test_step_cost_fits_fixed_and_per_stream_parts():
    cost = StepCost()
    for b in (1, 2, 4, 8, 1, 3):
        cost.add(b, 0.1 + 0.03 * b)
    fixed, per_stream = cost.fit()
    assert fixed == pytest.approx(0.1) and per_stream == pytest.approx(0.03)
    assert StepCost().fit() is None
    one_size = StepCost()
    for _ in range(5):
        one_size.add(4, 0.2)
    fixed, per_stream = one_size.fit()
    assert fixed + 4 * per_stream == pytest.approx(0.2)


@pytest.mark.parametrize("ready, upcoming, fixed, per_stream, age, expect", [
    (1, [0.005], 0.110, 0.035, 0.0, 0.005),   # a big fixed cost and a stream 5 ms away: wait for it
    (1, [0.200], 0.110, 0.035, 0.0, 0.0),     # too far away: step now
    (4, [0.010], 0.020, 0.010, 0.0, 0.0),     # a cheap step: not worth delaying four streams
    (1, [0.005, 0.008, 0.012], 0.110, 0.035, 0.0, 0.012),  # several close ones: wait for all three
    (1, [0.005], 0.110, 0.035, 0.300, 0.0),   # the oldest stream would miss its budget
    (2, [], 0.110, 0.035, 0.0, 0.0),          # nothing coming
])
def test_worth_waiting(ready, upcoming, fixed, per_stream, age, expect):
    got = worth_waiting(ready, upcoming, fixed, per_stream, max_wait=0.05, age=age, budget=0.28)
    assert got == pytest.approx(expect)
