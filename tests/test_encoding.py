"""What a device sends is within the bound the accountant charges, for any input and any
format a device accepts; sums decode exactly; a sum outside the honest range is refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcart.protocol.statistics import cooccurrence, triangle_size
from fedcart.protocol.terms import Norm
from fedcart.protocol.update import SLACK, UpdateFormat, clip
from fedcart.secagg.fixedpoint import (
    LANE,
    WORD_LIMIT,
    bounded_round,
    pack,
    packed_scale_for,
    stochastic_round,
    to_words,
    unpack,
    words_to_ints,
)

# any finite vector: tiny and huge entries, spread wide or concentrated
_vectors = st.lists(st.one_of(st.floats(-1e6, 1e6), st.floats(-1e-3, 1e-3)),
                    min_size=1, max_size=400)


@settings(max_examples=300, deadline=None)
@given(values=_vectors, clip_norm=st.floats(1e-2, 64.0), group_size=st.integers(1, 5000),
       norm=st.sampled_from(list(Norm)), packed=st.booleans(),
       examples=st.integers(0, 100), weight_cap=st.floats(0.5, 100.0))
def test_encoded_norm_never_exceeds_the_charged_sensitivity(
        values: list[float], clip_norm: float, group_size: int, norm: Norm, packed: bool,
        examples: int, weight_cap: float) -> None:
    packed = packed and UpdateFormat.can_pack(group_size)
    vector = np.abs(np.asarray(values)) if packed else np.asarray(values)
    if packed:
        vector = np.minimum(vector, 1.0)
    try:
        fmt = UpdateFormat(vector.size, clip_norm, group_size, weight_cap, norm, packed, packed)
    except ValueError:
        return  # a clip below one step: no device accepts such a format
    r = fmt.integers(vector, examples)
    assert r.dtype == np.int64
    assert np.linalg.norm(r.astype(float), ord=norm.order) <= fmt.sensitivity
    low, high = fmt.entry_range
    assert r.min() >= low and r.max() <= high
    # n honest inputs span at most half a word (or a lane): the fold's headroom
    assert 2 * group_size * (high - low) <= (LANE if packed else 2**32)


@pytest.mark.parametrize("packed", [False, True])
def test_a_heavy_shoppers_cooccurrence_is_sent_within_its_clip(packed: bool) -> None:
    """The attack of the issue: a 200-item basket in a co-occurrence round (head 1,000,
    C = 5) went out with norm 9.4 at 8 steps per unit. Now within C (1 + SLACK) + one step,
    at the scale of a group of 1,000 (32 steps packed, as rounds without DP send it)."""
    head = np.arange(1000)
    part = cooccurrence([np.arange(200)], head, 1000, 5.0)
    fmt = UpdateFormat(triangle_size(1000), 5.0, 1000, packed=packed, unit=True)
    assert fmt.scale == 32 if packed else fmt.scale > 2**15
    for _ in range(5):
        sent = fmt.integers(part.dense())
        assert np.linalg.norm(sent.astype(float)) <= fmt.sensitivity
    # the charged sensitivity is what the noise is calibrated to: 5 (1 + SLACK), rounded up
    assert fmt.sensitivity == int(np.ceil(5.0 * fmt.scale * (1 + SLACK)))
    assert fmt.sensitivity / fmt.scale <= 5.0 * (1 + SLACK) + 1 / fmt.scale


def test_conditional_rounding_keeps_light_contributions_unbiased() -> None:
    """A vector well inside the bound never needs a second draw: its rounding is unbiased."""
    x = np.full(10_000, 0.3)
    total = sum(stochastic_round(x) for _ in range(20)).astype(float) / 20
    assert abs(total.mean() - 0.3) < 4 * np.sqrt(0.21 / 200_000)
    r = bounded_round(np.full(4, 2.5), limit=10, order=2)
    assert set(np.unique(r)) <= {2, 3}


def test_bounded_round_refuses_an_unclipped_vector_and_nan() -> None:
    with pytest.raises(ValueError, match="clip before"):
        bounded_round(np.full(4, 10.0), limit=5, order=2)
    with pytest.raises(ValueError, match="NaN"):
        bounded_round(np.array([np.nan]), limit=5, order=2)


def test_bounded_round_shrinks_a_spread_vector_to_fit() -> None:
    """20,000 entries of 0.28 steps (norm 39.6 < 41) round to a norm of about 80 unless
    the rounding is conditioned: the result fits, and keeps most of the mass it can."""
    x = np.full(20_000, 0.28)
    r = bounded_round(x, limit=41, order=2)
    assert np.linalg.norm(r) <= 41
    assert r.sum() >= 41**2 // 2  # ones: the L2 budget allows at most 41^2 of them


def test_update_codec_sums_like_numpy() -> None:
    rng = np.random.default_rng(0)
    fmt = UpdateFormat(n_params=500, clip_norm=2.0, group_size=50, weight_cap=100.0)
    deltas = [rng.normal(0, 0.05, 500) for _ in range(50)]
    examples = rng.integers(1, 300, 50)
    total = np.zeros(fmt.vector_len, dtype=np.uint32)
    for d, n in zip(deltas, examples, strict=True):
        total += fmt.encode(d, int(n))
    sums = fmt.decode(total)
    assert fmt.clamp(sums, 50)[1] == 0
    weights = np.minimum(examples / 100.0, 1.0)
    want = sum(w * clip(d, 2.0)[0] for w, d in zip(weights, deltas, strict=True))
    np.testing.assert_allclose(fmt.values(sums), want, atol=50 / fmt.scale)
    with pytest.raises(ValueError, match="shape"):
        fmt.encode(np.zeros(3), 1)


def test_packed_statistics_sum_like_numpy() -> None:
    """A statistics round's packed format: half the words, the same sums (to rounding)."""
    rng = np.random.default_rng(1)
    fmt = UpdateFormat(n_params=501, clip_norm=3.0, group_size=200, packed=True, unit=True)
    assert fmt.vector_len == 251 and UpdateFormat(501, 3.0, 200).vector_len == 501
    vectors = [(rng.random(501) < 0.05).astype(float) for _ in range(200)]
    total = np.zeros(fmt.vector_len, dtype=np.uint32)
    for v in vectors:
        total += fmt.encode(v)
    sums = fmt.decode(total)
    assert fmt.clamp(sums, 200)[1] == 0
    want = sum(clip(v, 3.0)[0] for v in vectors)
    assert np.abs(fmt.values(sums) - want).max() <= 200 / fmt.scale
    with pytest.raises(ValueError, match="too large to pack"):
        UpdateFormat(n_params=5, clip_norm=1.0, group_size=20_000, packed=True, unit=True)
    with pytest.raises(ValueError, match="lie in"):
        fmt.encode(-vectors[0])  # a signed update is never packed


@pytest.mark.parametrize("packed", [False, True])
def test_a_lying_device_is_held_to_the_honest_range(packed: bool) -> None:
    """A lying device's word can make an entry of its group's sum anything mod 2^32 (the
    issue's attack added 4,095.9 to one item's popularity). The sum is folded into what 10
    honest devices can send, entry by entry, and after the noise its norm is brought within
    10 sensitivities: within that a lie still moves the sum (docs/security.md), beyond it
    not. Honest sums pass unchanged."""
    fmt = UpdateFormat(n_params=100, clip_norm=5.0, group_size=10, packed=packed, unit=packed)
    bought = (np.arange(100) < 10).astype(float)  # norm 3.2 < 5: each entry is one unit
    honest = np.sum([fmt.encode(bought) for _ in range(9)], axis=0, dtype=np.uint32)
    sums, outside = fmt.clamp(fmt.decode(honest), 9)
    assert outside == 0 and np.array_equal(sums, 9 * fmt.integers(bought))
    high = fmt.entry_range[1]
    lie = np.zeros(100, np.int64)
    lie[3] = 10 * high - sums[3] + 1  # one more than the honest maximum: folded back
    lie[50] = high + 7  # an item nobody bought: more than one device's maximum, in range
    forged = pack(lie) if packed else to_words(lie)
    sums, outside = fmt.clamp(fmt.decode(honest + forged), 10)
    assert outside == 1 and sums[3] == 10 * high - 1 and sums[50] == high + 7
    values, limited = fmt.limit_norm(fmt.values(sums), 10)
    assert limited == (np.linalg.norm(sums.astype(float)) > 10 * fmt.sensitivity)
    assert np.linalg.norm(values) <= 10 * fmt.sensitivity / fmt.scale * (1 + 1e-12)
    if not packed:  # every entry within range, the norm not
        heavy = fmt.decode(honest + to_words(np.full(100, -2 * fmt.sensitivity)))
        sums, outside = fmt.clamp(heavy, 10)
        values, limited = fmt.limit_norm(fmt.values(sums), 10)
        assert outside == 0 and limited
        assert np.linalg.norm(values) == pytest.approx(10 * fmt.sensitivity / fmt.scale)


@pytest.mark.parametrize("packed", [False, True])
def test_a_lying_word_cannot_make_one_honest_input_count_twice(packed: bool) -> None:
    """The wrap attack a review found: a liar sends a word just short of the modulus, so
    that the modular sum wraps exactly when an honest target's input is in it, and a
    clamp to the range maps the two sums to its opposite ends (one input moving the
    release by 2 n Delta). The fold is 1-Lipschitz around the circle: with or without the
    target, the results differ by at most the target's own norm, whatever the liar sends.
    (Packed lanes are compared lane by lane here; a carry between lanes is why DP rounds
    are not packed.)"""
    fmt = UpdateFormat(n_params=40, clip_norm=2.0, group_size=20, packed=packed, unit=packed)
    modulus = LANE if packed else 2**32
    rng = np.random.default_rng(7)
    for _ in range(300):
        others = [fmt.integers((rng.random(40) < 0.3).astype(float)) for _ in range(18)]
        target = fmt.integers((rng.random(40) < 0.3).astype(float))
        base = np.sum(others, axis=0)
        # the liar aims just below a wrap, or anywhere
        lie = ((modulus - base - rng.integers(0, fmt.sensitivity + 2, 40)) % modulus
               if rng.random() < 0.5 else rng.integers(0, modulus, 40))
        without = fmt.clamp((base + lie) % modulus, 20)[0]
        with_target = fmt.clamp((base + lie + target) % modulus, 20)[0]
        moved = np.linalg.norm((with_target - without).astype(float))
        assert moved <= np.linalg.norm(target.astype(float)) <= fmt.sensitivity


def test_words_and_lanes_round_trip() -> None:
    r = np.array([0, 1, -1, WORD_LIMIT, -WORD_LIMIT])
    np.testing.assert_array_equal(words_to_ints(to_words(r)), r)
    with pytest.raises(ValueError, match="int32"):
        to_words(np.array([WORD_LIMIT + 1]))
    lanes = np.array([0, 1, LANE - 1, 7, 9])
    assert pack(lanes).size == 3
    np.testing.assert_array_equal(unpack(pack(lanes), 5), lanes)
    with pytest.raises(ValueError, match="lie in"):
        pack(np.array([LANE]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20_000))
def test_packed_lanes_cannot_carry(n: int) -> None:
    """n inputs at a lane's largest honest value sum to exactly that in every lane, with
    masks that cancel mod 2^32 in the way: no lane spills into its neighbour."""
    scale = packed_scale_for(n)
    assert n * scale <= LANE // 2 and (scale == LANE // 2 or n * 2 * scale > LANE // 2)
    if scale == 0:
        return
    top = pack(np.full(5, scale))
    rng = np.random.default_rng(n)
    masks = rng.integers(0, 2**32, (2, 3), dtype=np.uint64).astype(np.uint32)
    total = (top.astype(np.uint64) * n + masks[0] + masks[1]).astype(np.uint32)
    total -= masks[0]
    total -= masks[1]
    np.testing.assert_array_equal(unpack(total, 5), np.full(5, n * scale))
