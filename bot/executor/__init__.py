"""The local backend: a fair per-user queue in front of N workers, one thread per worker.

Who does what, on which thread:
- The event loop (`front.GpuExecutor`, the `ImageBackend` the fronts use) admits jobs,
  records them, queues and cancels them, and answers status and positions, telling each waiting
  job its expected place whenever it changes.
- Each worker (`worker.Worker`: one engine, one thread entered once with `run_in_executor`,
  because CUDA contexts and pipelines are not shared across threads), the moment it is free,
  plans and takes its next batch (`dispatch.Dispatcher` over `fair_queue.FairQueue`, plain
  data: the fair pick or a job for a model it has loaded, plus compatible jobs up to
  `max_batch` images), runs it on its engine (OOM splits, culprit isolation, cancel checks at
  every step, throttled progress), hands the raw images back with `call_soon_threadsafe` and
  takes the next batch without waiting for the loop. A lock guards the state both sides touch;
  it is held for microseconds.
- Delivery (`delivery.Delivery`, on the loop) encodes PNGs, grids and previews in
  `asyncio.to_thread`, writes the job rows and model-load records, and sends each job's
  events, concluding it exactly once. Never on a worker's thread.

Fairness is "least recently served user first": users are ordered by when they were last
served, and each user's jobs run in their own order, so a user with 20 queued jobs delays a
newcomer by at most the job already running.

Events and job handles come from `bot.backend`, the contract; they are not re-exported here.
"""

from __future__ import annotations

from bot.executor.delivery import ModelLoadRecorder
from bot.executor.front import GpuExecutor
from bot.executor.worker import Worker

__all__ = ["GpuExecutor", "ModelLoadRecorder", "Worker"]
