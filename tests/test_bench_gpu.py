"""`sdbot bench gpu --quick` on the CPU, as CI runs it: the table comes out with every row it can
measure here, "n/a (no CUDA)" in the others, and one broken or late section costs no other row.

The smallest shapes (`--scale tiny`) keep it to seconds; the models are still built, saved and
loaded through the bot's Engine, and every timing goes through a real generate().
"""

from __future__ import annotations

import re

import pytest

from bench import gpu_bench, gpu_sections
from bench.gpu_sections import Bench, Row
from bot.cli import main as cli_main


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
    assert re.fullmatch(r"\d+\.\d\d s", rows["model switch back (RAM tier)"])
    assert re.fullmatch(r"\d+\.\d\d s", rows["model switch back (from disk)"])
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
