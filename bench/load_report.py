"""The load bench's report: its figures, the table it prints, and what fails a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.api_load import ApiFigures

LAG_P99_LIMIT_MS = 10.0
#: No callback on the bot's loop may compute this long: that is heavy work, whatever the load.
CPU_LIMIT_MS = 50.0


@dataclass
class LoadReport:
    requests: int
    sent: int
    statuses: dict[str, int]
    refusal_reasons: dict[str, int]
    unexplained_refusals: int
    lost: int
    rows: int
    not_final: int
    acked: int
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    replies: dict[str, int]
    mismatched: int
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    lag_samples: int
    #: The lag p99 less the loop thread's waits for a core (None where unmeasured).
    lag_in_process_p99_ms: float | None
    #: The loop callback that computed longest (CPU, less GC), and how long.
    heaviest_ms: float
    heaviest: str
    gc_max_ms: float
    seconds: float
    lag_limit_ms: float | None = LAG_P99_LIMIT_MS
    cpu_limit_ms: float | None = CPU_LIMIT_MS
    errors: list[str] = field(default_factory=list)
    #: The members who called the HTTP API instead (--api-share); None when none did.
    api: ApiFigures | None = None

    def problems(self) -> list[str]:
        """What failed the run; empty when it passed."""
        out = [f"{self.requests - self.sent} requests could not be sent"] if self.errors else []
        if self.acked < self.sent:
            out.append(f"{self.sent - self.acked} interactions not acknowledged within 3 s")
        if self.replies.get("none", 0):
            out.append(f"{self.replies['none']} interactions got no reply")
        if self.mismatched:
            out.append(f"{self.mismatched} replies do not match their job row")
        if self.lost or self.rows != self.sent:
            out.append(f"{self.lost} requests lost (no job row); {self.rows} rows")
        if self.not_final:
            out.append(f"{self.not_final} accepted jobs not in a final state")
        if self.unexplained_refusals:
            out.append(f"{self.unexplained_refusals} refusals without a reason")
        if self.lag_limit_ms is not None and self.lag_p99_ms >= self.lag_limit_ms:
            out.append(f"event-loop lag p99 {self.lag_p99_ms:.1f} ms >= {self.lag_limit_ms:g} ms")
        if self.cpu_limit_ms is not None and self.heaviest_ms >= self.cpu_limit_ms:
            out.append(f"a loop callback computed {self.heaviest_ms:.0f} ms: {self.heaviest}")
        if self.api is not None:
            out.extend(self.api.problems())
        return out

    def table(self) -> str:
        s = self.statuses
        others = {k: v for k, v in s.items() if k not in ("finished", "rejected", "failed")}
        rows = [
            ("requests sent", f"{self.sent} of {self.requests}"),
            ("acknowledged within 3 s", f"{self.acked} of {self.sent}"),
            ("time to acknowledge p50 / p99 / max", _ms(self.ack_p50_ms, self.ack_p99_ms,
                                                         self.ack_max_ms)),
            ("replies", _counts(self.replies, ("result", "refusal", "failure", "none"))),
            ("replies not matching the job row", str(self.mismatched)),
            ("job rows", f"{self.rows}  (lost: {self.lost})"),
            ("finished", str(s.get("finished", 0))),
            ("refused", f"{s.get('rejected', 0)}  {dict(self.refusal_reasons)}"),
            ("failed", str(s.get("failed", 0))),
            ("other final states", str(others or 0)),
            ("accepted jobs not final", str(self.not_final)),
            ("refusals without a reason", str(self.unexplained_refusals)),
            ("bot event-loop lag p50 / p99 / max", _ms(self.lag_p50_ms, self.lag_p99_ms,
                                                        self.lag_max_ms)
             + f"  ({self.lag_samples} samples)"),
            ("  less waits for a free core: p99", _opt_ms(self.lag_in_process_p99_ms)),
            ("heaviest loop callback (CPU less GC)", f"{self.heaviest_ms:.1f} ms  {self.heaviest}"),
            ("longest GC pause (any thread)", f"{self.gc_max_ms:.1f} ms"),
            *(self.api.lines() if self.api is not None else []),
            ("wall time", f"{self.seconds:.1f} s"),
        ]  # fmt: skip
        return "\n".join(f"{name:<38}{value}" for name, value in rows)


def _ms(*values: float) -> str:
    return " / ".join(f"{v:.1f}" for v in values) + " ms"


def _opt_ms(value: float | None) -> str:
    return "not measured (needs Linux schedstat)" if value is None else f"{value:.1f} ms"


def _counts(counts: dict[str, int], keys: Sequence[str]) -> str:
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in keys)
