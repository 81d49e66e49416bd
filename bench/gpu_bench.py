"""Placeholder: `sdbot bench gpu` (being written)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    print("sdbot bench gpu: not written yet")
    return 1
