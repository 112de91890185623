"""Evidence of harm: what makes a gradient rise worth a lasting remediation, and what does not."""

import math

from gradwatch.watchdog import metric_names as mn
from gradwatch.watchdog.judgement import judge
from gradwatch.watchdog.samples import SampleStore, build_labels

RUN = {"run": "r1", "rank": "0"}
ONSET = 1000.0


def store(loss_before=1.0, loss_after=(), norms_after=(), norm_before=1.0, skipped_after=(), loss_max_after=(), skip_at=None):
    """Two minutes of a calm run (2-s scrapes) up to ONSET, then the given points, one per scrape."""
    s = SampleStore()
    labels = build_labels(RUN)
    t = ONSET - 120.0
    step = 0
    while t < ONSET:
        s.add(t, mn.STEP, labels, step)
        s.add(t, mn.LOSS, labels, loss_before)
        s.add(t, mn.GRAD_GLOBAL_NORM_MAX, labels, norm_before)
        skipped = 1.0 if skip_at is not None and t >= skip_at else 0.0
        s.add(t, mn.SKIPPED_STEPS_TOTAL, build_labels({**RUN, "reason": "nonfinite"}), skipped)
        t += 2.0
        step += 2
    n = max(len(loss_after), len(norms_after), len(skipped_after), len(loss_max_after))
    for i in range(n):
        t = ONSET + 2.0 * i
        s.add(t, mn.STEP, labels, step + 2 * i)
        if i < len(loss_after):
            s.add(t, mn.LOSS, labels, loss_after[i])
        if i < len(norms_after):
            s.add(t, mn.GRAD_GLOBAL_NORM_MAX, labels, norms_after[i])
        if i < len(skipped_after):
            s.add(t, mn.SKIPPED_STEPS_TOTAL, build_labels({**RUN, "reason": "nonfinite"}), skipped_after[i])
        if i < len(loss_max_after):
            s.add(t, mn.LOSS_MAX, labels, loss_max_after[i])
    return s, ONSET + 2.0 * max(n - 1, 0)


def test_a_learning_transition_is_no_harm_even_while_its_norm_keeps_growing():
    # the loss leaves its plateau as the gradient norm jumps 20-60x and keeps rising for a while
    s, now = store(loss_after=[0.95, 0.8, 0.6, 0.4], norms_after=[20, 30, 45, 60])
    evidence = judge(s, "r1", "0", ONSET, now)
    assert not evidence.harmful
    assert any("loss improving" in a for a in evidence.against)
    assert any("still growing" in a and "while the loss improves" in a for a in evidence.against)


def test_an_explosion_with_a_rising_loss_is_harm():
    s, now = store(loss_after=[1.0, 1.6, 2.4, 5.0], norms_after=[5, 40, 300, 2000])
    evidence = judge(s, "r1", "0", ONSET, now)
    assert evidence.harmful
    assert any("loss rising" in h for h in evidence.harm) and any("still growing" in h for h in evidence.harm)


def test_a_norm_that_grows_on_a_flat_loss_is_harm_bloom_style():
    # BLOOM-176B: the norm grows for several steps before the loss moves
    s, now = store(loss_after=[1.0, 1.01, 0.99, 1.0], norms_after=[3, 12, 50, 200])
    assert judge(s, "r1", "0", ONSET, now).harm == ["gradient norm still growing: 3 -> 200 over 3 scrapes"]


def test_a_jump_that_levels_off_on_a_flat_loss_is_not_harm():
    s, now = store(loss_after=[1.0, 1.02, 0.98, 1.0], norms_after=[40, 38, 41, 39])
    assert not judge(s, "r1", "0", ONSET, now).harmful


def test_one_hard_batch_is_not_a_rising_loss_but_three_in_a_row_are():
    s, now = store(loss_after=[1.0, 2.0, 1.0, 1.0])
    assert not judge(s, "r1", "0", ONSET, now).harmful
    s, now = store(loss_after=[1.0, 1.6, 1.7, 1.6])
    assert judge(s, "r1", "0", ONSET, now).harmful


def test_a_loss_spike_between_scrapes_is_harm():
    s, now = store(loss_after=[1.0, 1.0, 1.0], loss_max_after=[1.1, 2.5, 1.1])
    assert any("loss spike: 2.5x" in h for h in judge(s, "r1", "0", ONSET, now).harm)


def test_a_skipped_nonfinite_step_is_harm_and_so_is_a_nan_loss():
    s, now = store(loss_after=[0.9, 0.8, 0.7], skipped_after=[0, 1, 1])
    assert judge(s, "r1", "0", ONSET, now).harm == ["1 step(s) skipped for NaN/Inf gradients"]
    s, now = store(loss_after=[0.9, 0.8, math.nan])
    assert judge(s, "r1", "0", ONSET, now).harm == ["the loss is nan now"]


def test_a_skip_shortly_before_the_onset_belongs_to_the_incident():
    s, now = store(loss_after=[1.0, 1.0], skip_at=ONSET - 30.0)
    assert judge(s, "r1", "0", ONSET, now).harmful
    s, now = store(loss_after=[1.0, 1.0], skip_at=ONSET - 100.0)  # an old, separate event
    assert not judge(s, "r1", "0", ONSET, now).harmful


def test_a_run_without_a_loss_is_judged_by_its_gradients_alone():
    s, now = store(loss_before=math.nan, loss_after=[], norms_after=[3, 12, 50, 200])
    assert judge(s, "r1", "0", ONSET, now).harmful
    s, now = store(loss_before=math.nan, loss_after=[], norms_after=[50, 50, 50, 50])
    assert not judge(s, "r1", "0", ONSET, now).harmful


def test_an_unknown_run_has_nothing_to_judge_by():
    s, now = store()
    evidence = judge(s, "other", None, ONSET, now)
    assert not evidence.known and evidence.summary() == "no samples of this run to judge by"


def test_all_ranks_are_read_when_no_rank_is_given():
    s, now = store(loss_after=[1.0, 1.0, 1.0])
    s.add(now, mn.SKIPPED_STEPS_TOTAL, build_labels({"run": "r1", "rank": "1", "reason": "nonfinite"}), 0.0)
    s.add(now + 2, mn.SKIPPED_STEPS_TOTAL, build_labels({"run": "r1", "rank": "1", "reason": "nonfinite"}), 2.0)
    assert not judge(s, "r1", "0", ONSET, now + 2).harmful
    assert judge(s, "r1", None, ONSET, now + 2).harmful
