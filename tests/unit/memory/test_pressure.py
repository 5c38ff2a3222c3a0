"""The pressure ladder: unload, pause, kill, each with hysteresis (docs/design.md#pressure-ladder)."""

from __future__ import annotations

from rmq.memory.pressure import Ladder, Step

BUDGET = 1000


def ladder(repeat_s: float = 1.0) -> Ladder:
    return Ladder(BUDGET, unload=0.80, unload_target=0.70, pause=0.85, resume=0.75, kill=0.95,
                  unload_repeat_s=repeat_s)


def test_below_every_line_is_ok() -> None:
    assert ladder().update(790, 0.0) == Step("ok")


def test_unload_at_080_asks_to_free_down_to_the_target() -> None:
    step = ladder().update(800, 0.0)
    assert step.zone == "unload"
    assert step.unload is True
    assert step.unload_bytes == 100  # 800 - 0.70 * 1000
    assert not (step.pause or step.resume or step.kill)


def test_unload_repeats_every_interval_until_below_the_target() -> None:
    lad = ladder(repeat_s=1.0)
    assert lad.update(820, 0.0).unload
    # Still above the target: no new request before the repeat interval
    assert not lad.update(790, 0.5).unload
    assert lad.update(790, 0.5).zone == "unload"
    # after the interval, a repeat
    again = lad.update(780, 1.0)
    assert again.unload and again.unload_bytes == 80
    assert not lad.update(750, 1.5).unload
    assert lad.update(750, 2.1).unload
    # below the target: unloading stops and the zone is ok
    below = lad.update(699, 3.5)
    assert below == Step("ok")
    assert not lad.update(720, 10.0).unload  # 0.72 < 0.80: no new episode
    # a new crossing starts a new episode at once
    assert lad.update(800, 10.1).unload


def test_pause_at_085_and_resume_only_below_075() -> None:
    lad = ladder()
    assert not lad.update(849, 0.0).pause
    first = lad.update(850, 0.1)
    assert first.pause and first.zone == "pause"
    # edges only: no second pause while paused
    assert not lad.update(900, 0.2).pause
    # hysteresis: between 0.75 and 0.85 it stays paused, no resume
    for i, value in enumerate([840, 800, 760, 750]):
        step = lad.update(value, 0.3 + i / 10)
        assert not step.resume and step.zone == "pause", value
    assert lad.paused
    resumed = lad.update(749, 1.0)
    assert resumed.resume and not resumed.pause
    assert not lad.paused
    assert not lad.update(700, 1.1).resume  # edge only


def test_kill_at_095_and_above_every_reading() -> None:
    lad = ladder()
    assert not lad.update(949, 0.0).kill
    for value in (950, 960, 1200):
        step = lad.update(value, 0.1)
        assert step.kill and step.zone == "kill"
    # kill has no hysteresis of its own: the next reading below 0.95 stops asking
    after = lad.update(940, 0.2)
    assert not after.kill and after.zone == "pause"


def test_a_jump_straight_to_kill_also_pauses_and_unloads() -> None:
    step = ladder().update(990, 0.0)
    assert step.kill and step.pause and step.unload
    assert step.unload_bytes == 290


def test_zones_in_order_on_the_way_up_and_down() -> None:
    lad = ladder()
    up = [lad.update(v, i).zone for i, v in enumerate([500, 800, 850, 950])]
    assert up == ["ok", "unload", "pause", "kill"]
    down = [lad.update(v, 10 + i).zone for i, v in enumerate([900, 760, 740, 710, 690])]
    assert down == ["pause", "pause", "unload", "unload", "ok"]


def test_zero_budget_never_acts() -> None:
    lad = Ladder(0, 0.8, 0.7, 0.85, 0.75, 0.95)
    assert lad.update(10**9, 0.0) == Step("ok")
