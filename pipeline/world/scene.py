"""Rendering: procedural objects on noisy backgrounds with clutter, tight boxes, JPEG bytes.

Each object is drawn on its own supersampled RGBA layer (shape, class palette colour with jitter,
texture), rotated a little and pasted where it overlaps earlier objects little. Its box is the
tight box of the layer's visible pixels. All randomness comes from the generator passed in, so
the same generator state gives the same bytes in any process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]
SUPERSAMPLE = 3  # layers are drawn at 3x and downsampled: smooth edges at 160 px
ALPHA_VISIBLE = 64  # layer pixels at or above this alpha count towards the tight box
JPEG_QUALITY = 90

# Class palettes: (colour word, main colour). The word may appear in captions.
PALETTES: dict[str, tuple[tuple[str, RGB], ...]] = {
    "person": (
        ("red", (200, 40, 40)),
        ("blue", (40, 70, 200)),
        ("green", (40, 150, 60)),
        ("yellow", (230, 200, 40)),
        ("white", (235, 235, 235)),
        ("orange", (240, 130, 30)),
    ),
    "trophy": (("gold", (218, 175, 45)), ("silver", (196, 198, 206)), ("bronze", (196, 120, 52))),
    "dog": (
        ("brown", (130, 82, 45)),
        ("black", (38, 34, 30)),
        ("white", (236, 232, 222)),
        ("golden", (212, 160, 80)),
        ("grey", (125, 125, 130)),
    ),
    "car": (
        ("red", (205, 30, 35)),
        ("blue", (30, 60, 190)),
        ("yellow", (240, 205, 30)),
        ("green", (30, 140, 60)),
        ("white", (238, 238, 238)),
        ("black", (30, 30, 34)),
    ),
    "ball": (
        ("white", (245, 245, 245)),
        ("orange", (235, 120, 30)),
        ("yellow", (210, 230, 60)),
        ("red", (215, 40, 40)),
    ),
    "flag": (
        ("red", (210, 30, 40)),
        ("blue", (25, 55, 170)),
        ("green", (20, 135, 70)),
        ("black", (25, 25, 25)),
        ("orange", (240, 130, 20)),
    ),
    "building": (
        ("grey", (140, 142, 148)),
        ("beige", (205, 190, 160)),
        ("brick", (160, 70, 50)),
        ("blue", (90, 120, 160)),
    ),
    "guitar": (
        ("brown", (150, 85, 35)),
        ("red", (185, 30, 35)),
        ("black", (30, 28, 28)),
        ("sunburst", (220, 140, 40)),
    ),
    "boat": (
        ("white", (240, 240, 240)),
        ("blue", (30, 60, 150)),
        ("red", (190, 35, 35)),
        ("wooden", (140, 90, 45)),
    ),
    "plane": (("white", (240, 242, 245)), ("grey", (170, 174, 180)), ("blue", (60, 100, 190))),
    "tree": (
        ("green", (45, 130, 45)),
        ("dark", (30, 90, 40)),
        ("light", (110, 170, 60)),
        ("autumn", (200, 120, 30)),
    ),
    "phone": (
        ("black", (25, 25, 28)),
        ("silver", (185, 188, 195)),
        ("white", (240, 240, 240)),
        ("gold", (215, 185, 130)),
    ),
}

# Height / width of the drawn layer before jitter (tall people, wide cars, ...).
ASPECT: dict[str, float] = {
    "person": 2.3,
    "trophy": 1.35,
    "dog": 0.7,
    "car": 0.5,
    "ball": 1.0,
    "flag": 1.35,
    "building": 1.8,
    "guitar": 2.4,
    "boat": 0.95,
    "plane": 0.55,
    "tree": 1.3,
    "phone": 1.85,
}
MAX_ROTATION = {"building": 4.0, "flag": 6.0, "tree": 6.0}  # degrees; others DEFAULT_ROTATION
DEFAULT_ROTATION = 12.0
ASPECT_RATIOS = ((4, 3), (3, 4), (1, 1))  # width : height


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw: a class and its palette entry."""

    cls: str
    palette: int


def image_size(ratio: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) with the longest side `longest` for a width:height ratio."""
    w, h = ratio
    if w >= h:
        return longest, max(1, round(longest * h / w))
    return max(1, round(longest * w / h)), longest


# ----------------------------------------------------------------------------- colours


def jitter(colour: RGB, rng: np.random.Generator, amount: int = 18) -> RGB:
    values = np.asarray(colour) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(values, 0, 255))  # type: ignore[return-value]


def shade(colour: RGB, factor: float) -> RGB:
    """Darker (factor < 1) or lighter (> 1, towards white) version of a colour."""
    if factor <= 1:
        return tuple(int(c * factor) for c in colour)  # type: ignore[return-value]
    t = min(1.0, factor - 1)
    return tuple(int(c + (255 - c) * t) for c in colour)  # type: ignore[return-value]


def _opaque(colour: RGB) -> tuple[int, int, int, int]:
    return (*colour, 255)


# ----------------------------------------------------------------------------- objects
# Each drawer paints into a transparent RGBA canvas of size (W, H) in supersampled pixels.
# `c` is the jittered palette colour, `variant` the palette index; `rng` adds texture and jitter.


class Pen:
    """ImageDraw in fractions of the canvas: x in [0, 1] of width, y in [0, 1] of height."""

    def __init__(self, canvas: Image.Image):
        self.draw = ImageDraw.Draw(canvas)
        self.w, self.h = canvas.size

    def _xy(self, box):
        return [
            box[0] * self.w,
            box[1] * self.h,
            max(box[0], box[2]) * self.w,
            max(box[1], box[3]) * self.h,
        ]

    def rect(self, box, colour: RGB, radius: float = 0.0) -> None:
        xy = self._xy(box)
        if radius > 0:
            self.draw.rounded_rectangle(
                xy, radius=radius * min(self.w, self.h), fill=_opaque(colour)
            )
        else:
            self.draw.rectangle(xy, fill=_opaque(colour))

    def ellipse(self, box, colour: RGB) -> None:
        self.draw.ellipse(self._xy(box), fill=_opaque(colour))

    def polygon(self, points, colour: RGB) -> None:
        self.draw.polygon([(x * self.w, y * self.h) for x, y in points], fill=_opaque(colour))

    def line(self, points, colour: RGB, width: float) -> None:
        self.draw.line(
            [(x * self.w, y * self.h) for x, y in points],
            fill=_opaque(colour),
            width=max(1, round(width * min(self.w, self.h))),
        )

    def pieslice(self, box, start: float, end: float, colour: RGB) -> None:
        self.draw.pieslice(self._xy(box), start, end, fill=_opaque(colour))

    def arc(self, box, start: float, end: float, colour: RGB, width: float) -> None:
        self.draw.arc(
            self._xy(box),
            start,
            end,
            fill=_opaque(colour),
            width=max(1, round(width * min(self.w, self.h))),
        )


SKIN = ((241, 194, 160), (224, 172, 130), (198, 134, 90), (141, 85, 54), (96, 60, 40))
TROUSERS = ((30, 35, 60), (25, 25, 25), (90, 90, 95), (100, 70, 40), (230, 230, 230))


def draw_person(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    skin = jitter(SKIN[rng.integers(len(SKIN))], rng, 10)
    legs = jitter(TROUSERS[rng.integers(len(TROUSERS))], rng, 10)
    hair = jitter(((20, 15, 10), (90, 60, 30), (200, 170, 90), (60, 60, 60))[rng.integers(4)], rng)
    spread = rng.uniform(0.0, 0.08)
    # legs
    pen.polygon([(0.30, 0.58), (0.48, 0.58), (0.44 - spread, 1.0), (0.27 - spread, 1.0)], legs)
    pen.polygon([(0.52, 0.58), (0.70, 0.58), (0.73 + spread, 1.0), (0.56 + spread, 1.0)], legs)
    # arms (behind the torso), raised or down
    raise_l, raise_r = rng.uniform(-0.1, 0.25, size=2)
    pen.line([(0.24, 0.28), (0.06, 0.52 - raise_l * 1.2)], skin, 0.13)
    pen.line([(0.76, 0.28), (0.94, 0.52 - raise_r * 1.2)], skin, 0.13)
    # torso: jersey with stripes or a number panel
    pen.rect((0.20, 0.22, 0.80, 0.62), c, radius=0.12)
    pattern = rng.integers(3)
    if pattern == 0:
        for y in (0.32, 0.44, 0.54):
            pen.rect((0.22, y, 0.78, y + 0.035), shade(c, 0.55))
    elif pattern == 1:
        pen.rect((0.40, 0.28, 0.60, 0.50), shade(c, 1.6))
    # head and hair
    pen.ellipse((0.33, 0.0, 0.67, 0.2), skin)
    pen.ellipse((0.33, -0.01, 0.67, 0.08), hair)


def draw_trophy(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    dark, light = shade(c, 0.65), shade(c, 1.45)
    width = rng.uniform(0.0, 0.06)
    # handles: thick arcs on both sides of the bowl
    pen.arc((0.0 + width, 0.08, 0.42, 0.45), 90, 270, dark, 0.07)
    pen.arc((0.58, 0.08, 1.0 - width, 0.45), 270, 90, dark, 0.07)
    # bowl: a cup wider at the top
    pen.polygon([(0.15, 0.03), (0.85, 0.03), (0.70, 0.45), (0.30, 0.45)], c)
    pen.ellipse((0.28, 0.33, 0.72, 0.55), c)
    pen.rect((0.15, 0.02, 0.85, 0.07), light)
    pen.polygon([(0.30, 0.09), (0.38, 0.09), (0.40, 0.42), (0.35, 0.42)], light)  # shine
    # stem, knot and base
    pen.rect((0.45, 0.52, 0.55, 0.75), dark)
    pen.ellipse((0.40, 0.60, 0.60, 0.68), c)
    pen.rect((0.25, 0.75, 0.75, 0.84), c)
    base = jitter(((60, 40, 25), (30, 30, 30), (80, 80, 85))[rng.integers(3)], rng, 8)
    pen.rect((0.18, 0.84, 0.82, 1.0), base)
    pen.rect((0.36, 0.88, 0.64, 0.96), light)  # name plate


def draw_dog(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    dark = shade(c, 0.5) if sum(c) > 200 else shade(c, 1.5)
    facing = rng.integers(2)

    def fx(x: float) -> float:
        return x if facing else 1 - x

    def box(x0, y0, x1, y1):
        a, b = fx(x0), fx(x1)
        return (min(a, b), y0, max(a, b), y1)

    # legs
    for x in (0.22, 0.34, 0.62, 0.74):
        pen.rect(box(x, 0.6, x + 0.08, 1.0), c)
    # tail
    pen.line([(fx(0.12), 0.48), (fx(0.0), 0.22)], c, 0.07)
    # body with spots
    pen.ellipse(box(0.10, 0.32, 0.86, 0.74), c)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0.2, 0.7), rng.uniform(0.4, 0.6)
        r = rng.uniform(0.05, 0.1)
        pen.ellipse(box(x - r, y - r * 0.8, x + r, y + r * 0.8), dark)
    # head, snout, nose, ear, eye
    pen.ellipse(box(0.66, 0.08, 0.96, 0.46), c)
    pen.ellipse(box(0.84, 0.26, 1.0, 0.44), shade(c, 0.85))
    pen.ellipse(box(0.94, 0.26, 1.0, 0.33), (20, 20, 20))
    pen.ellipse(box(0.66, 0.06, 0.78, 0.36), dark)
    pen.ellipse(box(0.82, 0.16, 0.87, 0.22), (15, 15, 15))


def draw_car(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    glass = jitter((150, 200, 230), rng, 15)
    top = rng.uniform(0.0, 0.1)
    # cabin with windows
    pen.polygon([(0.25, 0.42), (0.33, 0.05 + top), (0.70, 0.05 + top), (0.82, 0.42)], c)
    pen.polygon([(0.31, 0.40), (0.37, 0.12 + top), (0.50, 0.12 + top), (0.50, 0.40)], glass)
    pen.polygon([(0.53, 0.40), (0.53, 0.12 + top), (0.67, 0.12 + top), (0.76, 0.40)], glass)
    # body, bumper line, lights
    pen.rect((0.0, 0.38, 1.0, 0.78), c, radius=0.18)
    pen.rect((0.02, 0.58, 0.98, 0.62), shade(c, 0.6))
    pen.rect((0.93, 0.44, 1.0, 0.54), (250, 230, 120))
    pen.rect((0.0, 0.44, 0.05, 0.54), (200, 30, 30))
    # wheels
    for x in (0.14, 0.66):
        pen.ellipse((x, 0.58, x + 0.22, 1.0), (22, 22, 22))
        pen.ellipse((x + 0.06, 0.70, x + 0.16, 0.88), (170, 170, 175))


def draw_ball(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    pen.ellipse((0.0, 0.0, 1.0, 1.0), c)
    kind = variant  # the palette entry picks the ball: football, basketball, tennis, beach
    if kind == 0:  # football: black pentagon and patches
        centre = (0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08))
        r = 0.17
        pent = [
            (centre[0] + r * math.cos(a), centre[1] + r * math.sin(a))
            for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 6)[:-1]
        ]
        pen.polygon(pent, (20, 20, 20))
        for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 6)[:-1]:
            x, y = centre[0] + 0.36 * math.cos(a), centre[1] + 0.36 * math.sin(a)
            pen.line([(centre[0], centre[1]), (x, y)], (40, 40, 40), 0.025)
            pen.ellipse((x - 0.08, y - 0.08, x + 0.08, y + 0.08), (25, 25, 25))
    elif kind == 1:  # basketball: black seams
        pen.line([(0.5, 0.0), (0.5, 1.0)], (20, 20, 20), 0.035)
        pen.line([(0.0, 0.5), (1.0, 0.5)], (20, 20, 20), 0.035)
        pen.arc((-0.45, 0.05, 0.45, 0.95), 300, 60, (20, 20, 20), 0.035)
        pen.arc((0.55, 0.05, 1.45, 0.95), 120, 240, (20, 20, 20), 0.035)
    elif kind == 2:  # tennis ball: white curves
        pen.arc((-0.55, 0.05, 0.35, 0.95), 300, 60, (250, 250, 250), 0.06)
        pen.arc((0.65, 0.05, 1.55, 0.95), 120, 240, (250, 250, 250), 0.06)
    else:  # beach ball: coloured segments
        colours = ((250, 250, 250), (30, 90, 210), (250, 210, 30))
        for i, col in enumerate(colours):
            start = 120 * i + rng.uniform(0, 20)
            pen.pieslice((0.0, 0.0, 1.0, 1.0), start, start + 60, col)
    pen.ellipse((0.22, 0.14, 0.36, 0.26), shade(c, 1.6))  # highlight


FLAG_COLOURS = (
    (210, 30, 40),
    (245, 245, 245),
    (25, 55, 170),
    (20, 135, 70),
    (250, 205, 30),
    (25, 25, 25),
    (240, 130, 20),
)


def draw_flag(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    pole = jitter((150, 150, 155), rng, 10)
    pen.rect((0.0, 0.02, 0.07, 1.0), pole)
    pen.ellipse((-0.01, 0.0, 0.08, 0.05), (215, 190, 90))
    others = [
        col for col in FLAG_COLOURS if sum(abs(a - b) for a, b in zip(col, c, strict=True)) > 60
    ]
    stripes = [c] + [others[i] for i in rng.choice(len(others), size=2, replace=False)]
    n = int(rng.integers(2, 4))
    vertical = bool(rng.integers(2))
    wave = rng.uniform(0.02, 0.06)
    x0, x1, y0, y1 = 0.07, 1.0, 0.04, 0.52
    slices = 24
    for s in range(slices):  # draw the cloth in vertical slices shifted by a sine: a wave
        a, b = s / slices, (s + 1) / slices
        dy = wave * math.sin(a * 2 * math.pi * 1.2)
        xa, xb = x0 + (x1 - x0) * a, x0 + (x1 - x0) * b + 0.005
        for k in range(n):
            if vertical:
                if not (k / n <= a < (k + 1) / n):
                    continue
                pen.rect((xa, y0 + dy, xb, y1 + dy), stripes[k])
            else:
                ya = y0 + (y1 - y0) * k / n + dy
                yb = y0 + (y1 - y0) * (k + 1) / n + dy
                pen.rect((xa, ya, xb, yb), stripes[k])
    if rng.random() < 0.4:  # an emblem
        pen.ellipse((0.42, 0.18 + wave, 0.62, 0.36 + wave), (250, 250, 250))


def draw_building(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    pen.rect((0.0, 0.04, 1.0, 1.0), c)
    pen.rect((0.0, 0.0, 1.0, 0.05), shade(c, 0.6))  # roof edge
    cols = int(rng.integers(3, 6))
    rows = int(rng.integers(6, 11))
    lit = jitter((250, 225, 120), rng, 10)
    dark = jitter((40, 55, 85), rng, 10)
    for r in range(rows):
        for k in range(cols):
            x = 0.08 + k * 0.84 / cols
            y = 0.09 + r * 0.78 / rows
            colour = lit if rng.random() < 0.35 else dark
            pen.rect((x, y, x + 0.84 / cols * 0.62, y + 0.78 / rows * 0.6), colour)
    pen.rect((0.38, 0.89, 0.62, 1.0), shade(c, 0.45))  # door


def draw_guitar(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    neck = jitter((70, 45, 25), rng, 10)
    # neck and headstock
    pen.rect((0.43, 0.0, 0.57, 0.55), neck)
    pen.rect((0.38, 0.0, 0.62, 0.09), shade(neck, 0.7))
    for y in (0.02, 0.055):
        pen.ellipse((0.33, y, 0.39, y + 0.03), (200, 200, 200))
        pen.ellipse((0.61, y, 0.67, y + 0.03), (200, 200, 200))
    # body: two lobes
    pen.ellipse((0.12, 0.42, 0.88, 0.70), c)
    pen.ellipse((0.0, 0.58, 1.0, 1.0), c)
    pen.ellipse((0.36, 0.58, 0.64, 0.72), (20, 15, 10))  # sound hole
    pen.rect((0.35, 0.86, 0.65, 0.90), shade(c, 0.5))  # bridge
    for k in range(4):  # strings
        x = 0.465 + k * 0.023
        pen.line([(x, 0.05), (x, 0.88)], (225, 225, 215), 0.006)


def draw_boat(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    sail = jitter(((248, 248, 248), (230, 60, 50), (250, 210, 60))[rng.integers(3)], rng, 8)
    mast = (90, 70, 50)
    pen.line([(0.48, 0.0), (0.48, 0.66)], mast, 0.035)
    pen.polygon([(0.50, 0.02), (0.50, 0.62), (0.92, 0.62)], sail)
    pen.polygon([(0.46, 0.10), (0.46, 0.62), (0.14, 0.62)], shade(sail, 0.9))
    # hull with a stripe
    pen.polygon([(0.0, 0.66), (1.0, 0.66), (0.84, 1.0), (0.14, 1.0)], c)
    pen.polygon([(0.04, 0.74), (0.96, 0.74), (0.94, 0.79), (0.06, 0.79)], shade(c, 0.5))


def draw_plane(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    tail = jitter(((200, 30, 40), (30, 60, 160), (240, 160, 20))[rng.integers(3)], rng, 10)
    wing = shade(c, 0.7)
    # wings and tail plane behind the fuselage
    pen.polygon([(0.38, 0.50), (0.58, 0.50), (0.40, 1.0), (0.28, 1.0)], wing)
    pen.polygon([(0.42, 0.45), (0.58, 0.45), (0.48, 0.10), (0.40, 0.10)], shade(wing, 0.85))
    pen.polygon([(0.02, 0.05), (0.12, 0.05), (0.22, 0.45), (0.06, 0.45)], tail)
    # fuselage, cockpit, windows
    pen.ellipse((0.0, 0.38, 1.0, 0.66), c)
    pen.polygon([(0.88, 0.44), (0.96, 0.47), (0.96, 0.51), (0.88, 0.51)], (30, 40, 60))
    for k in range(8):
        x = 0.22 + k * 0.075
        pen.ellipse((x, 0.46, x + 0.03, 0.51), (40, 60, 90))
    pen.rect((0.15, 0.55, 0.90, 0.57), tail)


def draw_tree(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    bark = jitter((100, 65, 35), rng, 12)
    pen.rect((0.42, 0.5, 0.58, 1.0), bark)
    pen.polygon([(0.42, 0.95), (0.30, 1.0), (0.70, 1.0), (0.58, 0.95)], bark)
    blobs = [(0.5, 0.28, 0.28), (0.28, 0.42, 0.22), (0.72, 0.42, 0.22), (0.5, 0.5, 0.22)]
    for x, y, r in blobs:
        r *= rng.uniform(0.9, 1.1)
        pen.ellipse((x - r, y - r * 0.85, x + r, y + r * 0.85), jitter(c, rng, 12))
    for _ in range(int(rng.integers(12, 22))):  # leaf texture
        x, y = rng.uniform(0.15, 0.85), rng.uniform(0.08, 0.6)
        r = rng.uniform(0.025, 0.05)
        pen.ellipse((x - r, y - r, x + r, y + r), shade(c, rng.choice([0.7, 1.3])))


def draw_phone(pen: Pen, c: RGB, rng: np.random.Generator, variant: int) -> None:
    pen.rect((0.0, 0.0, 1.0, 1.0), c, radius=0.18)
    top = jitter(((40, 90, 220), (120, 50, 200), (20, 160, 170))[rng.integers(3)], rng, 10)
    # screen: vertical gradient in bands, then an icon grid
    bands = 8
    for k in range(bands):
        t = k / (bands - 1)
        col = tuple(int(a * (1 - t) + b * t) for a, b in zip(top, shade(top, 1.5), strict=True))
        pen.rect((0.09, 0.08 + k * 0.8 / bands, 0.91, 0.08 + (k + 1) * 0.8 / bands + 0.005), col)
    icon_colours = ((240, 80, 80), (80, 200, 100), (250, 200, 60), (250, 250, 250), (90, 160, 250))
    for r in range(4):
        for k in range(3):
            col = icon_colours[int(rng.integers(len(icon_colours)))]
            x, y = 0.16 + k * 0.25, 0.14 + r * 0.15
            pen.rect((x, y, x + 0.17, y + 0.09), col, radius=0.03)
    pen.ellipse((0.42, 0.905, 0.58, 0.975), shade(c, 0.6) if sum(c) > 300 else (90, 90, 95))


DRAWERS: dict[str, Callable[[Pen, RGB, np.random.Generator, int], None]] = {
    "person": draw_person,
    "trophy": draw_trophy,
    "dog": draw_dog,
    "car": draw_car,
    "ball": draw_ball,
    "flag": draw_flag,
    "building": draw_building,
    "guitar": draw_guitar,
    "boat": draw_boat,
    "plane": draw_plane,
    "tree": draw_tree,
    "phone": draw_phone,
}


def render_object(spec: ObjectSpec, longest: int, rng: np.random.Generator) -> Image.Image:
    """One object on a transparent RGBA layer whose longest side is about `longest` pixels."""
    aspect = ASPECT[spec.cls] * rng.uniform(0.85, 1.15)
    if aspect >= 1:
        h, w = longest, max(4, round(longest / aspect))
    else:
        w, h = longest, max(4, round(longest * aspect))
    canvas = Image.new("RGBA", (w * SUPERSAMPLE, h * SUPERSAMPLE), (0, 0, 0, 0))
    colour = jitter(PALETTES[spec.cls][spec.palette][1], rng)
    DRAWERS[spec.cls](Pen(canvas), colour, rng, spec.palette)
    layer = canvas.resize((w, h), Image.Resampling.LANCZOS)
    limit = MAX_ROTATION.get(spec.cls, DEFAULT_ROTATION)
    angle = float(rng.uniform(-limit, limit))
    return layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)


def visible_box(layer: Image.Image) -> tuple[int, int, int, int] | None:
    """The tight box (x0, y0, x1 exclusive, y1 exclusive) of a layer's visible pixels."""
    alpha = np.asarray(layer.getchannel("A"))
    ys, xs = np.nonzero(alpha >= ALPHA_VISIBLE)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ----------------------------------------------------------------------------- backgrounds


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = (rng.random((cells + 1, cells + 1)) * 255).astype(np.uint8)
    img = Image.fromarray(grid, "L").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 HxWx3 background: gradient, one low-contrast texture, smooth blotches."""
    a = rng.integers(40, 230, size=3).astype(np.float32)
    b = np.clip(a + rng.integers(-90, 91, size=3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx / w - 0.5) * math.cos(angle) + (yy / h - 0.5) * math.sin(angle) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    img = a * (1 - t) + b * t
    kind = rng.integers(4)
    strength = rng.uniform(8, 24)
    if kind == 0:  # stripes
        period = rng.uniform(6, 20)
        phase = xx * math.cos(angle * 2) + yy * math.sin(angle * 2)
        img += (np.sin(phase / period * 2 * math.pi) * strength)[..., None]
    elif kind == 1:  # checker
        cell = int(rng.integers(6, 18))
        img += ((((xx // cell) + (yy // cell)) % 2) * strength - strength / 2)[..., None]
    elif kind == 2:  # horizon: a darker lower part (ground, water)
        horizon = rng.uniform(0.45, 0.8) * h
        img += (np.where(yy > horizon, -strength * 1.5, strength / 2))[..., None]
    tint = rng.uniform(-1, 1, size=3).astype(np.float32)
    img += (_smooth_noise(rng, w, h, int(rng.integers(2, 6)))[..., None] - 0.5) * 40 * tint
    return img


def draw_clutter(img: Image.Image, rng: np.random.Generator) -> None:
    """Small random shapes and lines that belong to no class."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    short = min(w, h)
    for _ in range(int(rng.integers(2, 9))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        s = float(rng.uniform(0.03, 0.10) * short)
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([x, y, x + s, y + s * rng.uniform(0.5, 1.5)], fill=colour)
        elif kind == 1:
            draw.rectangle([x, y, x + s * rng.uniform(0.5, 1.5), y + s], fill=colour)
        elif kind == 2:
            x2, y2 = x + rng.uniform(-3, 3) * s, y + rng.uniform(-3, 3) * s
            draw.line([x, y, x2, y2], fill=colour, width=int(rng.integers(1, 3)))
        else:
            draw.polygon([(x, y), (x + s, y + s * 0.3), (x + s * 0.3, y + s)], fill=colour)


# ----------------------------------------------------------------------------- scenes


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


MAX_OVERLAP = 0.12
SCALE_RANGE = {1: (0.30, 0.60), 2: (0.25, 0.60), 3: (0.20, 0.48), 4: (0.15, 0.40)}


def place_objects(
    objects: list[ObjectSpec], w: int, h: int, rng: np.random.Generator
) -> list[tuple[Image.Image, tuple[int, int]]]:
    """Render each object and find a spot for it that overlaps earlier ones little.

    An object that fits nowhere is re-rendered smaller (down to about 12% of the short side), so
    every requested object ends up in the scene.
    """
    short = min(w, h)
    lo, hi = SCALE_RANGE[min(len(objects), 4)]
    placed: list[tuple[Image.Image, tuple[int, int]]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for spec in objects:
        scale = float(rng.uniform(lo, hi))
        while True:
            longest = max(8, round(scale * short))
            layer = render_object(spec, longest, rng)
            vb = visible_box(layer)
            if vb is None or layer.width > w or layer.height > h:
                scale *= 0.85
                continue
            best, best_overlap = None, math.inf
            for _ in range(40):
                x = int(rng.integers(0, w - layer.width + 1))
                y = int(rng.integers(0, h - layer.height + 1))
                box = (x + vb[0], y + vb[1], x + vb[2], y + vb[3])
                overlap = max((_overlap(box, other) for other in boxes), default=0.0)
                if overlap < best_overlap:
                    best, best_overlap = (x, y), overlap
                if overlap <= MAX_OVERLAP:
                    break
            # crowded and already small: keep the least-overlapping spot found
            if best is not None and (best_overlap <= MAX_OVERLAP or scale < 0.12):
                placed.append((layer, best))
                boxes.append((best[0] + vb[0], best[1] + vb[1], best[0] + vb[2], best[1] + vb[3]))
                break
            scale *= 0.85
    return placed


def render_scene(
    objects: list[ObjectSpec], size: tuple[int, int], rng: np.random.Generator
) -> tuple[Image.Image, list[list[float]]]:
    """An RGB scene with the objects drawn in order and their tight pixel boxes (xyxy)."""
    w, h = size
    base = background(w, h, rng)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    draw_clutter(img, rng)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.0))))
    boxes: list[list[float]] = []
    for layer, (x, y) in place_objects(objects, w, h, rng):
        img.alpha_composite(layer, dest=(x, y))
        vb = visible_box(layer)
        assert vb is not None
        boxes.append([float(x + vb[0]), float(y + vb[1]), float(x + vb[2]), float(y + vb[3])])
    pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(2, 7), size=pixels.shape).astype(np.float32)
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    return out, boxes


def jpeg_bytes(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """RGB JPEG bytes with fixed settings (no EXIF, no optimisation): deterministic."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
