"""`sdbot bench gpu`: the one script to run when a GPU is at hand.

Builds a full-size random-weight SD 1.5 (and SDXL) from configs written in code (no download,
bench/gpu_models.py), loads them through the bot's Engine from a temporary folder and prints
one table (sections in bench/gpu_sections.py): denoising it/s at 512 px for batches of 1, 4
and 8; bf16 against fp16; host syncs per step; the exact-batches cost; allocated memory after
an eviction and after a failed job; OOM recovery under a memory cap; model switch time with
and without the RAM tier; SDXL; torch.compile against eager with its compile time, beside the
published A100 figures.

Robust by construction, so one run on a borrowed GPU gives a table whatever happens: each
section runs in its own try/except and prints its error in its row; a total time guard skips
sections that would not fit (`--time-limit`, default 240 s), and a watchdog prints the table so
far and exits if a section overruns the limit by 45 s anyway: under 5 minutes on one H200.
The table prints row by row as the rows are measured (flushed), and torch.compile runs last, so
every other row is out before its cold compiles start.

`--quick` runs reduced shapes (128 px) on the CPU in well under a minute, so CI runs the
script; rows that need CUDA print "n/a (no CUDA)".
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.gpu_sections import SECTIONS, Bench, NotHere, Row
from bot.engine.device import free_memory, resolve_device

#: Seconds a section may overrun the time limit before the watchdog stops the run.
GRACE_S = 45.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbot bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced shapes on the CPU (CI)")
    parser.add_argument(
        "--device", default=None, help="auto (default; cpu with --quick), cuda, cpu"
    )
    parser.add_argument(
        "--scale", choices=("full", "quick", "tiny"), help="model shapes (default: full, quick)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps per timed run")
    parser.add_argument("--repeats", type=int, help="timed runs per figure (the best is kept)")
    parser.add_argument("--exact-batch", type=int, default=4, help="images for the exact row")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--only", help=f"comma-separated sections (build is always run): {', '.join(SECTIONS)}"
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    quick = bool(args.quick)
    device = resolve_device(args.device or ("cpu" if quick else "auto"))
    scale = args.scale or ("quick" if quick else "full")
    limit = args.time_limit or (150.0 if quick else 240.0)
    wanted = list(SECTIONS) if not args.only else ["build", *args.only.split(",")]
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        print(f"unknown sections: {', '.join(unknown)}; use {', '.join(SECTIONS)}")
        return 2
    if args.threads:
        # On a busy CPU, torch's default (a thread per core) can be 20x slower than one.
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows: list[tuple[str, Row]] = []
    started = time.monotonic()
    print(f"sdbot bench gpu: {_machine(device)}; {scale} shapes; time limit {limit:.0f} s")
    with _workdir() as folder, _watchdog(rows, limit + GRACE_S, started):
        bench = Bench(
            device=device,
            scale=scale,
            folder=folder,
            deadline=started + limit,
            steps=args.steps or (4 if scale != "full" else 12),
            repeats=args.repeats or (1 if scale != "full" else 2),
            exact_batch=args.exact_batch,
        )
        # The table is printed row by row as measured, flushed: a run stopped from outside
        # (a borrowed GPU's timeout) has still shown every row it finished.
        print(_HEADER, flush=True)
        for name in SECTIONS:
            if name not in wanted:
                continue
            for row in _run(name, bench):
                rows.append((name, row))
                print(_line(name, row), flush=True)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


def _run(name: str, bench: Bench) -> list[Row]:
    section = SECTIONS[name]
    start = time.monotonic()
    try:
        return section(bench)
    except NotHere as why:
        return [Row(name, f"n/a ({why})")]
    except Exception as exc:  # one broken section must not cost the others their rows
        logging.getLogger(__name__).debug("section %s failed", name, exc_info=True)
        return [Row(name, f"error after {time.monotonic() - start:.0f} s: {_short(exc)}")]
    finally:
        # The section's engines are garbage now: collect them (and their models) before the
        # next section measures memory or loads its own.
        with contextlib.suppress(Exception):
            free_memory(bench.device)


def table(rows: list[tuple[str, Row]], seconds: float) -> str:
    """The rows as one Markdown table."""
    lines = [_HEADER, *(_line(section, row) for section, row in rows)]
    lines.append(f"\n(total {seconds:.0f} s)")
    return "\n".join(lines)


_HEADER = "| section | measure | ours | published anchor |\n|---|---|---|---|"


def _line(section: str, row: Row) -> str:
    return f"| {section} | {row.name} | {row.ours} | {row.anchor} |"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
    return f"{device.type} ({os.cpu_count()} cores), torch {torch.__version__}"


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sdbot-bench-gpu-") as folder:
        yield Path(folder)


@contextlib.contextmanager
def _watchdog(rows: list[tuple[str, Row]], after: float, started: float) -> Iterator[None]:
    """If the run is still going `after` seconds from `started`, print what it has and exit."""

    def fire() -> None:
        print(f"\ntime guard: stopped after {time.monotonic() - started:.0f} s")
        print(table(rows, time.monotonic() - started))
        sys.stdout.flush()
        os._exit(3)

    timer = threading.Timer(max(1.0, after - (time.monotonic() - started)), fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
