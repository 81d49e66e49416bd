"""The bot's side of a replica's streamed reply: a deadline on silence, and Ray's errors as the
bot's own.

`Stream` reads a response's items on a daemon thread and hands them to the worker's thread,
which waits for each with a deadline: a replica sends something at least every second
(`protocol.HEARTBEAT_S`), so `SILENCE_S` without a word means it hung, or that Serve cannot
place the call anywhere (every replica dead). Then the response is cancelled and the call
fails: it must not hold the worker's thread, its job's final state, cancel or the bot's exit
forever. Ray's synchronous iteration has no timeout of its own, hence the thread; a reader
left blocked on a hung replica is a daemon and does not hold the interpreter.

`bot_errors` maps Ray's errors to the bot's, with messages safe to show a member.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from bot.errors import GenerationFailed, QueueFull, SdbotError

log = logging.getLogger(__name__)

#: Seconds without a word from a replica (heartbeats included) before the bot gives up on it.
SILENCE_S = 120.0

_END = object()


class ReplicaDied(Exception):
    """Internal: the replica running a call died; the call may be retried elsewhere."""


class Stream:
    """The events of one streaming response (it streams lists of them), each awaited for at
    most `silence_s`; see the module docstring."""

    def __init__(self, response: Any, silence_s: float) -> None:
        self.response = response
        self.silence_s = silence_s
        self._items: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="sdbot-serve-stream", daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self.response:
                self._items.put((item, None))
        except BaseException as exc:  # handed to the worker's thread, which raises it
            self._items.put((None, exc))
        else:
            self._items.put((_END, None))

    def events(self) -> Iterator[Any]:
        while True:
            try:
                item, error = self._items.get(timeout=self.silence_s)
            except queue.Empty:
                log.error("no word from the image server for %.0f s; giving up", self.silence_s)
                raise GenerationFailed(
                    f"The image server stopped answering (nothing for {self.silence_s:.0f} "
                    "seconds), so this job was stopped. Please try again in a minute."
                ) from None
            if error is not None:
                raise error
            if item is _END:
                return
            yield from item


@contextlib.contextmanager
def bot_errors() -> Iterator[None]:
    """Ray's errors as the bot's own, with messages safe to show a member.

    RayTaskError first: Ray raises the engine's error as a class that is both RayTaskError and
    the error's own class (e.g. InvalidRequest), whose str() is the remote traceback."""
    try:
        yield
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, SdbotError):
            # The engine's own error, as if it had run here: the member reads its message.
            raise cause.with_traceback(None) from None
        if isinstance(cause, ActorDiedError):
            raise ReplicaDied(describe(cause)) from exc
        if isinstance(cause, RayActorError):
            raise _unavailable(cause) from exc
        log.error("a replica failed: %s", exc)
        raise GenerationFailed(
            "Image generation failed unexpectedly on the image server. Try again, or with "
            "different settings."
        ) from exc
    except (SdbotError, ReplicaDied):
        raise
    except BackPressureError as exc:
        raise QueueFull(
            "The image servers are all busy right now. Please try again in a minute."
        ) from exc
    except ActorDiedError as exc:
        raise ReplicaDied(describe(exc)) from exc
    except RayActorError as exc:  # ActorUnavailableError: it may be running the job still
        raise _unavailable(exc) from exc
    except (RayError, RayServeException, ConnectionError, TimeoutError) as exc:
        log.error("lost contact with the Ray cluster: %s", describe(exc))
        raise GenerationFailed(
            "The bot lost contact with its image servers (the Ray cluster); this job could "
            "not run. Please try again in a minute."
        ) from exc


def _unavailable(exc: RayActorError) -> GenerationFailed:
    # Not retried: the replica may still be running the job (a network blip), and a retry
    # would run it twice.
    log.error("lost contact with the replica running a job: %s", describe(exc))
    return GenerationFailed(
        "The bot lost contact with the image server running this job, so it was stopped. "
        "Please try again in a minute."
    )


def describe(exc: BaseException) -> str:
    """One line naming an exception, for logs and SettingsError messages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
