"""DCOTrainer on images from the graph: an IMAGE batch or a list of images, with captions.

The node takes whole lists (`is_input_list`), so each input is given here the way ComfyUI's
executor hands it over (one-item lists, and lists for images / captions from list outputs), as
well as plainly. Models are the tiny in-process SDXL of `harness`; folders are temporary.
"""

from __future__ import annotations

import json

import pytest

import harness

harness.require()

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from test_comfy_trainer import graph_models, node_inputs, run_node, write_dataset  # noqa: E402

trainer = harness.pack_module("nodes.trainer")
graph_dataset = harness.pack_module("nodes.graph_dataset")
DCOError = harness.pack_module("dco_train.errors").DCOError

CAPTIONS = ["a photo of a <obj> on a table", "a close up photo of a <obj> in the snow", "a photo of a <obj> on the beach"]


def scene(i: int, width: int = 80, height: int = 64) -> torch.Tensor:
    """A distinct [1, H, W, 3] image (ComfyUI's IMAGE layout): a red disc on a coloured ground."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    disc = ((x - 0.2 * i) ** 2 + y**2 < 0.3).float()
    ground = torch.tensor([0.15 * i % 1.0, 0.5, 0.8])
    return (ground * (1 - disc[..., None]) + torch.tensor([0.9, 0.15, 0.15]) * disc[..., None])[None]


def image_inputs(images, captions, **overrides):
    return node_inputs("", images=images, captions=captions, **{"dataset_dir": "", **overrides})


def as_executor_lists(inputs: dict) -> dict:
    """The node's inputs as ComfyUI's executor passes them to an `is_input_list` node."""
    return {k: v if k in ("images", "captions") and isinstance(v, list) else [v] for k, v in inputs.items()}


def lora_config(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["dco.config"])


def nothing_written(folders) -> bool:
    return not list(folders["loras"].iterdir()) and not list(folders["embeddings"].iterdir())


# ------------------------------------------------------------------------------- training
def test_trains_a_subject_from_an_image_batch_and_multiline_captions(folders):
    model, clip, vae = graph_models()
    batch = torch.cat([scene(i) for i in range(3)])
    out = run_node(model, clip, vae, **image_inputs(batch, "\n".join(CAPTIONS) + "\n\n"))
    assert out[2] == "dco_test.safetensors" and out[3] == "dco_test.safetensors"
    assert (folders["loras"] / "dco_test.safetensors").is_file()
    assert (folders["embeddings"] / "dco_test.safetensors").is_file()
    cfg = lora_config(folders["loras"] / "dco_test.safetensors")
    assert cfg["data_dir"] is None and cfg["buckets"] is True and cfg["tokens"] == {"<obj>": "toy"}


def test_images_of_two_sizes_as_a_list_train_in_buckets(folders):
    """A list (as list outputs give it) of a wide and two square images, with a list of captions,
    through the executor's calling convention."""
    model, clip, vae = graph_models()
    images = [scene(0, 256, 128), scene(1, 128, 128), scene(2, 128, 128)]
    inputs = as_executor_lists(image_inputs(images, list(CAPTIONS), resolution=128, batch_size=2))
    with torch.inference_mode():
        out = harness.call_node(trainer.DCOTrainer, model=[model], clip=[clip], vae=[vae],
                                **{k: v for k, v in inputs.items() if k not in ("model", "clip", "vae")})
    assert out[2] == "dco_test.safetensors"
    assert lora_config(folders["loras"] / "dco_test.safetensors")["buckets"] is True
    # what the engine does with these images: two buckets, the wide one wider than high
    data = harness.pack_module("dco_train.data")
    cfg = trainer.build_config(None, tokens="<obj>=toy", resolution=128)
    spec = data.spec_from_images(graph_dataset.image_list(images), CAPTIONS, cfg)
    sizes = [data.target_size(*s.picture.size, cfg) for s in spec.samples]
    assert sizes[0][1] > sizes[0][0] and sizes[1] == sizes[2] == (128, 128)


def test_a_style_trains_on_images_without_captions(folders):
    model, clip, vae = graph_models()
    out = run_node(model, clip, vae, **image_inputs(torch.cat([scene(0), scene(1)]), "", preset="style", tokens="",
                                                    output_name="style"))
    assert out[2] == "style.safetensors" and out[3] == ""


def test_load_image_text_dataset_from_folder_outputs_train(folders, tmp_path):
    """The image list and text list of ComfyUI's own dataset loader (v0.8.0 and later)."""
    try:
        from comfy_extras.nodes_dataset import LoadImageTextDataSetFromFolderNode
    except ImportError:
        pytest.skip(f"ComfyUI {harness.comfy_version()} has no LoadImageTextDataSetFromFolder (comfy_extras.nodes_dataset)")
    import folder_paths

    data = write_dataset(tmp_path / "input" / "pets", CAPTIONS)
    (data / "img2.png").unlink()
    from PIL import Image

    Image.new("RGB", (128, 64), (20, 200, 90)).save(data / "img2.png")  # another size
    saved = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    try:
        images, texts = harness.call_node(LoadImageTextDataSetFromFolderNode, folder="pets")
    finally:
        folder_paths.set_input_directory(saved)
    assert isinstance(images, list) and len(images) == 3 and sorted(texts) == sorted(CAPTIONS)
    model, clip, vae = graph_models()
    inputs = as_executor_lists(image_inputs(images, texts, resolution=128))
    with torch.inference_mode():
        out = harness.call_node(trainer.DCOTrainer, **{**inputs, "model": [model], "clip": [clip], "vae": [vae]})
    assert out[2] == "dco_test.safetensors" and (folders["embeddings"] / "dco_test.safetensors").is_file()


# ------------------------------------------------------------------------------- errors
BATCH = torch.cat([scene(i) for i in range(3)])
ERRORS = {
    # case: (inputs, message, whether validation can tell before anything runs)
    "count": (dict(images=BATCH, captions="\n".join(CAPTIONS[:2])), r"captions holds 2 captions for 3 images", False),
    "empty_batch": (dict(images=torch.zeros(0, 64, 64, 3), captions=""), "images is an empty batch", False),
    "no_token": (dict(images=BATCH, captions="\n".join([CAPTIONS[0], "a photo of a toy", CAPTIONS[2]])),
                 r"caption 2 \('a photo of a toy'\) does not contain <obj>", True),
    "no_captions": (dict(images=BATCH, captions=""), "captions is empty, but the subject preset", True),
    "both": (dict(images=BATCH, captions="\n".join(CAPTIONS), dataset_dir="dco/my_subject"),
             r"dataset_dir is 'dco/my_subject' and images are connected; .*clear dataset_dir", True),
    "captions_alone": (dict(images=None, captions="\n".join(CAPTIONS), dataset_dir="dco/my_subject"),
                       "captions are given but images is not connected", True),
    "list_into_a_setting": (dict(images=BATCH, captions="\n".join(CAPTIONS), output_name=["a", "b"]),
                            "output_name received a list of 2 values", True),
    "no_tokens": (dict(images=BATCH, captions="\n".join(CAPTIONS), tokens=""), "tokens is empty", True),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_image_inputs_are_refused_by_name_and_write_nothing(folders, case):
    overrides, message, _ = ERRORS[case]
    model, clip, vae = graph_models()
    inputs = image_inputs(**overrides) if "dataset_dir" not in overrides else {**image_inputs(None, None), **overrides}
    if inputs["images"] is None:
        del inputs["images"]
    with pytest.raises(DCOError, match=message):
        run_node(model, clip, vae, **inputs)
    assert nothing_written(folders)


@pytest.mark.parametrize("case", [c for c, (_, _, early) in ERRORS.items() if early])
def test_validation_refuses_what_it_can_know(folders, case):
    """At validation ComfyUI passes a linked input as (None,): the images are only known to be
    connected, yet these mistakes are caught before anything runs."""
    import re

    overrides, message, _ = ERRORS[case]
    inputs = {**image_inputs(None, None), **overrides}
    taken = ("dataset_dir", "preset", "tokens", "output_name", "overwrite", "resume", "mixed_precision", "captions")
    values = {k: v if isinstance(v, list) else [v] for k, v in inputs.items() if k in taken}
    if inputs.get("images") is not None:
        values["images"] = (None,)
    result = trainer.DCOTrainer.validate_inputs(**values)
    assert isinstance(result, str) and re.search(message, result), result


def test_validation_passes_a_good_request_with_linked_images_and_captions(folders):
    linked = (None,)
    assert trainer.DCOTrainer.validate_inputs(dataset_dir=[""], preset=["subject"], tokens=["<obj>=toy"],
                                              output_name=["x"], overwrite=[False], resume=["off"],
                                              mixed_precision=["no"], images=linked, captions=linked) is True
    assert trainer.DCOTrainer.validate_inputs(dataset_dir=[""], preset=["subject"], tokens=["<obj>=toy"],
                                              output_name=["x"], images=linked, captions=["\n".join(CAPTIONS)]) is True


# ------------------------------------------------------------------------------- caching
def test_fingerprint_changes_with_the_images_and_the_captions():
    fp = trainer.DCOTrainer.fingerprint_inputs
    base = fp(dataset_dir=[""], images=[BATCH], captions=["\n".join(CAPTIONS)])
    assert base == fp(dataset_dir=[""], images=[BATCH.clone()], captions=["\n".join(CAPTIONS)])
    changed = BATCH.clone()
    changed[1, 3, 3, 0] += 0.01
    assert base != fp(dataset_dir=[""], images=[changed], captions=["\n".join(CAPTIONS)])
    assert base != fp(dataset_dir=[""], images=[BATCH], captions=["\n".join(reversed(CAPTIONS))])
    assert base != fp(dataset_dir=[""], images=list(BATCH[:, None]), captions=["\n".join(CAPTIONS[:2])])
