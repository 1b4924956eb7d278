"""The supervisor's restart policy (relayd.supervisor), without processes."""

from __future__ import annotations

import itertools

from relayd import supervisor


class TestRestartBackoff:
    def test_a_crash_loop_backs_off_to_the_cap(self) -> None:
        """A worker that exits at once, again and again, waits 0.5, 1, 2, 4 ... 30 s."""
        failures, waits = 0, []
        for _ in range(10):
            failures = supervisor.failures_after(failures, ran_s=0.1)
            waits.append(supervisor.backoff(failures))
        assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]

    def test_a_worker_that_ran_long_enough_starts_over(self) -> None:
        """After a run of STABLE_S or more, the next restart waits the initial backoff,
        however many exits came before; a shorter run keeps counting."""
        failures = 0
        for ran in itertools.repeat(1.0, 8):
            failures = supervisor.failures_after(failures, ran)
        assert supervisor.backoff(failures) == supervisor.RESTART_MAX_S
        failures = supervisor.failures_after(failures, supervisor.STABLE_S)
        assert supervisor.backoff(failures) == supervisor.RESTART_INITIAL_S
        failures = supervisor.failures_after(failures, supervisor.STABLE_S - 0.001)
        assert supervisor.backoff(failures) == 2 * supervisor.RESTART_INITIAL_S
