"""A failed run, turned into the bot's own error without keeping the run's memory alive.

An exception's traceback holds every frame it passed through, and each frame its locals: after
an out-of-memory error in the UNet, that is the activations and attention tensors that filled
the device. Freeing memory or retrying while such an exception is being handled (inside the
`except` block, or with `raise ... from exc` keeping it as the cause) frees nothing. So
`RunFailures` swallows the error at the end of the `with` block, after logging it, clearing
its frames and recording what the user should hear; the engine then frees memory and raises
the recorded error outside every handler. The original error's type and message survive as a
note on the new one (`__notes__`, for the job row), with no traceback and no `__cause__`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType

from bot.engine.device import is_oom
from bot.errors import GenerationFailed, GpuOutOfMemory, SdbotError, without_frames
from bot.jobs import GenerationRequest

log = logging.getLogger(__name__)

#: Longest original error text kept as a note (CUDA's out-of-memory message is a paragraph).
_DETAIL_CHARS = 500


class RunFailures:
    """`with RunFailures(requests):` around a run; then `take()` the error, if any, to raise
    once outside the handler (after freeing memory)."""

    def __init__(self, requests: Sequence[GenerationRequest]) -> None:
        self.requests = requests
        self.error: SdbotError | None = None

    def __enter__(self) -> RunFailures:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # KeyboardInterrupt and friends go on as they are
        self.error = as_bot_error(exc, self.requests)
        without_frames(exc)
        return True

    def take(self) -> SdbotError | None:
        """The recorded error (None when the run succeeded); forgotten here."""
        error, self.error = self.error, None
        return error


def as_bot_error(exc: Exception, requests: Sequence[GenerationRequest]) -> SdbotError:
    """The error to raise for `exc`: a domain error as it is (JobCancelled from on_step,
    InvalidRequest for a LoRA, ...), else GpuOutOfMemory or GenerationFailed with a message for
    the user and the original as a note."""
    if isinstance(exc, SdbotError):
        return exc
    first = requests[0]
    error: SdbotError
    if is_oom(exc):
        error = GpuOutOfMemory(
            f"Ran out of GPU memory making {sum(r.count for r in requests)} image(s) "
            f"at {first.width}x{first.height}; try fewer images or a smaller size."
        )
    else:
        # The traceback goes to the log now: it is cleared before the error is raised.
        log.error("generation failed for model %s", first.model, exc_info=exc)
        error = GenerationFailed(
            "Image generation failed unexpectedly. Try again, or with different settings."
        )
    error.add_note(f"{type(exc).__name__}: {exc}"[:_DETAIL_CHARS])
    return error
