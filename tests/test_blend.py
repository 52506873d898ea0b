"""The blend schedule: exact proportions, determinism, state."""

import numpy as np
import pytest

from emu2_engine.data.blend import Blend


def draws(blend: Blend, n: int) -> list[int]:
    return [blend.next() for _ in range(n)]


def test_paper_weights_are_met_within_one_sample_at_every_step():
    weights = [12800, 6400, 3200, 800]  # Emu2 stage 2, per global batch
    blend = Blend(weights)
    share = np.array(weights) / sum(weights)
    taken = np.zeros(4)
    for n in range(1, 23_201):
        taken[blend.next()] += 1
        assert np.abs(taken - share * n).max() < 1.0, n
    # one global batch of 23,200 samples holds exactly the paper's counts
    assert taken.tolist() == weights


def test_hand_computed_schedule():
    # weights 2:1 -> deficits after each draw: a leads, then b catches up
    assert draws(Blend([2, 1]), 6) == [0, 1, 0, 0, 1, 0]
    assert draws(Blend([1, 1, 1]), 6) == [0, 1, 2, 0, 1, 2]  # ties go to the lower index
    assert set(draws(Blend([1, 0, 3]), 400)) == {0, 2}  # a zero weight is never drawn


def test_state_round_trip_and_determinism():
    a = Blend([5, 3, 2])
    draws(a, 37)
    state = a.state_dict()
    rest = draws(a, 50)
    b = Blend([5, 3, 2])
    b.load_state_dict(state)
    assert draws(b, 50) == rest
    assert draws(Blend([5, 3, 2]), 87) == draws(Blend([0.5, 0.3, 0.2]), 87)  # only ratios matter
    with pytest.raises(ValueError, match="saved blend has 3 datasets, this one 2"):
        Blend([1, 1]).load_state_dict(state)


@pytest.mark.parametrize("weights, message", [
    ([], "non-empty list"),
    ([0, 0], "not all 0"),
    ([1, -1], ">= 0"),
    ([1, float("nan")], "finite"),
])
def test_bad_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        Blend(weights)


def test_changed_weights_start_the_schedule_over(caplog):
    """A resume with new weights (a new blend for the rest of a run) follows them from the next
    draw: the old counts under new weights served dataset 0 alone for 40,000 draws."""
    old = Blend([0.5, 0.5])
    picks = [old.next() for _ in range(10_000)]
    assert picks.count(0) == 5_000
    new = Blend([0.9, 0.1])
    with caplog.at_level("WARNING", logger="emu2_engine.data.blend"):
        new.load_state_dict(old.state_dict())
    assert "data.weights changed since the checkpoint ([0.5, 0.5], now [0.9, 0.1])" in caplog.text
    assert [new.next() for _ in range(100)].count(1) == 10
    same = Blend([1, 1])  # the same weights, however written: the saved schedule continues
    same.load_state_dict(old.state_dict())
    assert same.taken.tolist() == [5_000, 5_000]
    # A state saved when the schedule counted records (with or without its weights): its counts
    # are not sample counts, so the schedule starts over, with a warning.
    for legacy_state in ({"taken": [3, 4]}, {"taken": [3, 4], "weights": [0.9, 0.1]}):
        legacy = Blend([0.9, 0.1])
        caplog.clear()
        with caplog.at_level("WARNING", logger="emu2_engine.data.blend"):
            legacy.load_state_dict(legacy_state)
        assert legacy.taken.tolist() == [0, 0] and "counted records" in caplog.text


def test_credit_counts_samples():
    """Each record reports its samples: a dataset whose records give 3 samples each is drawn a
    third as often, so both datasets give the same number of samples at weights [1, 1]; a
    record that gives none is not counted (its dataset is drawn again)."""
    blend = Blend([1, 1])
    samples = [0, 0]
    for _ in range(3_000):
        d = blend.next()
        k = 3 if d == 1 else 1
        blend.credit(d, k)
        samples[d] += k
    assert abs(samples[0] - samples[1]) <= 3 and blend.taken.tolist() == samples
    empty = Blend([1, 1])
    assert empty.next() == 0
    empty.credit(0, 0)
    assert empty.next() == 0 and empty.taken.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"credit needs a dataset in \[0, 2\) and samples >= 0, got 2, 1"):
        empty.credit(2, 1)
