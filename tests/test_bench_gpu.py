"""`sdbot bench gpu --quick` on the CPU, as CI runs it: the table comes out with every row it can
measure here, "n/a (no CUDA)" in the others, and one broken or late section costs no other row.

The smallest shapes (`--scale tiny`) keep it to seconds; the models are still built, saved and
loaded through the bot's Engine, and every timing goes through a real generate().
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import gpu_bench, gpu_sections
from bench.gpu_sections import Bench, Row
from bot.cli import main as cli_main

ANCHOR = "A100: 21.7 -> 44.0 it/s"


def rows_of(output: str) -> dict[str, str]:
    """measure -> ours, from the printed Markdown table."""
    table = output[output.index("| section |") :]
    found = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            found[cells[1]] = cells[2]
    return found


def test_quick_bench_prints_the_table_with_what_a_cpu_can_measure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A generous time limit: a busy CI runner must not turn rows into "n/a (time guard)".
    args = ["--quick", "--scale", "tiny", "--steps", "3", "--time-limit", "900"]
    assert cli_main(["bench", "gpu", *args]) == 0
    rows = rows_of(capsys.readouterr().out)
    # Measured here: model builds, eager it/s per batch, the exact-batches cost, SDXL, switches.
    for batch in (1, 4, 8):
        assert re.fullmatch(
            r"\d+\.\d\d it/s", rows[f"SD 1.5 64px batch {batch} eager (torch.float32)"]
        )
    assert re.fullmatch(r"\d+\.\d s", rows["build random SD 1.5 (tiny)"])
    assert re.match(r"on \d+\.\d+ / off \d+\.\d+ it/s", rows["exact batches, batch 4 (cpu)"])
    assert re.fullmatch(r"\d+\.\d\d it/s", rows["SDXL 64px batch 1 eager (torch.float32)"])
    for tier in ("RAM tier", "from disk"):
        row = rows[f"model switch back and forth ({tier}), one model loaded"]
        assert re.fullmatch(r"first \d+\.\d\d s, then \d+\.\d\d s", row)
    # GPU-only rows say why they are empty.
    for section in ("syncs", "memory", "oom", "dtype", "compile"):
        assert rows[section] == "n/a (no CUDA)"


def test_a_failing_section_reports_in_its_row_and_the_late_ones_are_skipped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(bench: Bench) -> list[Row]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_sections.SECTIONS, "eager", broken)
    monkeypatch.setattr(gpu_bench, "SECTIONS", gpu_sections.SECTIONS)
    args = ["--quick", "--scale", "tiny", "--only", "eager,exact", "--time-limit", "0.01"]
    assert gpu_bench.main(args) == 0
    rows = rows_of(capsys.readouterr().out)
    assert rows["eager"].startswith("error after 0 s: RuntimeError: CUDA error: an illegal")
    # The build always runs (every other row needs its model); the rest waits for time.
    assert "build random SD 1.5 (tiny)" in rows
    assert rows["exact"].startswith("n/a (time guard:")


def test_compile_runs_last_after_every_other_row_is_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor's cold compiles can take minutes on a GPU: every other row must already be out
    # (printed and flushed as table lines) when compile starts, so a run stopped during it
    # still shows them.
    assert list(gpu_sections.SECTIONS)[-1] == "compile"
    seen: dict[str, str] = {}

    def compile_probe(bench: Bench) -> list[Row]:
        seen.update(rows_of(capsys.readouterr().out))
        return [Row("probe", "ran")]

    def quick(name: str) -> object:
        return lambda bench: [Row(f"{name} row", "done")]

    for name in gpu_sections.SECTIONS:
        if name not in ("build", "compile"):
            monkeypatch.setitem(gpu_sections.SECTIONS, name, quick(name))
    monkeypatch.setitem(gpu_sections.SECTIONS, "compile", compile_probe)
    monkeypatch.setattr(gpu_bench, "SECTIONS", gpu_sections.SECTIONS)
    assert gpu_bench.main(["--quick", "--scale", "tiny", "--time-limit", "900"]) == 0
    others = [name for name in gpu_sections.SECTIONS if name not in ("build", "compile")]
    assert {f"{name} row" for name in others} <= set(seen)
    assert "build random SD 1.5 (tiny)" in seen
    assert "| compile | probe | ran |" in capsys.readouterr().out


def test_batch_4_compiles_only_when_a_second_compile_fits_and_keeps_the_batch_1_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A first compile of 200 s: 500 s left is enough for the section, not for another 260 s
    # compile after it has taken its time. (The timings are stubbed: no GPU here.)
    clock = {"now": 0.0}

    def first_call(fn: object) -> tuple[float, None]:
        clock["now"] += 260.0
        return 200.0, None

    monkeypatch.setattr(gpu_sections.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(gpu_sections, "timed", first_call)
    monkeypatch.setattr(gpu_sections, "denoise_rate", lambda *a, **k: SimpleNamespace(rate=3.0))
    bench = Bench(torch.device("cpu"), "tiny", tmp_path, 500.0, 2, 1, 4, {"sd15": tmp_path})
    monkeypatch.setattr(bench, "cuda", lambda: None)
    monkeypatch.setattr(bench, "engine", lambda **options: None)
    rows = gpu_sections.compiled(bench)
    assert rows[0] == Row("SD 1.5 64px batch 1 compiled", "3.00 it/s (first call 200 s)", ANCHOR)
    assert rows[1].name == "SD 1.5 64px batch 4 compiled"
    assert rows[1].ours == "n/a (time guard: 240 s left, needs about 260 s)"
