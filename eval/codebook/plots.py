"""The report's figures as PNGs, drawn with PIL only (no plotting library needed)."""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

W, H = 720, 400
MARGIN = dict(left=70, right=20, top=36, bottom=50)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
GREY = (160, 160, 160)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class _Axes:
    """A plotting rectangle with linear or log10 axes."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim, ylim, xlog=False, ylog=False, size=(W, H)):
        self.img = Image.new("RGB", size, "white")
        self.d = ImageDraw.Draw(self.img)
        self.w, self.h = size
        self.x0, self.x1 = MARGIN["left"], self.w - MARGIN["right"]
        self.y0, self.y1 = MARGIN["top"], self.h - MARGIN["bottom"]
        self.xlog, self.ylog = xlog, ylog
        self.xlim = tuple(math.log10(v) for v in xlim) if xlog else tuple(xlim)
        self.ylim = tuple(math.log10(v) for v in ylim) if ylog else tuple(ylim)
        if self.xlim[1] == self.xlim[0]:
            self.xlim = (self.xlim[0] - 0.5, self.xlim[1] + 0.5)
        if self.ylim[1] == self.ylim[0]:
            self.ylim = (self.ylim[0] - 0.5, self.ylim[1] + 0.5)
        f = _font(14)
        self.d.text((self.w // 2, 8), title, fill="black", font=f, anchor="ma")
        self.d.text(((self.x0 + self.x1) // 2, self.h - 18), xlabel, fill="black", font=_font(), anchor="ma")
        self.d.text((6, self.y0 - 18), ylabel, fill="black", font=_font())
        self.d.rectangle([self.x0, self.y0, self.x1, self.y1], outline="black")
        self._ticks()

    def px(self, x: float) -> float:
        v = math.log10(max(x, 1e-300)) if self.xlog else x
        return self.x0 + (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        v = math.log10(max(y, 1e-300)) if self.ylog else y
        return self.y1 - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * (self.y1 - self.y0)

    def _tick_values(self, lim, log):
        if log:
            return [10.0**e for e in range(math.ceil(lim[0] - 1e-9), math.floor(lim[1] + 1e-9) + 1)]
        span = lim[1] - lim[0]
        step = 10 ** math.floor(math.log10(span / 5)) if span > 0 else 1
        for m in (1, 2, 5, 10):
            if span / (step * m) <= 6:
                step *= m
                break
        start = math.ceil(lim[0] / step) * step
        return list(np.arange(start, lim[1] + step * 1e-6, step))

    @staticmethod
    def _fmt(v: float, log: bool) -> str:
        if log:
            return f"1e{int(round(math.log10(v)))}" if v < 0.01 or v >= 1e4 else f"{v:g}"
        return f"{v:.3g}"

    def _ticks(self):
        f = _font(11)
        for v in self._tick_values(self.xlim, self.xlog):
            x = self.px(v)
            self.d.line([x, self.y1, x, self.y1 + 4], fill="black")
            self.d.text((x, self.y1 + 6), self._fmt(v, self.xlog), fill="black", font=f, anchor="ma")
        for v in self._tick_values(self.ylim, self.ylog):
            y = self.py(v)
            self.d.line([self.x0 - 4, y, self.x0, y], fill="black")
            self.d.line([self.x0 + 1, y, self.x1 - 1, y], fill=(235, 235, 235))
            self.d.text((self.x0 - 6, y), self._fmt(v, self.ylog), fill="black", font=f, anchor="rm")

    def line(self, xs, ys, colour, width=2):
        pts = [(self.px(x), self.py(y)) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            self.d.line(pts, fill=colour, width=width)
        elif pts:
            self.d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)

    def legend(self, entries: Sequence[tuple[str, tuple]]):
        f = _font(11)
        self.d.rectangle([self.x1 - 176, self.y0 + 4, self.x1 - 4, self.y0 + 12 + 16 * len(entries)], fill="white", outline=GREY)
        for i, (name, colour) in enumerate(entries):
            y = self.y0 + 8 + 16 * i
            self.d.line([self.x1 - 170, y + 6, self.x1 - 150, y + 6], fill=colour, width=3)
            self.d.text((self.x1 - 145, y), name[:26], fill="black", font=f)


def sorted_usage(curves: Sequence[tuple[str, np.ndarray]], vocab_size: int) -> Image.Image:
    """Frequency of each code, sorted from most to least used, log-log; dead codes fall off the
    bottom. ``curves``: (name, counts) pairs, e.g. this report and a compared one."""
    series = []
    for name, counts in curves:
        p = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
        p = p / p.sum() if p.sum() else p
        series.append((name, p[p > 0]))
    lo = min((s.min() for _, s in series if s.size), default=1e-6)
    hi = max((s.max() for _, s in series if s.size), default=1.0)
    kmax = max([vocab_size] + [len(c) for _, c in curves])
    ax = _Axes("Code usage, sorted (log-log)", "rank", "frequency", (1, max(kmax, 2)), (lo / 2, min(1.0, hi * 2)), xlog=True, ylog=True)
    ax.line([1, kmax], [1.0 / vocab_size] * 2, GREY, width=1)
    for i, (_, p) in enumerate(series):
        ranks = np.arange(1, p.size + 1)
        step = max(1, p.size // 2000)
        ax.line(ranks[::step].tolist() + [int(ranks[-1])] if p.size else [], p[::step].tolist() + [float(p[-1])] if p.size else [], COLOURS[i % 4])
    ax.legend([(n, COLOURS[i % 4]) for i, (n, _) in enumerate(series)] + [("uniform 1/K", GREY)])
    return ax.img


def bars(title: str, xlabel: str, ylabel: str, labels: Sequence[str], values: Sequence[float], highlight: Sequence[int] = (),
         marks: Sequence[float] | None = None, legend: Sequence[tuple[str, tuple]] = ()) -> Image.Image:
    """Bars (``highlight``-ed ones in red), and an optional reference tick per bar (``marks``, black)."""
    n = max(1, len(values))
    top = max([float(v) for v in values] + [float(m) for m in (marks or [])] + [1e-9])
    ax = _Axes(title, xlabel, ylabel, (0, n), (0, top * (1.1 + 0.12 * len(legend))))
    ax.d.rectangle([0, ax.y1 + 1, ax.w, ax.y1 + 18], fill="white")  # numeric x ticks make no sense here
    bw = (ax.x1 - ax.x0) / n
    every = max(1, math.ceil(n / 16))
    f = _font(10)
    for i, v in enumerate(values):
        colour = COLOURS[1] if i in highlight else COLOURS[0]
        x = ax.x0 + i * bw
        ax.d.rectangle([x + bw * 0.1, ax.py(float(v)), x + bw * 0.9, ax.y1], fill=colour)
        if i % every == 0 and i < len(labels):
            ax.d.text((x + bw / 2, ax.y1 + 4), str(labels[i])[:10], fill="black", font=f, anchor="ma")
        if marks is not None and i < len(marks):
            ax.d.line([x, ax.py(float(marks[i])), x + bw, ax.py(float(marks[i]))], fill="black", width=2)
    if legend:
        ax.legend(legend)
    return ax.img


def heatmap(title: str, labels: Sequence[str], matrix: np.ndarray, cell: int = 28) -> Image.Image:
    """A C×C matrix in [0, 1], white (0) to dark blue (1), with row/column labels."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    cell = max(8, min(cell, 640 // max(n, 1)))
    pad_left, pad_top = 90, 40
    img = Image.new("RGB", (pad_left + n * cell + 20, pad_top + n * cell + 24), "white")
    d = ImageDraw.Draw(img)
    d.text((img.width // 2, 8), title, fill="black", font=_font(14), anchor="ma")
    f = _font(10)
    for i in range(n):
        d.text((pad_left - 4, pad_top + i * cell + cell // 2), str(labels[i])[:12], fill="black", font=f, anchor="rm")
        for j in range(n):
            v = float(np.clip(m[i, j], 0, 1))
            colour = tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))
            d.rectangle([pad_left + j * cell, pad_top + i * cell, pad_left + (j + 1) * cell - 1, pad_top + (i + 1) * cell - 1], fill=colour)
            if cell >= 26:
                d.text((pad_left + j * cell + cell // 2, pad_top + i * cell + cell // 2), f"{v:.2f}"[1:] if v < 1 else "1", fill="black" if v < 0.6 else "white", font=f, anchor="mm")
    for j in range(n):
        d.text((pad_left + j * cell + cell // 2, pad_top + n * cell + 4), str(labels[j])[:4], fill="black", font=f, anchor="ma")
    return img


def mosaic(rows: Sequence[tuple[str, Sequence[np.ndarray]]], per_row: int, cell: int = 40, title: str = "") -> Image.Image:
    """One row per code: a caption, then up to ``per_row`` image patches (upscaled, nearest)."""
    caption_w, gap = 200, 4
    top = 30 if title else 6
    img = Image.new("RGB", (caption_w + per_row * (cell + gap) + 6, top + max(1, len(rows)) * (cell + gap) + 6), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((img.width // 2, 6), title, fill="black", font=_font(14), anchor="ma")
    f = _font(11)
    for r, (caption, patches) in enumerate(rows):
        y = top + r * (cell + gap)
        if caption.startswith("--"):
            d.line([6, y + cell // 2, img.width - 6, y + cell // 2], fill=GREY)
            d.text((10, y + cell // 2), caption.strip("- "), fill="black", font=f, anchor="lm")
            continue
        d.text((6, y + cell // 2), caption, fill="black", font=f, anchor="lm")
        for c, patch in enumerate(list(patches)[:per_row]):
            tile = Image.fromarray(np.asarray(patch, dtype=np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            img.paste(tile, (caption_w + c * (cell + gap), y))
    return img
