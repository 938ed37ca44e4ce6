"""The per-provider controller and circuit breaker, driven directly: pure logic, no I/O, no clock waits."""

from __future__ import annotations

from pipeline.providers.controller import BREAKER_FAILURES, PROBE_ROUNDS, Breaker, Controller


def drive(controller: Controller, cap: int, requests: int) -> int:
    """Send `requests` requests to a provider refusing above `cap` in flight, as fast as the limit
    allows, completing the oldest first; returns how many were refused."""
    refused, in_flight = 0, []
    for _ in range(requests):
        while controller.room(0.0) <= 0:
            level = in_flight.pop(0)
            controller.succeeded(level)
            controller.done()
        level = controller.sent()
        if level > cap:
            controller.throttled(level, None)
            controller.done()
            refused += 1
        else:
            in_flight.append(level)
    return refused


def test_finds_a_hidden_cap_and_stays_near_it() -> None:
    controller = Controller(64)
    refused = drive(controller, 16, 2000)
    assert controller.ceiling in (16, 17) and controller.limit <= 17
    assert refused <= 0.02 * 2000


def test_probes_above_the_ceiling_only_after_a_long_streak() -> None:
    controller = Controller(8)
    drive(controller, 3, 50)
    controller.throttled(4, None)  # refused above the proven level: cut there, the streak starts over
    assert controller.ceiling == 3
    streak = PROBE_ROUNDS * 3
    for _ in range(streak - 1):
        controller.succeeded(3)
    assert controller.limit == 3
    controller.succeeded(3)
    assert controller.limit == 4  # one probe above


def test_a_random_refusal_at_a_proven_level_does_not_cut() -> None:
    controller = Controller(16)
    drive(controller, 16, 200)
    before = controller.ceiling
    controller.throttled(before, None)  # a level that has succeeded: noise the first time
    assert controller.ceiling == before
    controller.throttled(before, None)  # twice without a success between: a cut
    assert controller.ceiling == before - 1


def test_retry_after_pauses_and_restarts_with_one_request() -> None:
    controller = Controller(16)
    drive(controller, 100, 100)
    controller.throttled(5, 30.0)
    assert controller.room(0.0) == 0 and controller.ceiling == 16
    assert controller.limit == 1  # then slow start back to the ceiling


def test_rate_headers_budget_the_window() -> None:
    controller = Controller(16)
    level = controller.sent()
    controller.succeeded(level, remaining=2, reset_s=60.0)
    controller.done()
    assert controller.room(0.0) > 0
    controller.sent()
    controller.sent()
    assert controller.room(0.0) == 0  # the window's two are spent


def test_breaker_trips_doubles_and_probes() -> None:
    breaker = Breaker()
    cooldowns = []
    for _ in range(BREAKER_FAILURES - 1):
        assert breaker.failed() is None
    cooldowns.append(breaker.failed())
    assert breaker.probing and not breaker.allows(breaker.open_until - 0.1, 0)
    cooldowns.append(breaker.failed())  # the probe failed: out again, for twice as long
    assert cooldowns[1] == 2 * cooldowns[0]
    breaker.open_until = 0.0
    assert breaker.allows(1.0, 0) and not breaker.allows(1.0, 1)  # one probe at a time
    breaker.succeeded()
    assert not breaker.probing and breaker.allows(1.0, 5)


def test_a_probe_that_succeeds_starts_the_cool_down_over() -> None:
    """A provider failing a steady share of its requests trips now and then; each trip is short."""
    breaker = Breaker()
    for _ in range(3):
        for _ in range(BREAKER_FAILURES - 1):
            assert breaker.failed() is None
        assert breaker.failed() == 2.0  # not 4, 8: the probe after each trip succeeded
        breaker.open_until = 0.0
        breaker.succeeded()
