"""What to do after a failed attempt: the retry policy of both run modes, as pure functions.

`for_item` decides for the item (online and batch alike): try again now, after a delay, give up and
record the failure, or stop, leaving the item as it was. `for_provider` decides what the failure says
about the provider that answered it: throttled, failing, fine, suspect, or to be disabled.

Rules (each a row of the tests' tables):
- A fatal answer (bad key, no quota, a daily cap, a retired model) is the provider's, never the
  item's: the pool has tried the others by then, so the item stops as it was (resumable).
- A 429 (or a shed flex request) is not billed and its provider paces the next try: it costs no
  attempt, up to
  `THROTTLES_PER_ATTEMPT` per attempt allowed, which still ends an item on a provider that never lets
  it through. It is tried again at once (the provider's controller holds it back).
- A retryable failure (5xx, timeouts, resets, a download that failed, an URL that expired) is tried
  again within `max_attempts`, after the server's Retry-After when it gave one, else after the
  caller's jittered backoff. A reply with no image is tried once more. The rest is given up.
- The same plain permanent error on `SAME_ERROR_STOP` items in a row from one provider is that
  provider's configuration (a model name it does not know), not the items': it is disabled, and the
  items that met the error stay resumable.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipeline.errors import FatalError, ItemError, NoImageError, PermanentError, UrlGoneError

THROTTLES_PER_ATTEMPT = 10  # 429s an item may meet per attempt it is allowed
SAME_ERROR_STOP = 10  # items in a row failing with one permanent error: a configuration problem
FAILING_KINDS = frozenset({"network", "timeout", "server_error"})  # what the circuit breaker counts
FREE_KINDS = frozenset({"rate_limited", "shed"})  # not billed, paced by the provider: no attempt's cost


class Action(Enum):
    RETRY = "retry"  # try again after `delay_s` (None: the caller's jittered backoff)
    GIVE_UP = "give_up"  # record the failure with its reason
    STOP = "stop"  # nothing to record: the item stays as it was, for a rerun


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float | None = None
    costs_attempt: bool = True


def for_item(error: ItemError, attempts: int, throttles: int, max_attempts: int) -> Decision:
    """After `error`, the item's next step; `attempts` and `throttles` are those used before it."""
    if isinstance(error, FatalError):
        return Decision(Action.STOP, costs_attempt=False)
    if error.kind in FREE_KINDS and throttles < THROTTLES_PER_ATTEMPT * max_attempts:
        return Decision(Action.RETRY, 0.0, costs_attempt=False)
    used = attempts + 1
    again = (
        error.retryable or isinstance(error, UrlGoneError) or (isinstance(error, NoImageError) and used < 2)
    )
    if not again or used >= max_attempts:
        return Decision(Action.GIVE_UP)
    if error.kind in FREE_KINDS:
        return Decision(Action.RETRY, 0.0)
    return Decision(Action.RETRY, error.retry_after)


class Verdict(Enum):
    THROTTLED = "throttled"  # a 429: the controller slows the provider down
    FAILING = "failing"  # the breaker counts it; the outage clock runs
    ANSWERED = "answered"  # a proper answer about the item (a refusal, no image): the provider is alive
    SUSPECT = "suspect"  # a plain permanent error: the item's, or the provider's if it repeats
    DISABLE = "disable"  # the provider can serve no item: out for the rest of the run


def for_provider(error: ItemError, same_in_a_row: int) -> Verdict:
    """What `error` says about its provider; `same_in_a_row`: items that met this very error from
    this provider just before, this one not counted."""
    if isinstance(error, FatalError):
        return Verdict.DISABLE
    if error.kind in FREE_KINDS:
        return Verdict.THROTTLED
    if error.kind in FAILING_KINDS:
        return Verdict.FAILING
    if type(error) is PermanentError and error.kind == PermanentError.kind:  # a plain 400, no more
        return Verdict.DISABLE if same_in_a_row + 1 >= SAME_ERROR_STOP else Verdict.SUSPECT
    return Verdict.ANSWERED
