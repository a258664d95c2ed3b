"""The loss curve as a PNG, drawn with PIL alone: raw loss faint, smoothed loss bold, epoch
boundaries as light vertical lines. Deterministic; any number of points (downsampled to one
column of pixels per bucket)."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

MARGIN_LEFT = 60
MARGIN_RIGHT = 16
MARGIN_TOP = 22
MARGIN_BOTTOM = 34
BACKGROUND = (255, 255, 255)
AXIS = (90, 90, 90)
GRID = (238, 238, 238)
EPOCH = (214, 222, 236)
RAW = (165, 195, 240)
SMOOTHED = (20, 75, 165)
TEXT = (50, 50, 50)
#: With this many points or more, the y range ignores the most extreme 0.5% of the raw losses
#: and of the smoothed ones at each end, so one early spike does not flatten the whole curve.
ROBUST_FROM = 200


def _series(history: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for item in history:
        step, value = item.get("step"), item.get(key)
        if isinstance(step, (int, float)) and isinstance(value, (int, float)) \
                and math.isfinite(value) and math.isfinite(step):
            steps.append(float(step))
            values.append(float(value))
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _range(values: np.ndarray) -> tuple[float, float]:
    """The y range a series asks for: without its most extreme 0.5% at each end from
    ROBUST_FROM points on (an early spike, raw or smoothed); (inf, -inf) for none."""
    if values.size >= ROBUST_FROM:
        low, high = np.quantile(values, [0.005, 0.995])
        return float(low), float(high)
    if values.size:
        return float(values.min()), float(values.max())
    return math.inf, -math.inf


def nice_ticks(low: float, high: float, count: int = 5, *, integer: bool = False,
               ) -> list[float]:
    """Round tick values covering [low, high], about `count` of them."""
    span = high - low
    if span <= 0:
        return [low]
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    multipliers = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * magnitude for m in multipliers if raw <= m * magnitude)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def _label(value: float, step: float) -> str:
    """`value` with as many decimals as the tick step needs."""
    decimals = 0
    while decimals < 8 and abs(round(step, decimals) - step) > abs(step) * 1e-6:
        decimals += 1
    if abs(value) < abs(step) * 1e-6:
        value = 0.0
    return f"{value:,.{decimals}f}"


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | Any) -> int:
    left, _top, right, _bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _buckets(xs: np.ndarray, ys: np.ndarray, x_pixels: np.ndarray, width: int,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel column that holds points: its x, and the min, max and mean of the values."""
    column = np.clip(np.floor(x_pixels).astype(np.int64), 0, width - 1)
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    counts = np.diff(np.r_[starts, len(column)])
    low = np.minimum.reduceat(ys, starts)
    high = np.maximum.reduceat(ys, starts)
    mean = np.add.reduceat(ys, starts) / counts
    return column[starts].astype(np.float64), low, high, mean


def loss_chart(history: list[dict[str, Any]], width: int = 800, height: int = 300,
               ) -> Image.Image:
    """A line chart of `history` entries ({"step", "epoch", "loss", "loss_smoothed"})."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top = MARGIN_LEFT, MARGIN_TOP
    right, bottom = width - MARGIN_RIGHT, height - MARGIN_BOTTOM
    plot_w, plot_h = max(right - left, 1), max(bottom - top, 1)

    raw_x, raw_y = _series(history, "loss")
    smooth_x, smooth_y = _series(history, "loss_smoothed")
    all_x = np.concatenate([raw_x, smooth_x])
    if all_x.size == 0:
        draw.rectangle((left, top, right, bottom), outline=AXIS)
        draw.text((left + 10, top + 10), "no loss recorded yet", fill=TEXT, font=font)
        return image

    x_lo, x_hi = float(all_x.min()), float(all_x.max())
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    (raw_lo, raw_hi), (smooth_lo, smooth_hi) = _range(raw_y), _range(smooth_y)
    y_lo, y_hi = min(raw_lo, smooth_lo), max(raw_hi, smooth_hi)
    flat = y_hi - y_lo <= 1e-12
    pad = (abs(y_hi) * 0.1 or 0.1) if flat else (y_hi - y_lo) * 0.05
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(x: np.ndarray | float) -> Any:
        return left + (np.asarray(x, dtype=np.float64) - x_lo) / (x_hi - x_lo) * (plot_w - 1)

    def py(y: np.ndarray | float) -> Any:
        clipped = np.clip(np.asarray(y, dtype=np.float64), y_lo, y_hi)
        return bottom - (clipped - y_lo) / (y_hi - y_lo) * (plot_h - 1)

    # grid, ticks and labels
    y_ticks = nice_ticks(y_lo, y_hi, 5)
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else abs(y_ticks[0]) or 1.0
    for value in y_ticks:
        y = float(py(value))
        draw.line((left, y, right, y), fill=GRID)
        text = _label(value, y_step)
        draw.text((left - 6 - _text_width(draw, text, font), y - 6), text, fill=TEXT, font=font)
    x_ticks = [t for t in nice_ticks(x_lo, x_hi, 6, integer=True) if x_lo <= t <= x_hi]
    for value in x_ticks:
        x = float(px(value))
        draw.line((x, bottom, x, bottom + 4), fill=AXIS)
        text = f"{int(value):,}"
        draw.text((x - _text_width(draw, text, font) / 2, bottom + 6), text, fill=TEXT, font=font)

    # epoch boundaries: before the first step of each new epoch
    epochs = [(item.get("step"), item.get("epoch")) for item in history
              if isinstance(item.get("step"), (int, float))
              and isinstance(item.get("epoch"), (int, float))]
    boundaries = [step for (_, before), (step, after) in itertools.pairwise(epochs)
                  if after != before]
    if len(boundaries) <= plot_w // 4:
        for step in boundaries:
            x = float(px(step - 0.5))
            draw.line((x, top, x, bottom - 1), fill=EPOCH)

    # the curves
    for xs, ys, colour, line_width in ((raw_x, raw_y, RAW, 1), (smooth_x, smooth_y, SMOOTHED, 2)):
        if xs.size == 0:
            continue
        if xs.size == 1:
            x, y = float(px(xs[0])), float(py(ys[0]))
            radius = line_width + 1
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
            continue
        x_pixels = px(xs) - left
        if xs.size > plot_w:
            columns, low, high, mean = _buckets(xs, ys, x_pixels, plot_w)
            columns = columns + left
            if colour == RAW:
                for x, y0, y1 in zip(columns, py(low), py(high), strict=True):
                    draw.line((float(x), float(y0), float(x), float(y1)), fill=colour)
            points = list(zip(columns.tolist(), py(mean).tolist(), strict=True))
        else:
            points = list(zip(px(xs).tolist(), py(ys).tolist(), strict=True))
        draw.line(points, fill=colour, width=line_width, joint="curve")

    # axes, titles, legend
    draw.line((left, top, left, bottom), fill=AXIS)
    draw.line((left, bottom, right, bottom), fill=AXIS)
    draw.text((left, 4), "loss", fill=TEXT, font=font)
    draw.text((right - _text_width(draw, "step", font), height - 14), "step", fill=TEXT,
              font=font)
    legend_x = right - 190
    draw.line((legend_x, 10, legend_x + 16, 10), fill=RAW, width=2)
    draw.text((legend_x + 20, 4), "loss", fill=TEXT, font=font)
    draw.line((legend_x + 70, 10, legend_x + 86, 10), fill=SMOOTHED, width=2)
    draw.text((legend_x + 90, 4), "smoothed", fill=TEXT, font=font)
    return image
