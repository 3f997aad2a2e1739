"""DCO Trainer: a graph's SDXL (MODEL, CLIP, VAE) plus a folder of captioned images, or images from
the graph with a caption each -> a DCO LoRA and tokens, written to ComfyUI's loras / embeddings
folders and returned ready for sampling.

The node converts the graph's models into the engine's modules (`convert.py`, no write to the
shared model), encodes the images once with the graph's VAE, and runs the engine in-process
outside inference mode. Progress goes to the node's progress bar (with validation previews) and,
per step, to a `dco.train` websocket event for the live chart; the set-up phases are shown too.
Cancel works in every phase: after a step or a preview it stops with a checkpoint (`resume =
latest` continues it exactly); during the set-up or the final save it stops at the next unit of
work. A cancelled run writes no final file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io, ui

from ..dco_train.config import TrainConfig, parse_tokens
from ..dco_train.errors import DCOError
from ..dco_train.formats import safe_output_path
from . import events
from .graph_dataset import caption_list, check_captions, image_list, node_values, one_value

log = logging.getLogger(__name__)

RECIPES = {"subject": TrainConfig.subject(tokens={"<dog>": "dog"}), "style": TrainConfig.style()}
DEFAULT = RECIPES["subject"]


ENGINE_PACKAGES = ("diffusers", "transformers", "peft", "accelerate", "safetensors")
INSTALL_HINT = "pip install -r custom_nodes/ComfyUI-DCO/requirements.txt"


def require_engine() -> None:
    """A clear message instead of an import chain deep inside training.

    Each package is imported, not only looked up: a broken install (a peft that raises on import
    because it does not match the installed transformers, say) fails with any exception, not only
    ImportError, and the user needs the package's name and the error, not diffusers' import chain.
    """
    import importlib

    problems = []
    for name in ENGINE_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if getattr(exc, "name", None) == name:
                problems.append(f"{name} is not installed")
            else:
                problems.append(f"{name} does not import ({type(exc).__name__}: {exc})")
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything at import time
            problems.append(f"{name} does not import ({type(exc).__name__}: {exc})")
    if problems:
        raise DCOError(
            f"DCO training needs {', '.join(ENGINE_PACKAGES)}, but {'; '.join(problems)}. Install or repair the "
            f"pack's requirements in ComfyUI's Python ({INSTALL_HINT}, or pip install --force-reinstall "
            "the package named) and restart ComfyUI."
        )


# Names Windows reserves for devices, with or without an extension, in any case, and the characters
# it forbids in a file name: refused on every system so that a shared workflow behaves the same.
WINDOWS_RESERVED = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                              *(f"lpt{i}" for i in range(1, 10))})
WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*\x00-\x1f]')


def check_portable_name(name: str, field: str = "output_name") -> None:
    """Refuse a name that Windows cannot store, whatever system runs ComfyUI now."""
    for part in re.split(r"[\\/]", name):
        if part.strip() in ("", ".", ".."):  # safe_output_path refuses these with its own message
            continue
        bad = sorted(set(WINDOWS_FORBIDDEN.findall(part)))
        if bad:
            shown = " ".join(repr(c) for c in bad)
            raise DCOError(f"{field} {name!r} contains {shown}, which Windows does not allow in a file name; "
                           "use letters, digits, '-' and '_'.")
        if part.endswith((".", " ")):
            raise DCOError(f"{field} {name!r} ends a name with a dot or a space, which Windows drops; remove it.")
        if part.split(".")[0].strip().lower() in WINDOWS_RESERVED:
            raise DCOError(f"{field} {name!r} uses {part!r}, a device name that Windows reserves (con, prn, aux, "
                           f"nul, com1-com9, lpt1-lpt9); choose another name, such as {part.split('.')[0]}_lora.")


def resolve_dataset(dataset_dir: str) -> Path:
    """An absolute path, or a path relative to ComfyUI's input folder: a folder or a .json file."""
    import folder_paths

    if not dataset_dir or not dataset_dir.strip():
        raise DCOError("dataset_dir is empty; give a folder of images with .txt captions or a config.json, or "
                       "connect images (with captions).")
    path = Path(dataset_dir.strip()).expanduser()
    if not path.is_absolute():
        path = Path(folder_paths.get_input_directory()) / path
    if not path.exists():
        raise DCOError(f"The dataset {path} does not exist; give an absolute path or a folder inside ComfyUI's input folder.")
    if path.is_file() and path.suffix.lower() != ".json":
        raise DCOError(f"dataset_dir {path} is a file; give a folder of images with .txt captions or a config.json.")
    return path


# The one map from the node's widgets (ids that saved workflows use) to TrainConfig fields. A widget's
# default is TrainConfig's subject recipe, except the PRESET_CHOSEN ones, whose value up to the
# sentinel means "the preset's value", and NODE_DEFAULTS, where the node differs on purpose.
WIDGET_FIELDS = {
    "steps": "max_train_steps", "rank": "rank", "learning_rate": "learning_rate",
    "text_encoder_lr": "text_encoder_lr", "beta": "dco_beta", "resolution": "resolution",
    "batch_size": "train_batch_size", "offset_noise": "offset_noise", "seed": "seed",
    "mixed_precision": "mixed_precision", "gradient_checkpointing": "gradient_checkpointing",
    "use_8bit_adam": "use_8bit_adam", "checkpoint_every": "checkpointing_steps", "validation_every": "validation_every",
}
MIXED_PRECISION_OPTIONS = ("auto", "bf16", "fp16", "no")
PRESET_CHOSEN = {"steps": 0, "rank": 0, "offset_noise": -1.0}
NODE_DEFAULTS: dict[str, Any] = {}  # none today: the previews' cadence is TrainConfig's (about 2% of a run)


def widget_default(widget: str) -> Any:
    """The default of a config widget, from the table above and TrainConfig."""
    if widget in PRESET_CHOSEN:
        return PRESET_CHOSEN[widget]
    if widget in NODE_DEFAULTS:
        return NODE_DEFAULTS[widget]
    return getattr(DEFAULT, WIDGET_FIELDS[widget])


def build_config(dataset: Path | None, preset: str = "subject", tokens: str = "", config_name: str = "",
                 validation_prompt: str = "", **widgets: Any) -> TrainConfig:
    """The engine config from the node's widgets (see WIDGET_FIELDS); other node inputs are ignored.
    `dataset` None means images from the graph, whose sizes vary: they train in aspect-ratio buckets."""
    token_map = parse_tokens(tokens)
    is_config = dataset is not None and dataset.is_file()
    overrides: dict[str, Any] = (
        {"buckets": True} if dataset is None else
        {"config_dir": str(dataset), "config_name": config_name or None} if is_config else {"data_dir": str(dataset)}
    )
    if token_map or not is_config:  # a config.json may name its own tokens
        overrides.update(tokens=token_map, train_text_encoder_ti=bool(token_map))
    else:
        overrides["train_text_encoder_ti"] = preset == "subject"
    prompt = (validation_prompt or "").strip()
    overrides["validation_prompts"] = [prompt] if prompt else []
    for widget, value in widgets.items():
        if widget not in WIDGET_FIELDS or (widget in PRESET_CHOSEN and value <= PRESET_CHOSEN[widget]):
            continue
        overrides[WIDGET_FIELDS[widget]] = value
    return TrainConfig.preset_named(preset, **overrides)


def plan_outputs(output_name: str, overwrite: bool, resume: str, needs_embeddings: bool,
                 clear: bool = True) -> dict[str, Any]:
    """Where the files go, refusing names that escape their folder, that Windows cannot store, or
    that overwrite without leave. `clear=False` only checks (validation must not delete a run)."""
    import folder_paths

    check_portable_name(output_name)
    lora = safe_output_path(folder_paths.get_folder_paths("loras")[0], output_name, overwrite=overwrite)
    emb = safe_output_path(folder_paths.get_folder_paths("embeddings")[0], output_name, overwrite=overwrite) \
        if needs_embeddings else None
    root = Path(folder_paths.get_output_directory()) / "dco"
    run_dir = safe_output_path(root, output_name, suffix="", overwrite=True)
    checkpoints = run_dir / "checkpoints"
    if resume == "off" and checkpoints.is_dir() and any(checkpoints.iterdir()):
        if not overwrite:
            raise DCOError(
                f"{run_dir} holds checkpoints of an earlier '{output_name}' run; set resume to latest to continue it, "
                "or turn on overwrite to start over (its checkpoints are deleted)."
            )
        if clear:
            shutil.rmtree(run_dir)
    return {"lora": lora, "embeddings": emb, "run_dir": run_dir}


def check_request(dataset_dir: str | None, preset: str | None, tokens: str | None, output_name: str | None,
                  overwrite: bool | None, resume: str | None, images: list[Any] | None = None,
                  captions: list[str] | None = None) -> None:
    """Everything about the request that can be known before a model loads.

    A value is None when it arrives through a link, which ComfyUI does not resolve at validation;
    the check that needs it runs again in `execute`. Validation skips ComfyUI's own option checks for
    the inputs it takes, so the combos taken here are checked here. `images` (see `image_list`) is
    None when not connected; `captions` as `caption_list` gives them.
    """
    if preset is not None and preset not in RECIPES:
        raise DCOError(f"preset {preset!r} is not a recipe; choose one of {', '.join(RECIPES)}.")
    if resume is not None and resume not in ("off", "latest"):
        raise DCOError(f"resume {resume!r} is not an option; choose off or latest.")
    token_map = parse_tokens(tokens) if tokens is not None else None
    if images is not None:
        if dataset_dir is not None and dataset_dir.strip():
            raise DCOError(f"dataset_dir is {dataset_dir.strip()!r} and images are connected; train on one of them: "
                           "clear dataset_dir to train on the images, or disconnect images to train on the folder.")
        count = None if any(i is None for i in images) else len(images)
        if count == 0:
            raise DCOError("images is an empty batch; connect a node that outputs at least one image (Load Image, "
                           "VAE Decode, a dataset loader).")
    elif captions:
        raise DCOError("captions are given but images is not connected; captions label the images input (a "
                       "dataset_dir folder reads its .txt files). Connect images, or clear captions.")
    dataset = resolve_dataset(dataset_dir) if dataset_dir is not None and images is None else None
    is_config = dataset is not None and dataset.is_file()
    if preset == "subject" and token_map == {} and (images is not None or dataset is not None and not is_config):
        raise DCOError("tokens is empty, but the subject preset learns new tokens that the captions contain; give "
                       "them as <dog>=dog (token=starting word), or choose the style preset.")
    if images is not None and captions is not None:
        check_captions(captions, count, preset, token_map)
    if output_name is not None:
        needs_embeddings = bool(token_map) or (preset == "subject" and token_map is None)
        plan_outputs(output_name, bool(overwrite), resume or "off", needs_embeddings, clear=False)


def _relative(path: Path | None, kind: str) -> str:
    if path is None:
        return ""
    import folder_paths

    for root in folder_paths.get_folder_paths(kind):
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return Path(path).name


def _image_tensor(image: Any) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


class _Progress:
    """Engine callbacks -> ComfyUI progress bar, previews, websocket events and Cancel.

    Events (`events.TRAIN`): "start"; "setup" {"phase", "done", "total"} after every unit of work
    (the labels are `dco_train.monitor.PHASES`), with "warnings" once the dataset is read; "running"
    per step (StepInfo) and for readings between steps (the drift baseline, a preview's cost
    {"step", "preview_s", "preview_steps_equiv"}); then "done" {"step", "per_image", "warnings"},
    "interrupted" or "error". The progress bar shows the fraction of the current phase.
    """

    def __init__(self, node_id: str, total: int):
        import comfy.utils

        self.node_id, self.total, self.run = node_id, total, uuid.uuid4().hex[:12]
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.cancelled = False
        self.last = time.perf_counter()
        self.step = 0

    def event(self, status: str, **data: Any) -> None:
        events.send(events.TRAIN, {"node": self.node_id, "run": self.run, "status": status, "total": self.total, **data})

    def _bar(self, value: int, total: int | None = None, preview: Any = None) -> None:
        import comfy.model_management as mm

        try:  # ComfyUI's progress hook raises when the user pressed Cancel
            self.bar.update_absolute(value, self.total if total is None else total, preview)
        except mm.InterruptProcessingException:
            self.cancelled = True

    def on_phase(self, label: str, done: int, total: int, **extra: Any) -> None:
        self.event("setup", phase=label, done=done, total=total, **extra)
        self._bar(done, max(total, 1))
        self.last = time.perf_counter()  # set-up time is not a step's

    def unit_done(self, label: str):
        """A `(done, total)` progress function for the node's own set-up work: reports, then cancels."""

        def report(done: int, total: int) -> None:
            self.on_phase(label, done, total)
            if self.should_stop():
                self.raise_cancel()

        return report

    def on_step(self, info: Any) -> None:
        now = time.perf_counter()
        self.event("running", **info.as_dict(), it_s=1.0 / max(now - self.last, 1e-9))
        self.last, self.step = now, info.step
        self._bar(info.step)

    def on_metrics(self, values: dict[str, Any]) -> None:
        """Readings between steps (the drift baseline, a preview's cost): chart points without a loss."""
        self.event("running", **values)
        self.last = time.perf_counter()

    def on_preview(self, step: int, images: list[Any]) -> None:
        if images:
            self._bar(step, preview=("JPEG", images[0], 512))

    def should_stop(self) -> bool:
        import comfy.model_management as mm

        return self.cancelled or mm.processing_interrupted()

    def raise_cancel(self) -> None:
        import comfy.model_management as mm

        if mm.processing_interrupted():
            mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()


def train_in_graph(model: Any, clip: Any, vae: Any, cfg: TrainConfig, plan: dict[str, Any], resume: str,
                   node_id: str, spec: Any = None) -> dict[str, Any]:
    """Run the engine on the graph's models; returns the paths, the history, the per-image errors and
    the dataset's warnings. `spec` (a DatasetSpec) holds images from the graph; without it the data
    is read from `cfg`'s folder. Cancel is honoured after every unit of work, in every phase; a
    cancelled run writes no final file and ends in ComfyUI's InterruptProcessingException."""
    import comfy.model_management as mm

    from ..dco_train.data import encode_dataset, load_dataset_spec
    from ..dco_train.monitor import LOADING, PREPARING
    from ..dco_train.train import Callbacks, RunOptions, resolve_mixed_precision, train, weight_dtype
    from .convert import components_from_graph, vae_decoder, vae_encoder

    spec = spec if spec is not None else load_dataset_spec(cfg)
    device = mm.get_torch_device()
    dtype = weight_dtype(resolve_mixed_precision(cfg.mixed_precision, device.type == "cuda"), device)
    progress = _Progress(node_id, cfg.max_train_steps)
    progress.event("start")
    latent_format = model.model.latent_format
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # the images first: a bad image or a Cancel costs no model conversion, and the graph's
            # VAE is done with before the training copies take memory
            progress.unit_done(PREPARING)(0, len(spec.samples))
            data = encode_dataset(vae_encoder(vae, latent_format), spec, cfg, progress=progress.unit_done(PREPARING))
            warnings = list(getattr(data, "warnings", None) or [])
            if warnings:
                progress.on_phase(PREPARING, len(spec.samples), len(spec.samples), warnings=warnings)
            comps = components_from_graph(model, clip, device, dtype, progress=progress.unit_done(LOADING))
            for path in (plan["run_dir"].parent, plan["lora"].parent, plan["embeddings"] and plan["embeddings"].parent):
                if path:
                    path.mkdir(parents=True, exist_ok=True)
            run = RunOptions(
                output_dir=plan["run_dir"], lora_path=plan["lora"], embeddings_path=plan["embeddings"],
                resume="latest" if resume == "latest" else None, log_with=None, progress_bar=False,
                cpu=device.type == "cpu", decode_latents=vae_decoder(vae, latent_format),
                callbacks=Callbacks(on_step=progress.on_step, should_stop=progress.should_stop,
                                    on_preview=progress.on_preview, on_metrics=progress.on_metrics,
                                    on_phase=progress.on_phase),
                metadata={"dco.trained_with": "ComfyUI-DCO DCOTrainer"},
            )
            result = train(cfg, comps, run, data)
    except mm.InterruptProcessingException:
        progress.event("interrupted", step=progress.step)
        raise
    except Exception as exc:
        progress.event("error", message=str(exc))
        raise
    finally:
        mm.soft_empty_cache()
    if result.stopped:
        progress.event("interrupted", step=result.step)
        progress.raise_cancel()
    progress.event("done", step=result.step, per_image=result.per_image, warnings=result.warnings)
    return {"lora": result.lora, "embeddings": result.embeddings, "history": result.history, "step": result.step,
            "per_image": result.per_image, "warnings": result.warnings}


class DCOTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCOTrainer",
            display_name="DCO Trainer (SDXL LoRA + tokens)",
            category="DCO/training",
            description=(
                "Train a DCO (Direct Consistency Optimization) LoRA for SDXL from a folder of images with .txt "
                "captions, or from images in the graph with one caption each; subjects also learn new tokens such "
                "as <dog> in both text encoders. The LoRA goes to the loras folder and the tokens to the embeddings "
                "folder; the outputs are ready for reward guidance."
            ),
            is_output_node=True,
            is_input_list=True,  # the image and text lists of dataset nodes arrive whole (see node_values)
            inputs=[
                io.Model.Input("model", tooltip="The SDXL MODEL to fine-tune (from Load Checkpoint). It is not modified."),
                io.Clip.Input("clip", tooltip="The SDXL CLIP of the same checkpoint. It is not modified."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the training images (once, before training)."),
                io.String.Input("dataset_dir", default="dco/my_subject",
                                tooltip="A folder of images with same-name .txt captions, or a reference config.json; "
                                        "absolute, or relative to ComfyUI's input folder. Leave it empty when images "
                                        "are connected."),
                io.String.Input("config_name", default="", optional=True,
                                tooltip="Which entry of config.json to train (only for a config.json dataset)."),
                io.Combo.Input("preset", options=["subject", "style"], default="subject",
                               tooltip="Recipe: subject = tokens, rank 32, 2000 steps; style = no tokens, rank 64, "
                                       "1000 steps, offset noise 0.1."),
                io.String.Input("tokens", default="<dog>=dog",
                                tooltip="New tokens and the word each starts from, e.g. <dog>=dog. Every caption must "
                                        "contain one. Leave empty for styles."),
                io.String.Input("output_name", default="dco_subject",
                                tooltip="File name in models/loras and models/embeddings (no folders outside them)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Allow replacing existing files and earlier checkpoints of this name."),
                io.Int.Input("steps", default=widget_default("steps"), min=0, max=100000,
                             tooltip="Training steps; 0 = the preset's (2000 subject, 1000 style)."),
                io.Int.Input("rank", default=widget_default("rank"), min=0, max=256,
                             tooltip="LoRA rank; 0 = the preset's (32 subject, 64 style)."),
                io.Float.Input("learning_rate", default=widget_default("learning_rate"), min=1e-7, max=1e-2, step=1e-6,
                               tooltip="UNet LoRA learning rate (5e-5 in both recipes)."),
                io.Float.Input("text_encoder_lr", default=widget_default("text_encoder_lr"), min=1e-8, max=1e-2, step=1e-7,
                               tooltip="Learning rate of the token rows (5e-6)."),
                io.Float.Input("beta", default=widget_default("beta"), min=-1.0, max=100000.0, step=10.0,
                               tooltip="DCO beta: 1000-2000 keep the model close to the base; 0 or less trains the "
                                       "plain DreamBooth-LoRA loss."),
                io.Int.Input("resolution", default=widget_default("resolution"), min=64, max=4096, step=64,
                             tooltip="Training resolution in pixels: folder images are resized and centre-cropped "
                                     "to a square; connected images go to aspect-ratio buckets of about this many "
                                     "pixels squared."),
                io.Int.Input("batch_size", default=widget_default("batch_size"), min=1, max=64, tooltip="Images per step."),
                io.Float.Input("offset_noise", default=widget_default("offset_noise"), min=-1.0, max=1.0, step=0.01,
                               tooltip="Offset-noise strength; -1 = the preset's (0 subject, 0.1 style)."),
                io.Int.Input("seed", default=widget_default("seed"), min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of data order, noise and timesteps (runs are reproducible)."),
                io.Combo.Input("mixed_precision", options=list(MIXED_PRECISION_OPTIONS),
                               default=widget_default("mixed_precision"),
                               tooltip="auto = bf16 where the GPU has it, else fp16; no = fp32 (needed on the CPU)."),
                io.Boolean.Input("gradient_checkpointing",
                                 default=widget_default("gradient_checkpointing"),
                                 tooltip="Less VRAM for more time (about 30% slower)."),
                io.Boolean.Input("use_8bit_adam", default=widget_default("use_8bit_adam"),
                                 tooltip="8-bit AdamW from bitsandbytes (must be installed): less optimizer memory."),
                io.Int.Input("checkpoint_every", default=widget_default("checkpoint_every"), min=0, max=100000,
                             tooltip="Save a resumable checkpoint every N steps (0 = only when cancelled)."),
                io.Combo.Input("resume", options=["off", "latest"], default="off",
                               tooltip="latest = continue the newest checkpoint of this output_name exactly."),
                io.String.Input("validation_prompt", default="", optional=True, multiline=True,
                                tooltip="Optional prompt (with tokens) rendered with reward guidance as a preview."),
                io.Int.Input("validation_every", default=widget_default("validation_every"), min=0, max=100000, optional=True,
                             tooltip="Render the preview every N steps (0 = never). A preview costs about 5 "
                                     "training steps (shown on the monitor): at 250, about 2% of a run."),
                io.Image.Input("images", optional=True,
                               tooltip="Train on these images instead of dataset_dir (then leave dataset_dir empty): "
                                       "a batch, or a list of images of different sizes (e.g. from Load Image and "
                                       "Text Dataset from Folder), which train in aspect-ratio buckets."),
                io.String.Input("captions", default="", optional=True, multiline=True,
                                tooltip="One caption per connected image, one per line in the order of the images, or "
                                        "a linked list of texts. With tokens each names the subject, e.g. 'a photo of "
                                        "a <dog> on the grass'; a style may leave them empty."),
            ],
            outputs=[
                io.Model.Output("trained_model", display_name="MODEL",
                                tooltip="The input MODEL with the new LoRA applied (for model_ft of the RG guider)."),
                io.Clip.Output("trained_clip", display_name="CLIP",
                               tooltip="The input CLIP with the LoRA and the new tokens loaded."),
                io.String.Output("lora_name", display_name="lora_name", tooltip="The LoRA file, as LoraLoader lists it."),
                io.String.Output("embeddings_name", display_name="embeddings_name",
                                 tooltip="The embeddings file, as DCO Load Token Embeddings lists it (empty for styles)."),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="Loss, errors, prior drift and fit over the run."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, dataset_dir: Any = None, preset: Any = None, tokens: Any = None, output_name: Any = None,
                        overwrite: Any = None, resume: Any = None, mixed_precision: Any = None, images: Any = None,
                        captions: Any = None) -> bool | str:
        """Refuse a request that cannot train before anything loads.

        The inputs are named (no **kwargs): ComfyUI attaches the message to each input this takes
        and range-checks only the inputs it does not take. The combos are all taken, because
        ComfyUI v0.3.64 checks the options of V1 combos only, never a V3 node's. Each arrives as a
        list (`is_input_list`); a linked one as `(None,)`, an unconnected optional one not at all.
        """
        try:
            v = node_values(dict(dataset_dir=dataset_dir, preset=preset, tokens=tokens, output_name=output_name,
                                 overwrite=overwrite, resume=resume, mixed_precision=mixed_precision, images=images,
                                 captions=captions))
            if v["mixed_precision"] is not None and v["mixed_precision"] not in MIXED_PRECISION_OPTIONS:
                raise DCOError(f"mixed_precision {v['mixed_precision']!r} is not an option; choose one of "
                               f"{', '.join(MIXED_PRECISION_OPTIONS)}.")
            check_request(v["dataset_dir"], v["preset"], v["tokens"], v["output_name"], v["overwrite"], v["resume"],
                          v["images"], v["captions"])
        except DCOError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, dataset_dir: Any = "", images: Any = None, captions: Any = None, **kwargs: Any) -> str:
        """Re-run when the dataset's files change, not only when a widget does; images and captions
        are hashed as well. (ComfyUI resolves no link here, so linked images arrive as None; its
        cache already re-runs the node when the node upstream of them changes.)"""
        dataset_dir = one_value("dataset_dir", dataset_dir) or ""
        digest = hashlib.sha256(dataset_dir.encode())
        for caption in caption_list(captions) or []:
            digest.update(b"\ncaption|" + caption.encode())
        for image in image_list(images) or []:
            if image is not None:
                digest.update(f"\nimage|{tuple(image.shape)}|".encode())
                digest.update(image.detach().float().cpu().contiguous().numpy().tobytes())
        try:
            path = resolve_dataset(dataset_dir)
        except DCOError:
            return digest.hexdigest()
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        for f in files:
            st = f.stat()
            digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        return digest.hexdigest()

    @classmethod
    def execute(cls, **inputs: Any) -> io.NodeOutput:
        """ComfyUI hands every input over as a list (`is_input_list`); `node_values` unwraps them."""
        return cls.run(**node_values(inputs))

    @classmethod
    def run(cls, model: Any, clip: Any, vae: Any, dataset_dir: str, output_name: str, overwrite: bool = False,
            resume: str = "off", preset: str = "subject", tokens: str = "", config_name: str = "",
            validation_prompt: str = "", images: list[torch.Tensor] | None = None, captions: list[str] | None = None,
            **widgets: Any) -> io.NodeOutput:
        """Train on one value per input. `widgets` are the config widgets of WIDGET_FIELDS; a missing
        one takes its default. `images` are single [H, W, C] images, `captions` one per image."""
        import comfy.sd
        import comfy.utils

        from ..dco_train.data import spec_from_images
        from ..dco_train.formats import load_embeddings
        from ..dco_train.plot import curve_image
        from .convert import check_sdxl
        from .embeddings import add_tokens

        require_engine()
        captions = captions or []
        check_request(dataset_dir, preset, tokens, output_name, overwrite, resume, images, captions)
        check_sdxl(model)
        dataset = resolve_dataset(dataset_dir) if images is None else None
        cfg = build_config(dataset, preset=preset, tokens=tokens, config_name=config_name,
                           validation_prompt=validation_prompt,
                           **{w: widgets.get(w, widget_default(w)) for w in WIDGET_FIELDS})
        spec = None if images is None else spec_from_images(images, captions or [""] * len(images), cfg)
        plan = plan_outputs(output_name, overwrite, resume, cfg.train_text_encoder_ti)
        node_id = str(cls.hidden.unique_id) if getattr(cls, "hidden", None) is not None else ""
        out = train_in_graph(model, clip, vae, cfg, plan, resume, node_id, spec=spec)

        lora_sd = comfy.utils.load_torch_file(str(out["lora"]), safe_load=True)
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
        if out["embeddings"] is not None:
            new_clip = add_tokens(new_clip, load_embeddings(out["embeddings"]), source=Path(out["embeddings"]).name)
        lora_name = _relative(out["lora"], "loras")
        emb_name = _relative(out["embeddings"], "embeddings")
        events.send(events.FILES_CHANGED, {"lora": lora_name, "embeddings": emb_name})
        curve = _image_tensor(curve_image(out["history"], f"DCO {output_name}: {out['step']} steps",
                                          per_image=out["per_image"], warnings=out["warnings"]))
        return io.NodeOutput(new_model, new_clip, lora_name, emb_name, curve, ui=ui.PreviewImage(curve, cls=cls))
