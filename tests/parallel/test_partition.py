import itertools
import math
import random

import pytest

from slimtune.errors import SlimtuneError
from slimtune.parallel.partition import bubble_fraction, equal_layer_split, partition, stage_costs


# ---- brute force: every composition of n units into k non-empty stages -------------------------------------------

def all_splits(n, k):
    for cuts in itertools.combinations(range(1, n), k - 1):
        ends = (*cuts, n)
        yield [range(a, b) for a, b in zip((0, *cuts), ends)]


def objectives(times, memory, balance):
    """The per-split score the docstring promises, written independently of the module (integer costs: exact sums)."""
    def peak(values, parts):
        return max(sum(values[i] for i in p) for p in parts)

    if balance == "time":
        return lambda parts: (peak(times, parts),) + (() if memory is None else (peak(memory, parts),))
    if balance == "memory":
        return lambda parts: (peak(memory, parts), peak(times, parts))
    total_t, total_m = sum(times), sum(memory)

    def both(parts):
        share = max(max(sum(times[i] for i in p) / total_t if total_t else 0.0,
                        sum(memory[i] for i in p) / total_m if total_m else 0.0) for p in parts)
        return (share, peak(times, parts), peak(memory, parts))
    return both


def brute_force(times, k, memory=None, memory_cap=None, balance="time"):
    score = objectives(times, memory, balance)
    fits = [p for p in all_splits(len(times), k)
            if memory_cap is None or all(sum(memory[i] for i in part) <= memory_cap for part in p)]
    if not fits:
        return None
    # tie-break: the earliest cuts (lexicographically smallest end points)
    return min(fits, key=lambda p: (score(p), [r.stop for r in p]))


def smallest_cap(memory, k):
    return min(max(sum(memory[i] for i in part) for part in p) for p in all_splits(len(memory), k))


def random_case(rng):
    n = rng.randint(1, 12)
    k = rng.randint(1, min(4, n))
    high = rng.choice([1, 3, 9, 50])  # small ranges make many ties, which exercises the tie-breaks
    times = [rng.randint(0, high) for _ in range(n)]
    memory = [rng.randint(0, high) for _ in range(n)]
    return times, memory, k


@pytest.mark.parametrize("balance", ["time", "memory", "both"])
def test_equals_brute_force_without_cap(balance):
    rng = random.Random(f"nocap-{balance}")
    for _ in range(250):
        times, memory, k = random_case(rng)
        got = partition(times, k, memory=memory, balance=balance)
        assert got == brute_force(times, k, memory=memory, balance=balance), (times, memory, k)


def test_time_only_equals_brute_force():
    rng = random.Random("time-only")
    for _ in range(250):
        times, _, k = random_case(rng)
        assert partition(times, k) == brute_force(times, k), (times, k)


@pytest.mark.parametrize("balance", ["time", "memory", "both"])
def test_equals_brute_force_with_cap(balance):
    rng = random.Random(f"cap-{balance}")
    infeasible = 0
    for _ in range(250):
        times, memory, k = random_case(rng)
        lowest = smallest_cap(memory, k)
        cap = rng.choice([lowest, lowest + rng.randint(0, sum(memory) + 1), max(lowest - 1, 0), sum(memory)])
        want = brute_force(times, k, memory=memory, memory_cap=cap, balance=balance)
        if want is None:
            infeasible += 1
            with pytest.raises(SlimtuneError, match=f"smallest cap that fits is {lowest} bytes"):
                partition(times, k, memory=memory, memory_cap=cap, balance=balance)
            continue
        got = partition(times, k, memory=memory, memory_cap=cap, balance=balance)
        assert got == want, (times, memory, k, cap)
        assert max(stage_costs(memory, got)) <= cap
    assert infeasible > 10  # the infeasible branch was really exercised


def test_float_costs_reach_the_brute_force_optimum():
    rng = random.Random("floats")
    for _ in range(200):
        n = rng.randint(1, 10)
        k = rng.randint(1, min(4, n))
        times = [rng.uniform(0, 3) for _ in range(n)]
        got = max(stage_costs(times, partition(times, k)))
        want = min(max(stage_costs(times, p)) for p in all_splits(n, k))
        assert math.isclose(got, want, rel_tol=1e-12), (times, k)


def test_lexicographic_pair_dp_is_not_exact_but_partition_is():
    """Carrying (time, memory) pairs through the DP and taking the lexicographic min per prefix loses here.

    Units 0..2 in two stages: [2 | 2 1] scores (3, 4) and wins on time over [2 2 | 1] at (4, 2); the last stage
    [5] then sets the time to 5 either way, and the discarded prefix had the lower memory.
    """
    times, memory, k = [2, 2, 1, 5], [0, 2, 2, 1], 3

    def pair_dp():
        pt, pm = [0, *itertools.accumulate(times)], [0, *itertools.accumulate(memory)]
        best = [(0, 0)] + [(math.inf, math.inf)] * len(times)
        for s in range(1, k + 1):
            best = [min([(max(best[i][0], pt[j] - pt[i]), max(best[i][1], pm[j] - pm[i])) for i in range(s - 1, j)],
                        default=(math.inf, math.inf)) for j in range(len(times) + 1)]
        return best[-1]

    exact = objectives(times, memory, "time")(brute_force(times, k, memory=memory))
    assert exact == (5, 2)
    assert pair_dp() == (5, 4)
    assert objectives(times, memory, "time")(partition(times, k, memory=memory)) == exact


# ---- the cases users meet ---------------------------------------------------------------------------------------

def test_llm_shaped_model_beats_equal_layer_split():
    times = [30] + [10] * 12 + [45]  # embedding, 12 blocks, head + loss
    parts = partition(times, 4)
    assert max(stage_costs(times, parts)) == 50
    assert max(stage_costs(times, equal_layer_split(len(times), 4))) == 65
    assert parts == [range(0, 3), range(3, 8), range(8, 13), range(13, 14)]
    # torchgpipe 0.0.7's balance_by_time (its blockpartition.solve), run once on these costs outside the test suite,
    # cut [30, 10, 10 | 10, 10, 10 | 10, 10, 10 | 10, 10, 10, 10, 45]: stages of 50, 30, 30 and 85.
    torchgpipe = [range(0, 3), range(3, 6), range(6, 9), range(9, 14)]
    assert max(stage_costs(times, torchgpipe)) == 85


def test_memory_cap_is_respected_at_the_cost_of_time():
    times, memory = [10, 1, 1, 1, 1], [1, 100, 100, 100, 100]
    assert partition(times, 2, memory=memory) == [range(0, 1), range(1, 5)]  # 10 s, but 400 bytes in stage 1
    capped = partition(times, 2, memory=memory, memory_cap=300)
    assert capped == [range(0, 2), range(2, 5)]
    assert stage_costs(times, capped) == [11, 3] and stage_costs(memory, capped) == [101, 300]


def test_time_ties_go_to_the_lower_peak_memory_then_the_earliest_cuts():
    times = [2, 0, 0, 2]  # every split into 2 stages takes 2 s
    # peak memory: [0 | 1 2 3] 13, [0 1 | 2 3] 9, [0 1 2 | 3] 13
    assert partition(times, 2, memory=[5, 4, 4, 5]) == [range(0, 2), range(2, 4)]
    # every split peaks at 5 bytes: the earliest cut wins
    assert partition(times, 2, memory=[5, 0, 0, 5]) == [range(0, 1), range(1, 4)]
    # balance="memory" breaks its ties by time
    assert partition([1, 1, 5, 1], 2, memory=[0, 0, 0, 0], balance="memory") == [range(0, 2), range(2, 4)]


def test_infeasible_cap_names_the_smallest_cap_that_fits():
    memory = [4, 4, 4, 4]
    with pytest.raises(SlimtuneError, match=r"memory_cap=7 bytes; the smallest cap that fits is 8 bytes"):
        partition([1, 1, 1, 1], 2, memory=memory, memory_cap=7)
    assert partition([1, 1, 1, 1], 2, memory=memory, memory_cap=8) == [range(0, 2), range(2, 4)]
    # one unit alone is over the cap: the smallest cap is set by the best split, not just by that unit
    with pytest.raises(SlimtuneError, match=r"smallest cap that fits is 9000 bytes"):
        partition([1, 1, 1], 2, memory=[9000, 3000, 5000], memory_cap=8000)


def test_zero_cost_units_still_fill_every_stage():
    for times in ([0.0] * 5, [0, 0, 0, 10, 0]):
        for k in range(1, 6):
            parts = partition(times, k)
            assert len(parts) == k and all(len(p) > 0 for p in parts)
            assert [i for p in parts for i in p] == list(range(5))
    assert partition([0, 0, 0], 3, memory=[0, 0, 0], balance="both") == [range(0, 1), range(1, 2), range(2, 3)]


def test_one_stage_and_one_unit_per_stage():
    assert partition([3, 1, 2], 1) == [range(0, 3)]
    assert partition([3, 1, 2], 3) == [range(0, 1), range(1, 2), range(2, 3)]


def test_accepts_any_iterable_of_numbers():
    assert partition((t for t in [1.0, 2.0, 3.0]), 2) == [range(0, 2), range(2, 3)]


# ---- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: partition([1, 2], 0), r"stages must be a whole number >= 1"),
    (lambda: partition([1, 2], 1.5), r"stages must be a whole number >= 1"),
    (lambda: partition([1, 2, 3], 4), r"cannot make 4 non-empty stages from 3 units"),
    (lambda: partition([], 1), r"from 0 units"),
    (lambda: partition([1, -1], 1), r"times\[1\] is -1"),
    (lambda: partition([1, float("nan")], 1), r"times\[1\] is nan"),
    (lambda: partition([1, "a"], 1), r"times\[1\] must be a number"),
    (lambda: partition([1, 1], 1, memory=[1, float("nan")]), r"memory\[1\] is nan"),
    (lambda: partition([1, 1], 1, memory=[1]), r"memory has 1 entries but times has 2"),
    (lambda: partition([1, 1], 1, memory_cap=5), r"memory_cap needs memory"),
    (lambda: partition([1, 1], 1, memory=[1, 1], memory_cap=float("nan")), r"memory_cap must be a number"),
    (lambda: partition([1, 1], 1, balance="speed"), r"unknown balance 'speed'; choose one of: time, memory, both"),
    (lambda: partition([1, 1], 1, balance="memory"), r"balance='memory' needs memory"),
    (lambda: partition([1, 1], 1, balance="both"), r"balance='both' needs memory"),
    (lambda: equal_layer_split(2, 3), r"cannot make 3 non-empty stages from 2 units"),
    (lambda: equal_layer_split(2.5, 2), r"n_units must be a whole number"),
    (lambda: bubble_fraction("zb", 4, 8), r"unknown schedule 'zb'; choose one of: gpipe, 1f1b, interleaved1f1b"),
    (lambda: bubble_fraction("gpipe", 4, 0), r"microbatches must be a whole number >= 1"),
    (lambda: bubble_fraction("1f1b", 4, 8, virtual_stages=2), r"applies only to schedule='interleaved1f1b'"),
])
def test_user_mistakes_raise_clear_errors(call, message):
    with pytest.raises(SlimtuneError, match=message):
        call()


# ---- helpers ----------------------------------------------------------------------------------------------------

def test_equal_layer_split_is_as_even_as_possible():
    assert equal_layer_split(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert equal_layer_split(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert equal_layer_split(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    for n in range(1, 20):
        for k in range(1, n + 1):
            sizes = [len(p) for p in equal_layer_split(n, k)]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_stage_costs_sums_each_stage():
    assert stage_costs([1, 2, 3, 4.5], [range(0, 1), range(1, 4)]) == [1.0, 9.5]


def test_bubble_fraction_formulas():
    assert bubble_fraction("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved1f1b", 4, 8, virtual_stages=2) == pytest.approx(3 / 19)
    assert bubble_fraction("interleaved1f1b", 4, 8) == bubble_fraction("1f1b", 4, 8)
    assert bubble_fraction("gpipe", 1, 8) == 0.0
    # more micro-batches shrink the bubble; the interleaved schedule shrinks it further
    assert bubble_fraction("gpipe", 8, 64) < bubble_fraction("gpipe", 8, 8)
    assert bubble_fraction("interleaved1f1b", 8, 8, virtual_stages=4) < bubble_fraction("1f1b", 8, 8)
