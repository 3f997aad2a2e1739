"""Images and captions from the graph, as DCO Trainer receives them.

The trainer takes whole lists (`is_input_list`) so that the image list and text list of ComfyUI's
dataset nodes (LoadImageTextDataSetFromFolder, ...) reach it in one call instead of one run per
image. ComfyUI then hands every input over as a list; these functions turn that back into one value
per input, single images and a list of captions, and check the captions against the images.
"""

from __future__ import annotations

from typing import Any

import torch

from ..dco_train.errors import DCOError
from ..dco_train.text import contains_token


def one_value(name: str, value: Any) -> Any:
    """The value of a one-value input. The node takes whole lists (`is_input_list`) so that the
    images and captions of ComfyUI's dataset nodes arrive in one call; ComfyUI then hands every
    other input over as a one-item list (a tuple `(None,)` for a link at validation). A plain value
    (a direct call) is taken as it is."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) > 1:
        raise DCOError(f"{name} received a list of {len(value)} values, but it takes one; only images and captions "
                       "take lists. Link a single value to it.")
    return value[0] if value else None


def image_list(images: Any) -> list[torch.Tensor | None] | None:
    """Single [H, W, C] images from an IMAGE batch [B, H, W, C], a list of them (ComfyUI's list
    outputs, images of different sizes) or both. None when nothing is connected; a None entry is a
    link that has not run yet (validation)."""
    if images is None:
        return None
    out: list[torch.Tensor | None] = []
    for batch in images if isinstance(images, (list, tuple)) else [images]:
        if batch is None:
            out.append(None)
        elif torch.is_tensor(batch) and batch.dim() in (3, 4):
            out += list(batch.unbind(0)) if batch.dim() == 4 else [batch]
        else:
            shape = list(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
            raise DCOError(f"images received {shape}; it takes IMAGE batches [batch, height, width, channels] or a "
                           "list of them.")
    return out


def caption_list(captions: Any) -> list[str] | None:
    """Captions from the captions input: one text is split into lines (blank lines skipped), a list
    of texts (ComfyUI's list outputs) gives one caption per item; whitespace is tidied. [] when none
    are given, None when they come through a link that has not run yet (validation)."""
    if captions is None:
        return []
    items = [captions] if isinstance(captions, str) else list(captions)
    if any(c is None for c in items):
        return None
    if len(items) == 1:
        return [" ".join(line.split()) for line in str(items[0]).splitlines() if line.strip()]
    return [" ".join(str(c).split()) for c in items]


def node_values(inputs: dict[str, Any]) -> dict[str, Any]:
    """What ComfyUI hands over (lists, see `one_value`) as one value per input, the images as a list
    of single images and the captions as a list of strings."""
    convert = {"images": image_list, "captions": caption_list}
    return {k: convert[k](v) if k in convert else one_value(k, v) for k, v in inputs.items()}


def check_captions(captions: list[str], count: int | None, preset: str | None, token_map: dict[str, str] | None) -> None:
    """One caption per image, each naming a token when tokens are trained. `count` or `token_map`
    None: not known yet (a link at validation), so that part waits for `execute`."""
    if not captions:
        if preset == "subject":
            raise DCOError("captions is empty, but the subject preset needs one caption per image that names the "
                           "subject with its token (e.g. 'a photo of a <dog> on the grass'); type one per line in the "
                           "order of the images, or link a list of texts.")
        return  # a style may train on images alone (empty captions)
    if count is not None and len(captions) != count:
        raise DCOError(f"captions holds {len(captions)} caption{'s' if len(captions) != 1 else ''} for {count} "
                       f"image{'s' if count != 1 else ''}; give exactly one per image, one per line in the order of "
                       "the images (blank lines are skipped).")
    for n, caption in enumerate(captions, start=1):
        if token_map and not contains_token(caption, list(token_map)):
            what = f"caption {n} ({caption!r}) does not contain" if caption else f"caption {n} is empty; it must name"
            example = next(iter(token_map))
            raise DCOError(f"{what} {' or '.join(token_map)}; with tokens every caption must name the subject with its "
                           f"token, e.g. 'a photo of a {example} on the grass'.")
