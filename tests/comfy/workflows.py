"""The example workflows as data, and the page-side code that builds, loads and frames graphs.

`example_workflows/*.json` are made from `SPECS` by the real frontend: `make_workflows.py` builds
each graph in a headless ComfyUI page with the LiteGraph API (so sizes, slot types and
`widgets_values` are whatever the frontend itself writes), exports `app.graph.serialize()`, and
takes the thumbnails and README screenshots. The browser test uses the same helpers to load the
files and to derive a tiny-model variant to run.

A spec lists nodes (`id`, `type`, layout column, widget values by input name, optional `title` and
`size`), links `(from id, output slot, to id, input name)`, and the node ids its thumbnail frames.
Seeds are "fixed".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CKPT = "sd_xl_base_1.0.safetensors"
NEGATIVE = "blurry, low quality, deformed, watermark, text"
SUBJECT_PROMPT = "a <dog> playing saxophone on a beach at sunset"
MERGE_PROMPT = "a <dog> playing saxophone in flat cartoon illustration style"
STYLE_PROMPT = "a cat wearing a hat in flat cartoon illustration style"


def _note(node_id: int, col: int, text: str) -> dict[str, Any]:
    return {"id": node_id, "type": "Note", "col": col, "widgets": {"": text}, "size": [330, 150]}


def _sampling_chain(first: int, model: int, model_ft: int, pair: int, neg: int, vae: int, prefix: str,
                    col: int, model_ft_slot: int = 0) -> tuple[list[dict[str, Any]], list[tuple]]:
    """RG guider -> SamplerCustomAdvanced -> VAE Decode -> Save Image, with its noise, sampler,
    sigmas and latent nodes (ids from `first`)."""
    g, noise, sampler, sched, latent, adv, dec, save = range(first, first + 8)
    nodes = [
        {"id": g, "type": "DCORewardGuidanceGuider", "col": col, "widgets": {"cfg": 7.5, "rg": 3.0}},
        {"id": noise, "type": "RandomNoise", "col": col, "widgets": {"noise_seed": 42}},
        {"id": sampler, "type": "KSamplerSelect", "col": col, "widgets": {"sampler_name": "dpmpp_2m"}},
        {"id": sched, "type": "BasicScheduler", "col": col,
         "widgets": {"scheduler": "karras", "steps": 30, "denoise": 1.0}},
        {"id": latent, "type": "EmptyLatentImage", "col": col,
         "widgets": {"width": 1024, "height": 1024, "batch_size": 1}},
        {"id": adv, "type": "SamplerCustomAdvanced", "col": col + 1},
        {"id": dec, "type": "VAEDecode", "col": col + 1},
        {"id": save, "type": "SaveImage", "col": col + 2, "widgets": {"filename_prefix": prefix}, "size": [420, 470]},
    ]
    links = [
        (model, 0, g, "model"), (model_ft, model_ft_slot, g, "model_ft"), (pair, 0, g, "positive_token"),
        (pair, 1, g, "positive_base"), (neg, 0, g, "negative"), (model, 0, sched, "model"),
        (noise, 0, adv, "noise"), (g, 0, adv, "guider"), (sampler, 0, adv, "sampler"), (sched, 0, adv, "sigmas"),
        (latent, 0, adv, "latent_image"), (adv, 0, dec, "samples"), (vae, 2, dec, "vae"), (dec, 0, save, "images"),
    ]
    return nodes, links


def _trainer(node_id: int, col: int, **widgets: Any) -> dict[str, Any]:
    return {"id": node_id, "type": "DCOTrainer", "col": col, "widgets": widgets}


def _training(note: str, prompt: str, **trainer: Any) -> tuple[list[dict[str, Any]], list[tuple]]:
    """Load Checkpoint, a how-to note, the trainer, DCO Prompt Pair on its CLIP and a negative prompt (ids 1-5)."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "col": 0, "widgets": {"ckpt_name": CKPT}},
        _note(2, 0, note),
        _trainer(3, 1, **trainer),
        {"id": 4, "type": "DCOPromptPair", "col": 2, "widgets": {"text": prompt, "word_map": ""}},
        {"id": 5, "type": "CLIPTextEncode", "col": 2, "widgets": {"text": NEGATIVE}, "title": "Negative prompt"},
    ]
    links = [(1, 0, 3, "model"), (1, 1, 3, "clip"), (1, 2, 3, "vae"), (3, 1, 4, "token_clip"), (1, 1, 4, "base_clip"),
             (1, 1, 5, "clip")]
    return nodes, links


def train_subject() -> dict[str, Any]:
    nodes, links = _training(
        "1. Put 4-10 photos of your subject with same-name .txt captions in ComfyUI/input/dco/dog "
        "(e.g. dog1.jpg + dog1.txt: 'a photo of a <dog> on the grass').\n2. Run. The LoRA goes to "
        "models/loras/dco_dog.safetensors, the <dog> token to models/embeddings/dco_dog.safetensors.\n"
        "3. The image on the right is sampled with reward guidance right after training.",
        SUBJECT_PROMPT, dataset_dir="dco/dog", preset="subject", tokens="<dog>=dog", output_name="dco_dog",
        validation_prompt="a <dog> playing saxophone", validation_every=250)
    more, more_links = _sampling_chain(6, model=1, model_ft=3, pair=4, neg=5, vae=1, prefix="dco/dog", col=3)
    return {"name": "dco_train_subject", "nodes": nodes + more, "links": links + more_links, "thumb": [1, 3, 4, 6]}


def train_style() -> dict[str, Any]:
    nodes, links = _training(
        "1. Put 1-10 images in one style with .txt captions in ComfyUI/input/dco/style (no tokens: "
        "describe the content and name the style, e.g. 'a house in flat cartoon illustration style').\n"
        "2. Run: the style recipe trains rank 64 for 1000 steps with offset noise 0.1 and writes "
        "models/loras/dco_style.safetensors.",
        STYLE_PROMPT, dataset_dir="dco/style", preset="style", tokens="", output_name="dco_style", offset_noise=0.1,
        validation_prompt=STYLE_PROMPT, validation_every=250)
    nodes += [
        {"id": 6, "type": "EmptyLatentImage", "col": 2, "widgets": {"width": 1024, "height": 1024, "batch_size": 1}},
        {"id": 7, "type": "DCORewardGuidanceSampler", "col": 3,
         "widgets": {"seed": 42, "steps": 30, "cfg": 7.5, "rg": 3.0, "sampler_name": "dpmpp_2m",
                     "scheduler": "karras", "denoise": 1.0}},
        {"id": 8, "type": "VAEDecode", "col": 4},
        {"id": 9, "type": "SaveImage", "col": 4, "widgets": {"filename_prefix": "dco/style"}, "size": [420, 470]},
    ]
    links += [(1, 0, 7, "model"), (3, 0, 7, "model_ft"), (4, 0, 7, "positive_token"), (4, 1, 7, "positive_base"),
              (5, 0, 7, "negative"), (6, 0, 7, "latent_image"), (7, 0, 8, "samples"), (1, 2, 8, "vae"),
              (8, 0, 9, "images")]
    return {"name": "dco_train_style", "nodes": nodes, "links": links, "thumb": [3, 4, 7]}


def subject_rg() -> dict[str, Any]:
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "col": 0, "widgets": {"ckpt_name": CKPT}},
        {"id": 2, "type": "LoraLoader", "col": 0, "title": "Load subject LoRA",
         "widgets": {"lora_name": "dco_dog.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        {"id": 3, "type": "DCOLoadTokenEmbeddings", "col": 1,
         "widgets": {"embeddings": "dco_dog.safetensors", "tokens": ""}},
        {"id": 4, "type": "DCOPromptPair", "col": 1, "widgets": {"text": SUBJECT_PROMPT, "word_map": ""}},
        {"id": 5, "type": "CLIPTextEncode", "col": 1, "widgets": {"text": NEGATIVE}, "title": "Negative prompt"},
        _note(20, 0, "Sampling with reward guidance from a trained subject: the stock LoraLoader gives model_ft, "
                     "the token embeddings teach the CLIP <dog>, and DCO Prompt Pair writes the base prompt "
                     "('a dog ...'). rg trades subject fidelity (higher) against prompt fidelity (lower); "
                     "rg 0 is plain CFG with the fine-tuned model."),
    ]
    links = [(1, 0, 2, "model"), (1, 1, 2, "clip"), (2, 1, 3, "clip"), (3, 0, 4, "token_clip"), (1, 1, 4, "base_clip"),
             (1, 1, 5, "clip")]
    more, more_links = _sampling_chain(6, model=1, model_ft=2, pair=4, neg=5, vae=1, prefix="dco/subject_rg", col=2)
    return {"name": "dco_subject_rg", "nodes": nodes + more, "links": links + more_links, "thumb": [2, 3, 4, 6]}


def subject_style_merge() -> dict[str, Any]:
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "col": 0, "widgets": {"ckpt_name": CKPT}},
        {"id": 2, "type": "LoraLoader", "col": 0, "title": "Load subject LoRA",
         "widgets": {"lora_name": "dco_dog.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        {"id": 3, "type": "LoraLoader", "col": 0, "title": "Load style LoRA",
         "widgets": {"lora_name": "dco_style.safetensors", "strength_model": 1.0, "strength_clip": 1.0}},
        {"id": 4, "type": "DCOLoadTokenEmbeddings", "col": 1,
         "widgets": {"embeddings": "dco_dog.safetensors", "tokens": ""}},
        {"id": 5, "type": "DCOPromptPair", "col": 1, "widgets": {"text": MERGE_PROMPT, "word_map": ""}},
        {"id": 6, "type": "CLIPTextEncode", "col": 1, "widgets": {"text": NEGATIVE}, "title": "Negative prompt"},
        {"id": 7, "type": "EmptyLatentImage", "col": 1, "widgets": {"width": 1024, "height": 1024, "batch_size": 1}},
        {"id": 8, "type": "DCORewardGuidanceSampler", "col": 2,
         "widgets": {"seed": 42, "steps": 30, "cfg": 7.5, "rg": 3.0, "sampler_name": "dpmpp_2m",
                     "scheduler": "karras", "denoise": 1.0}},
        {"id": 9, "type": "VAEDecode", "col": 3},
        {"id": 10, "type": "SaveImage", "col": 3, "widgets": {"filename_prefix": "dco/merge"}, "size": [420, 470]},
        _note(11, 0, "Subject + style: DCO LoRAs merge without post-processing, so chain the two stock LoRA "
                     "loaders and sample with reward guidance. model_ft carries both LoRAs; the base model and "
                     "the base prompt stay plain."),
    ]
    links = [(1, 0, 2, "model"), (1, 1, 2, "clip"), (2, 0, 3, "model"), (2, 1, 3, "clip"), (3, 1, 4, "clip"),
             (4, 0, 5, "token_clip"), (1, 1, 5, "base_clip"), (1, 1, 6, "clip"), (1, 0, 8, "model"),
             (3, 0, 8, "model_ft"), (5, 0, 8, "positive_token"), (5, 1, 8, "positive_base"), (6, 0, 8, "negative"),
             (7, 0, 8, "latent_image"), (8, 0, 9, "samples"), (1, 2, 9, "vae"), (9, 0, 10, "images")]
    return {"name": "dco_subject_style_merge", "nodes": nodes, "links": links, "thumb": [2, 3, 4, 5, 8]}


def load_subject() -> dict[str, Any]:
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "col": 0, "widgets": {"ckpt_name": CKPT}},
        {"id": 2, "type": "DCOLoadSubject", "col": 0,
         "widgets": {"lora_name": "dco_dog.safetensors", "strength": 1.0, "lora_2": "none", "strength_2": 1.0,
                     "embeddings": "(from the LoRA file)", "tokens": ""}},
        {"id": 4, "type": "DCOPromptPair", "col": 1, "widgets": {"text": SUBJECT_PROMPT, "word_map": ""}},
        {"id": 5, "type": "CLIPTextEncode", "col": 1, "widgets": {"text": NEGATIVE}, "title": "Negative prompt"},
        _note(20, 1, "One pick of the trained LoRA: DCO Load Subject finds its embeddings file (named and hashed in "
                     "the LoRA), teaches the CLIP <dog>, and gives both models, both CLIPs and the cfg / rg the "
                     "training recommends. Pick a style LoRA in lora_2 for the subject + style merge. "
                     "rg_start / rg_end on the guider limit reward guidance to part of the schedule."),
    ]
    links = [(1, 0, 2, "model"), (1, 1, 2, "clip"), (2, 2, 4, "token_clip"), (2, 3, 4, "base_clip"),
             (2, 3, 5, "clip")]
    more, more_links = _sampling_chain(6, model=2, model_ft=2, pair=4, neg=5, vae=1, prefix="dco/load_subject",
                                       col=2, model_ft_slot=1)
    more_links += [(2, 4, 6, "cfg"), (2, 5, 6, "rg")]
    return {"name": "dco_load_subject", "nodes": nodes + more, "links": links + more_links, "thumb": [2, 4, 6]}


SPECS = [train_subject(), train_style(), subject_rg(), subject_style_merge(), load_subject()]
NAMES = [s["name"] for s in SPECS]

GENERATED_CAPTIONS = ["a photo of a <obj> on a table", "a photo of a <obj> in the snow", "a photo of a <obj> on the beach"]


def train_on_generated(loader: str = "DCOTestTinySDXL", size: int = 64, steps: int = 3) -> dict[str, Any]:
    """The issue-13 acceptance graph (not shipped): stock nodes generate three images (Empty Latent
    Image -> KSampler -> VAE Decode), DCO Trainer learns <obj> from them with one caption per line,
    and the trained MODEL/CLIP sample through the RG guider. Sized for the tiny test SDXL; the ids
    match `_sampling_chain`'s layout so a browser test can build it with BUILD_JS."""
    pos, neg, latent, ksampler, decode, trainer, pair = 2, 3, 4, 5, 6, 7, 8
    nodes = [
        {"id": 1, "type": loader, "col": 0, "widgets": {"seed": 0} if loader == "DCOTestTinySDXL" else {"ckpt_name": CKPT}},
        {"id": pos, "type": "CLIPTextEncode", "col": 1, "widgets": {"text": "a photo of a toy"}},
        {"id": neg, "type": "CLIPTextEncode", "col": 1, "widgets": {"text": "blurry"}, "title": "Negative prompt"},
        {"id": latent, "type": "EmptyLatentImage", "col": 1, "widgets": {"width": size, "height": size, "batch_size": 3}},
        {"id": ksampler, "type": "KSampler", "col": 2,
         "widgets": {"seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        {"id": decode, "type": "VAEDecode", "col": 2},
        _trainer(trainer, 3, dataset_dir="", preset="subject", tokens="<obj>=toy", output_name="dco_generated",
                 steps=steps, rank=4, learning_rate=1e-3, text_encoder_lr=1e-3, resolution=size, mixed_precision="no",
                 checkpoint_every=0, validation_every=0, captions="\n".join(GENERATED_CAPTIONS)),
        {"id": pair, "type": "DCOPromptPair", "col": 4, "widgets": {"text": "a photo of a <obj> on the grass", "word_map": ""}},
    ]
    links = [
        (1, 1, pos, "clip"), (1, 1, neg, "clip"), (1, 0, ksampler, "model"), (pos, 0, ksampler, "positive"),
        (neg, 0, ksampler, "negative"), (latent, 0, ksampler, "latent_image"), (ksampler, 0, decode, "samples"),
        (1, 2, decode, "vae"), (1, 0, trainer, "model"), (1, 1, trainer, "clip"), (1, 2, trainer, "vae"),
        (decode, 0, trainer, "images"), (trainer, 1, pair, "token_clip"), (1, 1, pair, "base_clip"),
    ]
    more, more_links = _sampling_chain(9, model=1, model_ft=trainer, pair=pair, neg=neg, vae=1, prefix="dco_generated",
                                       col=4)
    for node in more:  # the tiny model's sizes and a short schedule
        if node["type"] == "EmptyLatentImage":
            node["widgets"] = {"width": size, "height": size, "batch_size": 1}
        elif node["type"] == "BasicScheduler":
            node["widgets"] = {"scheduler": "normal", "steps": 2, "denoise": 1.0}
        elif node["type"] == "KSamplerSelect":
            node["widgets"] = {"sampler_name": "euler"}
    return {"name": "dco_train_on_generated", "nodes": nodes + more, "links": links + more_links,
            "thumb": [ksampler, trainer, pair]}


def api_prompt(spec: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """A spec as an API-format prompt (what POST /prompt takes): each node's widget values from the
    spec, the rest from its defaults in `/object_info`, and the links by input name."""
    prompt: dict[str, Any] = {}
    for node in spec["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        info = object_info[node["type"]]["input"]
        inputs: dict[str, Any] = {}
        for section in ("required", "optional"):
            for name, entry in (info.get(section) or {}).items():
                raw, opts = entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if name in node.get("widgets", {}):
                    inputs[name] = node["widgets"][name]
                elif "default" in opts:
                    inputs[name] = opts["default"]
                elif section == "required" and (isinstance(raw, list) or raw == "COMBO"):
                    inputs[name] = (raw if isinstance(raw, list) else opts["options"])[0]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    for src, slot, dst, name in spec["links"]:
        prompt[str(dst)]["inputs"][name] = [str(src), slot]
    return prompt

# ----------------------------------------------------------------------------- server and page set-up
# No first-run template dialog, no minimap or canvas info over the screenshots.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


def write_settings(base_dir: Path) -> None:
    """The frontend settings of a throwaway server's default user."""
    user = base_dir / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS), encoding="utf-8")


def write_demo_models(base_dir: Path, hidden: tuple[int, int] = (768, 1280)) -> None:
    """Small stand-ins for the files the workflows name, so the prompt helper and the dropdowns show
    what a user who trained them would see: a <dog> embeddings file with its word (rows of `hidden`,
    the CLIP-L / CLIP-G widths: SDXL's, or the tiny test model's to run it), and the LoRA
    dco_dog.safetensors that records it as training does (formats.subject_metadata; no weights, so
    it leaves the model as it is)."""
    import torch
    from safetensors.torch import save_file

    import harness

    formats = harness.pack_module("dco_train.formats")
    emb = base_dir / "models" / "embeddings"
    emb.mkdir(parents=True, exist_ok=True)
    rows = {"clip_l": torch.zeros(1, hidden[0]), "clip_g": torch.zeros(1, hidden[1])}
    tokens = {formats.META_TOKENS: '["<dog>"]', formats.META_INITIALIZERS: '["dog"]'}
    save_file(rows, str(emb / "dco_dog.safetensors"), metadata=tokens)
    loras = base_dir / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    meta = {**tokens, **formats.subject_metadata(emb / "dco_dog.safetensors", cfg=6.0, rg=2.5)}
    save_file({}, str(loras / "dco_dog.safetensors"), metadata=meta)


# ----------------------------------------------------------------------------- page-side helpers
# Each is a JS function expression; call it with `(<fn>)(args)` in Browser.eval.

BUILD_JS = r"""
async (spec) => {
  const graph = app.graph;
  graph.clear();
  const byId = {};
  for (const s of spec.nodes) {
    const node = LiteGraph.createNode(s.type);
    if (!node) throw new Error(`The frontend has no node type ${s.type}.`);
    node.id = s.id;
    graph.add(node);
    if (s.title) node.title = s.title;
    for (const [name, value] of Object.entries(s.widgets ?? {})) {
      const w = name === "" ? node.widgets?.[0] : node.widgets?.find((x) => x.name === name);
      if (!w) throw new Error(`${s.type} has no widget ${name}.`);
      w.value = value;
    }
    for (const w of node.widgets ?? []) for (const c of w.linkedWidgets ?? []) c.value = "fixed";
    byId[s.id] = node;
  }
  for (const [from, slot, to, input] of spec.links) {
    const dst = byId[to];
    const idx = dst.inputs.findIndex((i) => i.name === input);
    if (idx < 0) throw new Error(`${dst.type} has no input ${input}.`);
    if (!byId[from].connect(slot, dst, idx)) throw new Error(`Could not link ${from}:${slot} -> ${to}.${input}.`);
  }
  // layout: columns left to right, nodes stacked in spec order
  const cols = {};
  for (const s of spec.nodes) (cols[s.col] ??= []).push(s);
  let x = 0;
  for (const c of Object.keys(cols).map(Number).sort((a, b) => a - b)) {
    let y = 0, width = 0;
    for (const s of cols[c]) {
      const node = byId[s.id];
      const size = node.computeSize();
      node.setSize([Math.max(size[0], s.size?.[0] ?? 0, node.size[0]), Math.max(size[1], s.size?.[1] ?? 0, node.size[1])]);
      node.pos = [x, y + LiteGraph.NODE_TITLE_HEIGHT];
      y += node.size[1] + LiteGraph.NODE_TITLE_HEIGHT + 30;
      width = Math.max(width, node.size[0]);
    }
    x += width + 50;
  }
  app.canvas.setDirty(true, true);
  return graph.serialize();
}
"""

LOAD_JS = r"""
async (url) => {
  const data = await (await fetch(url)).json();
  await app.loadGraphData(data);
  await new Promise((r) => setTimeout(r, 300));
  const missing = app.graph.nodes.filter((n) => n.has_errors || !LiteGraph.registered_node_types[n.type]).map((n) => n.type);
  const byId = Object.fromEntries(data.nodes.map((n) => [n.id, n]));
  const mismatched = [];
  for (const node of app.graph.nodes) {
    const saved = byId[node.id]?.widgets_values ?? [];
    const now = node.serialize().widgets_values ?? [];
    if (JSON.stringify(saved) !== JSON.stringify(now)) mismatched.push({ type: node.type, saved, now });
  }
  return { nodes: app.graph.nodes.length, missing, mismatched };
}
"""

# Frame the nodes `ids` (all when empty) in the visible canvas, widened to `aspect` (width / height)
# when given; returns the framed box in page pixels.
FIT_JS = r"""
async ({margin, ids = [], aspect = 0}) => {
  const nodes = ids.length ? app.graph.nodes.filter((n) => ids.includes(n.id)) : app.graph.nodes;
  const th = LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th - 16); // 16: the node badge
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  if (aspect) {
    const w = x1 - x0, h = y1 - y0;
    if (w / h < aspect) { const grow = (h * aspect - w) / 2; x0 -= grow; x1 += grow; }
    else { const grow = (w / aspect - h) / 2; y0 -= grow; y1 += grow; }
  }
  const el = app.canvas.canvas;
  const rect = el.getBoundingClientRect();
  const w = rect.width - margin.left - margin.right, h = rect.height - margin.top - margin.bottom;
  const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1.2);
  const ds = app.canvas.ds;
  ds.scale = scale;
  const ox = (margin.left + (w - (x1 - x0) * scale) / 2) / scale - x0;
  const oy = (margin.top + (h - (y1 - y0) * scale) / 2) / scale - y0;
  ds.offset[0] = ox; ds.offset[1] = oy;
  app.canvas.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  await new Promise((r) => setTimeout(r, 400));
  return { x: rect.left + (x0 + ox) * scale, y: rect.top + (y0 + oy) * scale,
           width: (x1 - x0) * scale, height: (y1 - y0) * scale, scale };
}
"""
