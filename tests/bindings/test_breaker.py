"""CircuitBreaker: opens after the threshold, half-open trial, doubling period, recovery."""

from proxy.bindings.breaker import BreakerState, CircuitBreaker


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, open_s=1.0)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    breaker.record_success()
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    assert breaker.allow(0.0)
    breaker.record_failure(0.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(0.5)


def test_half_open_lets_one_trial_through() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_s=1.0)
    breaker.record_failure(0.0)
    assert breaker.allow(1.0)  # the trial
    assert not breaker.allow(1.0)  # everyone else still fails fast
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow(1.0)


def test_failed_trial_doubles_the_open_period_up_to_a_cap() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_s=1.0)
    breaker.record_failure(0.0)
    trial_at = 1.0
    for period in (2.0, 4.0, 8.0, 8.0):
        assert breaker.allow(trial_at)
        breaker.record_failure(trial_at)
        assert not breaker.allow(trial_at + period - 0.01)
        trial_at += period
    assert breaker.allow(trial_at)


def test_success_from_elsewhere_closes() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_s=10.0)
    breaker.record_failure(0.0)
    assert not breaker.allow(1.0)
    breaker.record_success()
    assert breaker.allow(1.0)


def test_a_trial_that_never_reports_does_not_wedge_the_breaker() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_s=1.0)
    breaker.record_failure(0.0)
    assert breaker.allow(1.0)  # trial granted, its caller never reports
    assert not breaker.allow(1.5)
    assert breaker.allow(2.0)
