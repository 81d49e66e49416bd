"""The fair queue and batch planning as plain data: no threads, no event loop, no engine.

Who goes next (least recently served user first, each user's jobs in order), which jobs share
a call (equal batch_key(), up to max_batch images), and when a job for a loaded model may jump
the line. The executor's tests (test_fair_queue.py) check the same policy through the threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bot.executor.fair_queue import Batch, FairQueue
from bot.jobs import GenerationRequest

MODEL_A = "builtin:tiny"
MODEL_B = "other/model"


@dataclass(eq=False)
class Item:
    user_id: int
    request: GenerationRequest
    submitted_at: float = 0.0
    name: str = field(default="")


def item(user: int, name: str, *, at: float = 0.0, model: str = MODEL_A, **kw: Any) -> Item:
    kw.setdefault("steps", 3)
    kw.setdefault("seed", 7)
    request = GenerationRequest(prompt=name, model=model, width=64, height=64, **kw)
    return Item(user, request, at, name)


def names(jobs: list[Item] | Batch[Item] | None) -> list[str]:
    if jobs is None:
        return []
    return [job.name for job in (jobs.jobs if isinstance(jobs, Batch) else jobs)]


def queue_of(*items: Item, **kw: Any) -> FairQueue[Item]:
    queue: FairQueue[Item] = FairQueue(**kw)
    for job in items:
        queue.push(job)
    return queue


def run_next(
    queue: FairQueue[Item], *, loaded: tuple[str, ...] = (), now: float = 0.0
) -> Batch[Item]:
    """Plan the next batch as a free worker would, and start it."""
    batch = queue.plan(queue.order(), loaded=loaded, now=now)
    assert batch is not None
    queue.take(batch)
    return batch


# -- the fair order -------------------------------------------------------------------------


def test_an_empty_queue_plans_nothing() -> None:
    queue = queue_of()
    assert queue.order() == [] and queue.plan([], now=0.0) is None and len(queue) == 0


def test_users_never_served_go_in_the_order_they_first_asked() -> None:
    queue = queue_of(item(3, "c0"), item(1, "a0"), item(2, "b0"), item(1, "a1"))
    assert names(queue.order()) == ["c0", "a0", "b0", "a1"]


def test_round_robin_across_users_keeps_each_users_own_order() -> None:
    users = ((1, "a"), (2, "b"), (3, "c"))
    queue = queue_of(*(item(u, f"{name}{i}") for u, name in users for i in range(3)), max_batch=1)
    expected = ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    assert names(queue.order()) == expected
    assert [names(run_next(queue))[0] for _ in range(9)] == expected


def test_a_light_user_waits_about_one_job_behind_a_heavy_user() -> None:
    queue = queue_of(*(item(1, f"h{i}") for i in range(21)), max_batch=1)
    assert names(run_next(queue)) == ["h0"]  # on the GPU when the light user asks
    queue.push(item(2, "light"))
    assert names(queue.order())[:2] == ["light", "h1"]
    assert names(run_next(queue)) == ["light"]
    assert [names(run_next(queue))[0] for _ in range(20)] == [f"h{i}" for i in range(1, 21)]


def test_the_user_just_served_goes_to_the_back_of_the_line() -> None:
    queue = queue_of(item(1, "a0"), item(1, "a1"), item(2, "b0"), item(3, "c0"), max_batch=1)
    assert names(run_next(queue)) == ["a0"]
    assert names(queue.order()) == ["b0", "c0", "a1"]
    assert names(run_next(queue)) == ["b0"]
    queue.push(item(2, "b1"))
    assert names(queue.order()) == ["c0", "a1", "b1"]


def test_removing_a_job_takes_it_out_of_line_and_forgets_an_empty_user() -> None:
    a0, b0, b1 = item(1, "a0"), item(2, "b0"), item(2, "b1")
    queue = queue_of(a0, b0, b1)
    assert queue.remove(b0) and names(queue.order()) == ["a0", "b1"]
    assert not queue.remove(b0)  # already out
    assert queue.remove(a0) and queue.per_user() == {2: 1} and queue.count(1) == 0
    assert b1 in queue and a0 not in queue and len(queue) == 1


def test_clear_returns_everything_that_was_waiting() -> None:
    jobs = [item(1, "a0"), item(2, "b0"), item(1, "a1")]
    queue = queue_of(*jobs)
    assert sorted(names(queue.clear())) == ["a0", "a1", "b0"]
    assert len(queue) == 0 and queue.order() == []


def test_long_gone_users_are_forgotten_but_waiting_ones_keep_their_turn() -> None:
    queue = queue_of(forget_after=3, max_batch=1)
    for user in range(1, 4):  # three users come and go
        queue.push(item(user, f"u{user}"))
        run_next(queue)
    queue.push(item(1, "back"))  # user 1 was served longest ago of those remembered
    queue.push(item(9, "new"))
    assert names(queue.order()) == ["new", "back"]
    run_next(queue)  # a fourth served user: over the limit, so the gone ones are forgotten
    assert names(queue.order()) == ["back"]
    # User 2 was forgotten, so counts as never served and goes first; user 1, still waiting,
    # kept its place (else its earlier job would go first).
    queue.push(item(2, "u2 again"))
    assert names(queue.order()) == ["u2 again", "back"]


# -- batches --------------------------------------------------------------------------------


def test_a_batch_takes_compatible_jobs_of_several_users_up_to_max_batch() -> None:
    queue = queue_of(
        *(item(user, f"p{user}", seed=user) for user in range(6)),
        item(9, "odd", steps=5),  # another shape: never mixed in
        max_batch=4,
    )
    assert names(run_next(queue)) == ["p0", "p1", "p2", "p3"]
    assert names(run_next(queue)) == ["p4", "p5"]
    assert names(run_next(queue)) == ["odd"]


def test_max_batch_counts_images_and_skips_a_job_that_does_not_fit() -> None:
    queue = queue_of(item(1, "a", count=3), item(2, "b", count=2), item(3, "c"), max_batch=4)
    assert names(run_next(queue)) == ["a", "c"]
    assert names(run_next(queue)) == ["b"]


def test_planning_changes_nothing_until_the_batch_is_taken() -> None:
    queue = queue_of(item(1, "a0"), item(2, "b0"), max_batch=1)
    planned = queue.plan(queue.order(), now=0.0)
    assert names(planned) == ["a0"] and names(queue.order()) == ["a0", "b0"]
    assert planned is not None and not planned.override


def test_a_job_that_left_the_queue_is_dropped_from_its_batch_when_taken() -> None:
    a0, b0 = item(1, "a0"), item(2, "b0")
    queue = queue_of(a0, b0)
    batch = queue.plan(queue.order(), now=0.0)
    assert batch is not None and names(batch) == ["a0", "b0"]
    queue.remove(b0)  # cancelled in between
    queue.take(batch)
    assert names(batch) == ["a0"] and len(queue) == 0


# -- the loaded model -----------------------------------------------------------------------


def test_a_job_for_a_loaded_model_jumps_ahead_at_most_max_model_streak_times() -> None:
    queue = queue_of(
        item(2, "b0", model=MODEL_B),
        *(item(3, f"a{i}") for i in range(4)),
        max_batch=1,
        max_model_streak=2,
    )
    order = [names(run_next(queue, loaded=(MODEL_A,)))[0] for _ in range(5)]
    assert order == ["a0", "a1", "b0", "a2", "a3"]


def test_a_jump_for_the_loaded_model_is_marked_as_one() -> None:
    queue = queue_of(item(2, "b0", model=MODEL_B), item(3, "a0"), max_batch=1)
    batch = queue.plan(queue.order(), loaded=(MODEL_A,), now=0.0)
    assert batch is not None and names(batch) == ["a0"] and batch.override
    fair = queue.plan(queue.order(), loaded=(MODEL_B,), now=0.0)
    assert fair is not None and names(fair) == ["b0"] and not fair.override


def test_a_long_wait_beats_the_model_preference() -> None:
    queue = queue_of(
        item(2, "b0", at=0.0, model=MODEL_B), item(3, "a0", at=0.0), max_model_wait_s=30.0
    )
    assert names(queue.plan(queue.order(), loaded=(MODEL_A,), now=29.0)) == ["a0"]
    assert names(queue.plan(queue.order(), loaded=(MODEL_A,), now=30.0)) == ["b0"]


def test_nothing_jumps_the_line_when_no_model_is_loaded_or_none_is_wanted() -> None:
    queue = queue_of(item(2, "b0", model=MODEL_B), item(3, "a0"), max_batch=1)
    assert names(queue.plan(queue.order(), loaded=(), now=0.0)) == ["b0"]
    assert names(queue.plan(queue.order(), loaded=("third/model",), now=0.0)) == ["b0"]


def test_a_model_loaded_under_its_catalog_name_counts_as_loaded() -> None:
    queue = queue_of(item(2, "b0", model=MODEL_B), item(3, "a0"), max_batch=1)
    aliases = {MODEL_A: "Tiny", MODEL_B: "Other"}
    batch = queue.plan(queue.order(), loaded=("Tiny",), aliases=aliases, now=0.0)
    assert names(batch) == ["a0"]


def test_two_workers_with_different_models_each_get_a_job_for_their_own() -> None:
    queue = queue_of(
        item(1, "b0", model=MODEL_B), item(2, "a0"), item(1, "b1", model=MODEL_B), max_batch=1
    )
    order = queue.order()
    first = queue.plan(order, loaded=(MODEL_A,), now=0.0)
    assert names(first) == ["a0"]
    rest = [job for job in order if first is not None and job not in first.jobs]
    assert names(queue.plan(rest, loaded=(MODEL_B,), now=0.0)) == ["b0"]
