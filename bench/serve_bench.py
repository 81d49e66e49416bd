"""Placeholder: `sdbot bench serve` (being written)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    print("sdbot bench serve: not written yet")
    return 1
