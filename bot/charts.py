"""Server-side charts for /stats, drawn with Pillow (no plotting stack to install)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

COLORS = {"txt2img": (88, 101, 242), "img2img": (87, 242, 135), "inpaint": (254, 231, 92)}
FALLBACK = (235, 69, 158)
BACKGROUND = (43, 45, 49)
AXIS = (148, 155, 164)
TEXT = (219, 222, 225)


def stacked_bars(
    days: Sequence[str],
    series: Mapping[str, Sequence[int]],
    *,
    title: str,
    size: tuple[int, int] = (800, 400),
) -> bytes:
    """PNG of one stacked bar per day, a segment per series (mode), with a legend."""
    width, height = size
    left, right, top, bottom = 48, 16, 40, 48
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 12), title, fill=TEXT, font=font)
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    peak = max([*totals, 1])
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.line((left, top, left, top + plot_h), fill=AXIS)
    draw.line((left, top + plot_h, left + plot_w, top + plot_h), fill=AXIS)
    for fraction in (0.5, 1.0):
        y = top + plot_h - int(plot_h * fraction)
        draw.text((4, y - 6), str(round(peak * fraction)), fill=AXIS, font=font)
    slot = plot_w / max(len(days), 1)
    bar = max(2, int(slot * 0.7))
    for i, day in enumerate(days):
        x0 = left + int(i * slot + (slot - bar) / 2)
        y = top + plot_h
        for name, values in series.items():
            h = int(plot_h * values[i] / peak)
            if h:
                draw.rectangle((x0, y - h, x0 + bar, y - 1), fill=COLORS.get(name, FALLBACK))
                y -= h
        if len(days) <= 14 or i % max(1, len(days) // 10) == 0:
            draw.text((x0, top + plot_h + 6), day[5:], fill=AXIS, font=font)
    x = left + plot_w - 90 * len(series)
    for name in series:
        draw.rectangle((x, 14, x + 10, 24), fill=COLORS.get(name, FALLBACK))
        draw.text((x + 14, 12), name, fill=TEXT, font=font)
        x += 90
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
