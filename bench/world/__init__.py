"""A small synthetic world where every fidelity is exact: shapes x colours x backgrounds x positions.

Images are 32x32 (a 64x64 world trained too slowly on two cores): one flat-coloured object
(circle, square, triangle, star) of one of five colours, centred left, middle or right, on a flat
background of one of four colours, with a template caption that names the position first ("on the
left, a red star on a white background"). The prior's text encoders are random and causal, so a
word said last is mixed into its context: a position named last moved the embeddings less than
half as much as a colour named early, and the prior ignored it (the same image for all three
positions). Some (shape, colour) pairs are held out of the prior's training set, so the prior's
accuracy on them measures composition, not memory.

The personalisation targets lie outside that world: the subject is a tall diamond (a shape the
prior never saw) split into two tones, and the style is diagonal stripes on the background. The detectors
in `detect` read the renderer's own rules back from the pixels.

Everything is deterministic from a seed (`random.Random`), and this package needs only numpy and
Pillow, so tests and `bench/quality.py` import it with `bench/` on `sys.path`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
RADIUS = 6  # half the object's size in pixels
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 215, 40),
           "purple": (150, 60, 190)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "pink": (250, 170, 200), "brown": (130, 85, 45)}
POSITIONS = {"left": 8, "middle": 16, "right": 24}  # the object's centre x; y is the middle
POSITION_WORDS = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
# One held-out colour per shape (a Latin square): each shape and each colour is seen, never together.
HELD_OUT = (("circle", "red"), ("square", "green"), ("triangle", "blue"), ("star", "yellow"))

SUBJECT_SHAPE = "diamond"
SUBJECT_TONES = ("orange", "cyan")  # top half, bottom half
EXTRA_COLOURS = {"orange": (245, 140, 30), "cyan": (40, 210, 220)}
STYLE_STRIPE = (90, 90, 90)  # the style: dark diagonal stripes over the background
WORDS = tuple(
    "a an the of on in at with and photo picture left right middle background style stripe stripes "
    "diamond shape object toy obj".split()
) + SHAPES + tuple(COLOURS) + tuple(BACKGROUNDS) + tuple(EXTRA_COLOURS)
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS, **BACKGROUNDS}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # one colour name, or "subject" for the two-tone diamond
    background: str
    position: str
    dx: int = 0  # small jitter of the object's centre, pixels
    dy: int = 0
    stripes: bool = False  # the style

    def caption(self, token: str | None = None) -> str:
        thing = token if token else f"{self.colour} {self.shape}"
        text = f"{POSITION_WORDS[self.position]}, a {thing} on a {self.background} background"
        return text + (", in stripe style" if self.stripes else "")


def world_hash(extra: dict | None = None) -> str:
    """A hash of everything that defines the world (palettes, sizes, held-out pairs) plus `extra`."""
    spec = dict(size=SIZE, radius=RADIUS, shapes=SHAPES, colours=COLOURS, backgrounds=BACKGROUNDS,
                positions=POSITIONS, caption=Scene("star", "red", "white", "left").caption(), held_out=HELD_OUT,
                subject=(SUBJECT_SHAPE, SUBJECT_TONES), extra=extra or {})
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.9
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r * 1.5), (cx + r, cy), (cx, cy + r * 1.5), (cx - r, cy)]  # tall: a codec rounds a square one
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r * 1.15 if k % 2 == 0 else r * 0.5
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(shape)


def shape_mask(shape: str, cx: float, cy: float, r: float = RADIUS) -> np.ndarray:
    """The boolean pixel mask of one shape (what the renderer fills)."""
    im = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=255)
    return np.asarray(im) > 127


def render(scene: Scene) -> Image.Image:
    arr = np.empty((SIZE, SIZE, 3), np.uint8)
    arr[:] = BACKGROUNDS[scene.background]
    if scene.stripes:
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        arr[((xx + yy) // 3) % 2 == 0] = STYLE_STRIPE
    cx, cy = POSITIONS[scene.position] + scene.dx, SIZE // 2 + scene.dy
    mask = shape_mask(scene.shape, cx, cy)
    if scene.colour == "subject":
        top = np.zeros_like(mask)
        top[: int(cy)] = True
        arr[mask & top] = EXTRA_COLOURS[SUBJECT_TONES[0]]
        arr[mask & ~top] = EXTRA_COLOURS[SUBJECT_TONES[1]]
    else:
        arr[mask] = ALL_COLOURS[scene.colour]
    return Image.fromarray(arr)


def all_scenes(held_out: bool) -> list[Scene]:
    """Every (shape, colour, background, position) of the prior's world, the held-out pairs or the rest."""
    out = []
    for shape in SHAPES:
        for colour in COLOURS:
            if ((shape, colour) in HELD_OUT) != held_out:
                continue
            for bg in BACKGROUNDS:
                for pos in POSITIONS:
                    out.append(Scene(shape, colour, bg, pos))
    return out


def jitter(scene: Scene, rng: random.Random, amount: int = 1) -> Scene:
    return replace(scene, dx=rng.randint(-amount, amount), dy=rng.randint(-amount, amount))


def training_scenes(n: int, seed: int) -> list[Scene]:
    """`n` jittered scenes of the prior's training set (the held-out pairs never appear)."""
    rng = random.Random(seed)
    pool = all_scenes(held_out=False)
    return [jitter(rng.choice(pool), rng) for _ in range(n)]


def autoencoder_scenes(n: int, seed: int) -> list[Scene]:
    """Generic scenes for the VAE: any shape (the diamond too), any colour or the two-tone, stripes
    or not. The VAE is a generic image codec; only the UNet's prior is kept to the world."""
    rng = random.Random(seed)
    shapes = SHAPES + (SUBJECT_SHAPE,)
    colours = tuple(COLOURS) + tuple(EXTRA_COLOURS) + ("subject",)
    return [jitter(Scene(rng.choice(shapes), rng.choice(colours), rng.choice(tuple(BACKGROUNDS)),
                         rng.choice(tuple(POSITIONS)), stripes=rng.random() < 0.3), rng, amount=2) for _ in range(n)]


SUBJECT_TRAIN = (("white", "left"), ("black", "right"), ("pink", "middle"), ("white", "right"), ("black", "left"))
SUBJECT_NOVEL = (("brown", "left"), ("brown", "right"), ("pink", "left"), ("pink", "right"), ("brown", "middle"),
                 ("white", "middle"))


def subject_scenes() -> list[Scene]:
    """The subject's training images: the two-tone diamond on a few backgrounds and positions."""
    rng = random.Random(1234)
    return [jitter(Scene(SUBJECT_SHAPE, "subject", bg, pos), rng) for bg, pos in SUBJECT_TRAIN]


def style_scene() -> Scene:
    """The style's one image: a blue circle on a white background with stripes."""
    return Scene("circle", "blue", "white", "middle", stripes=True)


def write_folder(folder: Path, scenes: Iterable[Scene], token: str | None = None) -> Path:
    """Images + same-name .txt captions (the engine's folder format)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes):
        render(s).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(s.caption(token) + "\n", encoding="utf-8")
    return folder


def scene_dict(s: Scene) -> dict:
    return asdict(s)
