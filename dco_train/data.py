"""Training data: which images, which captions, and the latents the loop trains on.

Three sources are read:
- a folder of images with same-name `.txt` captions (the kohya convention);
- the reference `config.json` (`{name: {images, prompts, base_prompts?, inserting_tokens?,
  initializer_tokens?}}`), whose relative image paths are tried against the working directory,
  the config's folder and then each of its parent folders (the reference ran from its repo root);
- images held in memory with a caption each (`spec_from_images`: the ComfyUI node's IMAGE input).

Base prompts that are not given are derived from the token -> word map. Images are EXIF-rotated,
flattened onto white if they have alpha, resized to cover the target size and cropped, and the
SDXL size/crop conditioning is recorded. Latents are VAE-encoded once: the latent distribution's
mean and std are cached (and those of the mirrored image when flips are on), and the loop draws
`mean + std * noise` from its own generator, so caching changes nothing in the maths.
Encoding also looks at the set as a whole and warns (`TrainData.warnings`) when it is likely to
disappoint: fewer than `MIN_IMAGES` images, near-duplicate images, or one caption for every image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import TrainConfig
from .errors import DCOError
from .text import contains_token, replace_tokens

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Image files a folder may hold that are not read, with the reason given in the warning.
UNREAD_SUFFIXES = {
    ".gif": "GIF is not read (it is often animated, and its palette loses colour); save the frame you want as PNG",
    ".heic": "HEIC needs a Pillow plug-in that is not installed; save it as PNG or JPEG",
    ".heif": "HEIF needs a Pillow plug-in that is not installed; save it as PNG or JPEG",
    ".avif": "AVIF is not read; save it as PNG or JPEG",
    ".jxl": "JPEG XL is not read; save it as PNG or JPEG",
    ".svg": "SVG is a vector format; render it to PNG",
    ".psd": "PSD is not read; export it as PNG",
}
MAX_UPSCALE = 2.0  # an image enlarged more than this to reach the training size is named in a warning
MIN_IMAGES = 3  # fewer training images than this are named in a warning
THUMB_SIZE = 16  # near-duplicates are compared as THUMB_SIZE x THUMB_SIZE RGB thumbnails ...
NEAR_DUPLICATE_RMS = 0.03  # ... whose RMS difference (0..1 pixel scale) is below this


@dataclass
class Sample:
    """One training image: a file, or (`picture`) an RGB Pillow image held in memory, named `name`."""

    image: Path | None
    prompt: str
    base_prompt: str
    picture: Any = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.image.name if self.image is not None else "image"

    def open(self):
        """The image as RGB (a file is opened as `open_rgb` does)."""
        return self.picture if self.picture is not None else open_rgb(self.image)


@dataclass
class DatasetSpec:
    samples: list[Sample]
    tokens: dict[str, str]
    source: str


# ------------------------------------------------------------------------------- reading specs
def _resolve_image(raw: str, config_path: Path) -> Path:
    path = Path(raw)
    if path.is_absolute():
        return path
    candidates = [Path.cwd() / path, config_path.parent / path]
    candidates += [parent / path for parent in config_path.resolve().parents]
    for c in candidates:
        if c.is_file():
            return c
    return config_path.parent / path


def _read_config_json(path: Path, name: str | None) -> tuple[list[Path], list[str], list[str] | None, dict[str, str]]:
    if not path.is_file():
        raise DCOError(f"The config file {path} does not exist.")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM written by Windows editors is dropped
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DCOError(f"{path} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict) or not data:
        raise DCOError(f"{path} must hold a JSON object of named configs, such as {{\"full_ti\": {{...}}}}.")
    if name is None:
        if len(data) != 1:
            raise DCOError(f"{path} holds several configs; choose one with config_name: {', '.join(data)}.")
        name = next(iter(data))
    if name not in data:
        raise DCOError(f"{path} has no config named {name!r}; the available names are: {', '.join(data)}.")
    entry = data[name]
    where = f"{path} [{name}]"
    if not isinstance(entry, dict) or "images" not in entry or "prompts" not in entry:
        raise DCOError(f"{where} needs an 'images' list and a 'prompts' list.")
    images, prompts = entry["images"], entry["prompts"]
    if not isinstance(images, list) or not isinstance(prompts, list) or not images:
        raise DCOError(f"{where}: 'images' and 'prompts' must be non-empty lists.")
    if len(images) != len(prompts):
        raise DCOError(f"{where} has {len(images)} images but {len(prompts)} prompts; give one prompt per image.")
    base = entry.get("base_prompts")
    if base is not None and len(base) != len(images):
        raise DCOError(f"{where} has {len(images)} images but {len(base)} base_prompts; give one per image.")
    inserting = entry.get("inserting_tokens") or []
    initial = entry.get("initializer_tokens") or [""] * len(inserting)
    if len(initial) != len(inserting):
        raise DCOError(f"{where}: inserting_tokens and initializer_tokens must have the same length.")
    return [_resolve_image(str(p), path) for p in images], [str(p) for p in prompts], base, dict(zip(inserting, initial))


def read_caption(path: Path) -> str:
    """A caption file's text, whitespace tidied. UTF-8 only (a leading BOM, as Windows Notepad
    writes, is dropped); any other encoding is refused by name rather than guessed, because a wrong
    guess would train on garbled words without a sign."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DCOError(
            f"The caption file {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
            "save it as UTF-8 (most editors offer it under 'Save as... / Encoding')."
        ) from exc
    return " ".join(text.split())


def _warn_unread_files(folder: Path, caption_ext: str) -> None:
    """Name every file of the folder that is neither a training image nor a caption, with why."""
    for p in sorted(folder.iterdir()):
        suffix = p.suffix.lower()
        if not p.is_file() or p.name.startswith(".") or suffix in IMAGE_SUFFIXES or suffix == caption_ext:
            continue
        reason = UNREAD_SUFFIXES.get(suffix, f"only {', '.join(IMAGE_SUFFIXES)} images are read")
        log.warning("Skipping %s: %s.", p, reason)


def _read_folder(folder: Path, caption_ext: str = ".txt") -> tuple[list[Path], list[str]]:
    if not folder.is_dir():
        raise DCOError(f"The dataset folder {folder} does not exist.")
    _warn_unread_files(folder, caption_ext)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DCOError(
            f"The dataset folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); put the training "
            "images there with a same-name .txt caption each."
        )
    prompts = []
    for img in images:
        cap = img.with_suffix(caption_ext)
        if not cap.is_file():
            raise DCOError(f"{img.name} has no caption file {cap.name}; write its caption there.")
        text = read_caption(cap)
        if not text:
            raise DCOError(f"The caption file {cap} is empty.")
        prompts.append(text)
    return images, prompts


def load_dataset_spec(cfg: TrainConfig) -> DatasetSpec:
    """Read the images and captions `cfg` points at and derive the base prompts."""
    tokens = dict(cfg.tokens)
    base: list[str] | None = None
    if cfg.config_dir:
        images, prompts, base, config_tokens = _read_config_json(Path(cfg.config_dir), cfg.config_name)
        tokens = {**config_tokens, **tokens}
        source = f"{cfg.config_dir} [{cfg.config_name or 'only entry'}]"
    elif cfg.data_dir:
        images, prompts = _read_folder(Path(cfg.data_dir))
        source = str(cfg.data_dir)
    else:
        raise DCOError("No training data: set data_dir (a folder of images with .txt captions) or config_dir.")
    for img in images:
        if not img.is_file():
            raise DCOError(f"The training image {img} does not exist.")
    samples = [Sample(img, prompt, "") for img, prompt in zip(images, prompts)]
    return _with_base_prompts(samples, tokens, cfg, base, source)


def _with_base_prompts(samples: list[Sample], tokens: dict[str, str], cfg: TrainConfig, base: list[str] | None,
                       source: str) -> DatasetSpec:
    """Check that every caption names a token (when TI is on) and fill in the base prompts."""
    if cfg.train_text_encoder_ti:
        if not tokens:
            raise DCOError("Textual inversion is on but no tokens are set; give tokens such as <dog>=dog.")
        for sample in samples:
            if not contains_token(sample.prompt, list(tokens)):
                raise DCOError(
                    f"The caption of {sample.name} ({sample.prompt!r}) does not contain {' or '.join(tokens)}; "
                    "every caption must name the subject with its token."
                )
    word_map = tokens if cfg.train_text_encoder_ti else {}
    bases = list(base) if base is not None else [replace_tokens(s.prompt, word_map) for s in samples]
    for sample, base_prompt in zip(samples, bases):
        sample.base_prompt = base_prompt
    return DatasetSpec(samples=samples, tokens=tokens if cfg.train_text_encoder_ti else {}, source=source)


def image_from_tensor(pixels: torch.Tensor):
    """A [H, W, C] tensor of 0..1 values (C = 1, 3 or 4; the layout of ComfyUI's IMAGE) as an RGB
    Pillow image; an alpha channel is flattened onto white as `to_rgb` does for files."""
    import numpy as np
    from PIL import Image

    if pixels.dim() != 3 or pixels.shape[-1] not in (1, 3, 4):
        raise DCOError(f"An image tensor must be [height, width, channels] with 1, 3 or 4 channels, not "
                       f"{list(pixels.shape)}.")
    arr = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr[..., 0] if mode == "L" else arr), mode=mode))


def spec_from_images(images: Sequence[torch.Tensor], captions: Sequence[str], cfg: TrainConfig,
                     source: str = "images from the graph") -> DatasetSpec:
    """Training data held in memory: one [H, W, C] 0..1 tensor and one caption per image (the
    ComfyUI node's IMAGE input). Images are named "image 1", "image 2", ... in messages."""
    if not images:
        raise DCOError("No training images were given; pass at least one image.")
    if len(captions) != len(images):
        raise DCOError(f"{len(images)} images came with {len(captions)} captions; give one caption per image.")
    samples = [Sample(None, " ".join(str(c).split()), "", picture=image_from_tensor(t), name=f"image {n}")
               for n, (t, c) in enumerate(zip(images, captions), start=1)]
    return _with_base_prompts(samples, dict(cfg.tokens), cfg, None, source)


# ------------------------------------------------------------------------------- images
def _sixteen_bit_to_8(image):
    """A 16-bit (or 32-bit integer) greyscale image as 8-bit `L`, scaled by 255/65535.

    Pillow's own `convert("L")`/`convert("RGB")` from `I;16` and `I` clips every value above 255
    instead of scaling, so a 16-bit PNG would train as a white image. An `I` image whose values all
    fit in 0..255 (an 8-bit image saved as 32-bit) is kept as it is."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image).astype(np.float64)
    if image.mode != "I" or arr.max(initial=0) > 255:
        arr = arr * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _float_to_8(image):
    """A float (`F`) greyscale image as 8-bit `L`. Float TIFFs hold 0..1 by convention, which
    Pillow's `convert` would turn into black; values above 1 are read as 0..255 instead."""
    import numpy as np
    from PIL import Image

    arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image):
    """Any Pillow mode as 8-bit RGB. Transparency (RGBA, LA, PA, P or L with a transparent colour)
    is flattened onto white; 16-bit and float greyscale are scaled (see `_sixteen_bit_to_8`,
    `_float_to_8`); everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) uses Pillow's own conversion,
    which is right for them."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        image = _sixteen_bit_to_8(image)
    elif image.mode == "F":
        image = _float_to_8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def open_rgb(path: Path):
    """Open an image as RGB: EXIF rotation applied, then `to_rgb`. An image over Pillow's
    decompression-bomb limit is refused by name (it would need gigabytes to decode)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as exc:
        raise DCOError(
            f"The image {path} is too large to open safely ({exc}). Resize it to a few megapixels "
            "(training uses about resolution x resolution pixels) or remove it."
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DCOError(f"Cannot read the image {path}: {exc}. Replace or remove it.") from exc
    return to_rgb(image)


def warn_if_upscaled(path: Path | str, image_size: tuple[int, int], size: tuple[int, int]) -> float:
    """Warn, naming the file, when the image must be enlarged more than `MAX_UPSCALE` times to cover
    `size` (h, w): it will train blurred. Returns the scale factor."""
    w, h = image_size
    scale = max(size[0] / h, size[1] / w)
    if scale > MAX_UPSCALE:
        log.warning(
            "%s is %dx%d pixels and is enlarged %.1fx to %dx%d for training; it will look blurred. "
            "Use an image of at least %dx%d pixels or lower resolution.",
            path, w, h, scale, size[1], size[0], size[1] // 2, size[0] // 2,
        )
    return scale


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution² pixels, multiples of 64."""
    from diffusers.training_utils import generate_aspect_ratio_buckets

    return [tuple(b) for b in generate_aspect_ratio_buckets(resolution, divisibility=64)]


def target_size(width: int, height: int, cfg: TrainConfig) -> tuple[int, int]:
    """(height, width) the image is trained at."""
    if not cfg.buckets:
        return cfg.resolution, cfg.resolution
    from diffusers.training_utils import find_nearest_bucket

    buckets = bucket_sizes(cfg.resolution)
    return buckets[find_nearest_bucket(height, width, buckets)]


def prepare_image(image, size: tuple[int, int], center: bool = True, generator: torch.Generator | None = None):
    """Resize to cover `size` (h, w) and crop; returns the tensor in [-1, 1] and SDXL time ids."""
    from PIL import Image

    th, tw = size
    w, h = image.size
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    resized = image.resize((nw, nh), Image.BICUBIC)
    if center:
        top, left = (nh - th) // 2, (nw - tw) // 2
    else:
        g = generator or torch.Generator().manual_seed(0)
        top = int(torch.randint(0, nh - th + 1, (1,), generator=g))
        left = int(torch.randint(0, nw - tw + 1, (1,), generator=g))
    crop = resized.crop((left, top, left + tw, top + th))
    import numpy as np

    arr = torch.from_numpy(np.asarray(crop, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    time_ids = torch.tensor([h, w, top, left, th, tw], dtype=torch.float32)
    return arr, time_ids


# ------------------------------------------------------------------------------- the set as a whole
def thumbnail(image) -> torch.Tensor:
    """A THUMB_SIZE² RGB thumbnail (box-averaged, 0..1) for comparing images; the aspect ratio is
    ignored, so a resized or re-compressed copy lands on nearly the same values."""
    import numpy as np
    from PIL import Image

    small = image.convert("RGB").resize((THUMB_SIZE, THUMB_SIZE), Image.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32).copy()).flatten() / 255.0


def near_duplicate_groups(thumbs: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of images whose thumbnails differ by less than NEAR_DUPLICATE_RMS (RMS over every
    value), joined transitively; only groups of two or more are returned, in first-seen order."""
    if len(thumbs) < 2:
        return []
    flat = torch.stack(list(thumbs))
    rms = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    root = list(range(len(thumbs)))
    for j in range(len(thumbs)):
        for i in range(j):
            if rms[i, j] < NEAR_DUPLICATE_RMS:
                root[j] = root[i]
                break
    groups: dict[int, list[int]] = {}
    for j, r in enumerate(root):
        groups.setdefault(r, []).append(j)
    return [g for g in groups.values() if len(g) > 1]


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def dataset_warnings(samples: Sequence[Sample], thumbs: Sequence[torch.Tensor]) -> list[str]:
    """Why a training set is likely to disappoint, one sentence each: too few images,
    near-duplicate images (named), or the same caption on every image."""
    out = []
    n = len(samples)
    if n < MIN_IMAGES:
        out.append(f"Only {n} training image{'s' if n != 1 else ''}: with fewer than {MIN_IMAGES} the LoRA tends to "
                   "copy them (pose, background, lighting) instead of learning the subject or style; add images "
                   "that differ in setting, pose or light (4-10 work well).")
    for group in near_duplicate_groups(thumbs):
        out.append(f"{_names([samples[i].name for i in group])} look like near-duplicates of each other: a repeated "
                   "image is learned by heart and counts more than the others; keep one of them, or replace the "
                   "others with different shots.")
    prompts = [s.prompt for s in samples]
    if n > 1 and len(set(prompts)) == 1:
        out.append(f"All {n} captions are the same ({prompts[0]!r}): the model cannot tell what belongs to the "
                   "subject or style from what changes between images; describe what differs in each one "
                   "(setting, pose, light, colours).")
    return out


# ------------------------------------------------------------------------------- latents
@dataclass
class LatentItem:
    """One training image in latent space (already multiplied by the VAE scaling factor)."""

    mean: torch.Tensor  # [C, h, w]
    std: torch.Tensor | None  # [C, h, w] or None for a fixed latent
    time_ids: torch.Tensor  # [6]
    prompt: str
    base_prompt: str
    flipped: "LatentItem | None" = None
    image_path: Path | None = None  # None for an image held in memory
    name: str = ""  # how messages name the image: its file name, or "image 3" for in-memory images

    def draw(self, generator: torch.Generator, flip: bool) -> torch.Tensor:
        item = self.flipped if flip and self.flipped is not None else self
        if item.std is None:
            return item.mean
        noise = torch.randn(item.mean.shape, generator=generator, dtype=torch.float32)
        return item.mean + item.std * noise.to(item.mean.device)


@dataclass
class TrainData:
    items: list[LatentItem]
    tokens: dict[str, str] = field(default_factory=dict)
    source: str = ""
    encode_fn: Callable[[int, torch.Generator], LatentItem] | None = None  # random crops: re-encode
    warnings: list[str] = field(default_factory=list)  # why this set may train poorly, in full sentences

    def bucket_groups(self) -> list[list[int]]:
        """Indices grouped by latent shape (one group unless buckets are on)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault(tuple(item.mean.shape), []).append(i)
        return list(groups.values())


Encoder = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]
"""pixels [3, H, W] in [-1, 1] -> (latent mean, latent std or None), both already scaled."""


def vae_encoder(vae: Any) -> Encoder:
    """Encode with a diffusers AutoencoderKL: the posterior's mean and std, times the scaling factor."""

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        dist = vae.encode(pixels[None].to(device=device, dtype=dtype)).latent_dist
        scale = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (dist.mean[0].float() - shift) * scale, dist.std[0].float() * scale

    return encode


def encode_dataset(
    encoder: Encoder, spec: DatasetSpec, cfg: TrainConfig, progress: Callable[[int, int], None] | None = None
) -> TrainData:
    """Encode every image once (plus its mirror when flips are on). The diffusers VAE
    (`vae_encoder`) and the ComfyUI node (the graph's VAE) both come through here."""
    items: list[LatentItem] = []
    thumbs: list[torch.Tensor] = []
    total = len(spec.samples)
    for n, sample in enumerate(spec.samples):
        image = sample.open()
        thumbs.append(thumbnail(image))
        size = target_size(*image.size, cfg)
        warn_if_upscaled(sample.image or sample.name, image.size, size)
        pixels, time_ids = prepare_image(image, size, center=True)
        mean, std = encoder(pixels)
        item = LatentItem(mean, std, time_ids, sample.prompt, sample.base_prompt, image_path=sample.image,
                          name=sample.name)
        if cfg.random_flip:
            fmean, fstd = encoder(pixels.flip(-1))
            item.flipped = LatentItem(fmean, fstd, time_ids, sample.prompt, sample.base_prompt)
        items.append(item)
        if progress:
            progress(n + 1, total)
    data = TrainData(items=items, tokens=spec.tokens, source=spec.source,
                     warnings=dataset_warnings(spec.samples, thumbs))
    for warning in data.warnings:
        log.warning(warning)
    if not cfg.center_crop:

        def encode_random_crop(index: int, generator: torch.Generator) -> LatentItem:
            """A fresh random crop, mirrored with probability 1/2 when `random_flip` is on. The flip
            is drawn and applied here (one VAE encode); the item has no `flipped` twin, so the
            loop's own flip draw leaves it as it is."""
            sample = spec.samples[index]
            image = sample.open()
            pixels, time_ids = prepare_image(image, target_size(*image.size, cfg), center=False, generator=generator)
            if cfg.random_flip and bool(torch.rand((), generator=generator) < 0.5):
                pixels = pixels.flip(-1)
            mean, std = encoder(pixels)
            return LatentItem(mean, std, time_ids, sample.prompt, sample.base_prompt, image_path=sample.image,
                              name=sample.name)

        data.encode_fn = encode_random_crop
    return data


def latents_from_tensors(
    latents: Sequence[torch.Tensor], prompts: Sequence[str], base_prompts: Sequence[str], time_ids: Sequence[torch.Tensor],
    tokens: dict[str, str] | None = None,
) -> TrainData:
    """Training data from latents encoded elsewhere (the ComfyUI node encodes with the graph's VAE)."""
    items = [LatentItem(lat.float(), None, t.float(), p, b) for lat, p, b, t in zip(latents, prompts, base_prompts, time_ids)]
    return TrainData(items=items, tokens=dict(tokens or {}))
