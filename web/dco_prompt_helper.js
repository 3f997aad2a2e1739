// dco.prompt_helper: DCO Prompt Pair shows the base prompt it will encode while the user types
// ("a photo of <dog> on a beach" -> "a photo of dog on a beach"), or the error the node would raise.
//
// The token -> word map comes from what feeds the node's token_clip input, walked upstream the way
// the CLIP travels: a DCO Load Token Embeddings node (the words its file records, read through
// GET /dco/embeddings, see nodes/routes.py), a DCO Load Subject (its token CLIP: what its LoRA(s)
// record, read through GET /dco/subject; its base CLIP is its own clip input), a DCO Trainer (its
// `tokens` widget), and any CLIP -> CLIP node in between (LoraLoader, ...). The rule itself is web/dco_prompt_rules.js, a mirror of the
// Python node. The widget is not serialised.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  EMBEDDINGS_ROUTE, FILES_CHANGED_EVENT, LOAD_EMBEDDINGS_NODE, LOAD_SUBJECT_NODE, PROMPT_PAIR_NODE, SUBJECT_ROUTE,
  TRAINER_NODE, chainMethod,
} from "./dco_shared.js";
import { basePrompt, loaderWordMap, parseTrainerTokens, parseWordMap, subjectWordMap } from "./dco_prompt_rules.js";

const MAX_DEPTH = 32;
const POLL_MS = 400; // how often the helpers look upstream when no frame is drawn (Nodes 2.0)
const NO_LORA = "none"; // nodes/subject.py NO_LORA
const FROM_LORA = "(from the LoRA file)"; // nodes/subject.py FROM_LORA
const SUBJECT_TOKEN_CLIP = 2; // DCO Load Subject's outputs: base MODEL, fine-tuned MODEL, token CLIP, base CLIP
const files = new Map(); // route + file name -> {state: "pending"|"ok"|"error", file, error}
const helpers = new Set();

/** What `route` (GET /dco/embeddings or /dco/subject) answers for the file `name`, fetched once. */
function fileInfo(route, name) {
  const key = `${route}?${name}`;
  let entry = files.get(key);
  if (!entry) {
    entry = { state: "pending" };
    files.set(key, entry);
    api
      .fetchApi(`${route}?name=${encodeURIComponent(name)}`)
      .then(async (res) => {
        const body = await res.json().catch(() => ({}));
        if (!res.ok) throw new Error(body.error || `GET ${route} answered ${res.status}`);
        Object.assign(entry, { state: "ok", file: body });
      })
      .catch((error) => Object.assign(entry, { state: "error", error: String(error.message ?? error) }))
      .finally(() => helpers.forEach((h) => h.update(true)));
  }
  return entry;
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

/** The node and output slot feeding `node`'s input `name` (by name, or by index when a number). */
function inputOrigin(node, name) {
  const slot = typeof name === "number" ? name : node.inputs?.findIndex((i) => i.name === name);
  if (slot === undefined || slot < 0) return null;
  const linkId = node.inputs?.[slot]?.link;
  if (linkId === null || linkId === undefined) return null;
  const graph = node.graph;
  const link = graph?.getLink?.(linkId) ?? graph?.links?.get?.(linkId) ?? graph?.links?.[linkId];
  if (!link) return null;
  const origin = graph.getNodeById(link.origin_id);
  return origin ? { node: origin, slot: link.origin_slot } : null;
}

/**
 * The token -> word map of the CLIP arriving at `node`'s input `name`:
 * {known: Map, note: string|null, pending: bool}; `note` says why it is only a guess.
 */
function clipWordMap(node, name, depth = 0) {
  const origin = inputOrigin(node, name);
  if (!origin) return { known: new Map(), note: depth === 0 ? "token_clip is not connected" : null, pending: false };
  if (depth > MAX_DEPTH) return { known: new Map(), note: "the CLIP's path is too long to follow", pending: false };
  const src = origin.node;
  if (src.type === LOAD_EMBEDDINGS_NODE) {
    const up = clipWordMap(src, "clip", depth + 1);
    const file = widgetValue(src, "embeddings");
    if (!file) return { ...up, note: "DCO Load Token Embeddings has no file selected" };
    const info = fileInfo(EMBEDDINGS_ROUTE, file);
    if (info.state === "pending") return { ...up, pending: true };
    if (info.state === "error") return { ...up, note: `${file}: ${info.error}` };
    try {
      return { ...up, known: new Map([...up.known, ...loaderWordMap(info.file, widgetValue(src, "tokens"), file)]) };
    } catch (error) {
      return { ...up, note: error.message };
    }
  }
  if (src.type === LOAD_SUBJECT_NODE) {
    const up = clipWordMap(src, "clip", depth + 1);
    return origin.slot === SUBJECT_TOKEN_CLIP ? subjectTokens(src, up) : up; // the base CLIP passes through
  }
  if (src.type === TRAINER_NODE) {
    const up = clipWordMap(src, "clip", depth + 1);
    try {
      const own = parseTrainerTokens(widgetValue(src, "tokens"));
      const fromConfig = !own.size && String(widgetValue(src, "dataset_dir") ?? "").toLowerCase().endsWith(".json");
      return {
        ...up,
        known: new Map([...up.known, ...own]),
        note: fromConfig ? "the trainer takes its tokens from config.json, which the page cannot read" : up.note,
      };
    } catch (error) {
      return { ...up, note: error.message };
    }
  }
  if (src.isSubgraphNode?.()) return { known: new Map(), note: "the CLIP comes out of a subgraph", pending: false };
  const clipInput = src.type === "Reroute" ? 0 : src.inputs?.findIndex((i) => i.type === "CLIP");
  if (clipInput === undefined || clipInput < 0) return { known: new Map(), note: null, pending: false }; // a loader
  return clipWordMap(src, clipInput, depth + 1);
}

/** DCO Load Subject's token CLIP: `up` (its clip input) plus the tokens of lora_name and lora_2. */
function subjectTokens(src, up) {
  const picks = [[widgetValue(src, "lora_name"), widgetValue(src, "embeddings"), widgetValue(src, "tokens")]];
  const second = widgetValue(src, "lora_2");
  if (second && second !== NO_LORA) picks.push([second, FROM_LORA, ""]);
  let known = up.known;
  for (const [name, embeddings, typed] of picks) {
    if (!name) return { ...up, note: "DCO Load Subject has no LoRA selected" };
    const lora = fileInfo(SUBJECT_ROUTE, name);
    const chosen = embeddings && embeddings !== FROM_LORA ? fileInfo(EMBEDDINGS_ROUTE, embeddings) : null;
    if (lora.state === "pending" || chosen?.state === "pending") return { ...up, pending: true };
    for (const [file, info] of [[name, lora], [embeddings, chosen]]) {
      if (info?.state === "error") return { ...up, note: `${file}: ${info.error}` };
    }
    try {
      known = new Map([...known, ...subjectWordMap(lora.file, { chosen: chosen?.file ?? null, typed, loraName: name })]);
    } catch (error) {
      return { ...up, note: error.message };
    }
  }
  return { ...up, known };
}

class PromptHelper {
  constructor(node) {
    this.node = node;
    this.signature = null;
    this.result = { base: null, error: null, note: null, pending: false, known: [] };
    this.root = document.createElement("div");
    Object.assign(this.root.style, {
      boxSizing: "border-box", width: "100%", height: "100%", overflow: "auto", font: "11px sans-serif",
      padding: "3px 6px", borderRadius: "4px", background: "rgba(0,0,0,0.25)", whiteSpace: "pre-wrap",
      wordBreak: "break-word",
    });
    helpers.add(this);
  }

  update(force = false) {
    const node = this.node;
    const text = String(widgetValue(node, "text") ?? "");
    const wordMap = String(widgetValue(node, "word_map") ?? "");
    const { known, note, pending } = clipWordMap(node, "token_clip");
    const signature = JSON.stringify([text, wordMap, [...known], note, pending]);
    if (!force && signature === this.signature) return;
    this.signature = signature;
    let base = null;
    let error = null;
    if (!pending) {
      try {
        base = basePrompt(text, known, parseWordMap(wordMap));
      } catch (e) {
        error = e.message;
      }
    }
    this.result = { base, error, note, pending, known: [...known] };
    this.render();
  }

  render() {
    const { base, error, note, pending } = this.result;
    this.root.replaceChildren();
    const line = (label, text, color) => {
      const div = document.createElement("div");
      const b = document.createElement("b");
      b.textContent = label;
      div.append(b, document.createTextNode(text));
      div.style.color = color;
      this.root.append(div);
    };
    if (pending) line("base prompt: ", "reading the token files…", "#aaa");
    else if (error) {
      if (note) line("note: ", note, "#e9b96e"); // the likely cause first
      line("⚠ ", error, "#f88");
      return;
    } else line("base prompt: ", base, "#cfc");
    if (note) line("note: ", note, "#e9b96e");
  }

  dispose() {
    helpers.delete(this);
  }
}

app.registerExtension({
  name: "dco.prompt_helper",

  setup() {
    api.addEventListener(FILES_CHANGED_EVENT, () => {
      files.clear(); // a retrained file may record other tokens
      helpers.forEach((h) => h.update(true));
    });
    setInterval(() => helpers.forEach((h) => h.update()), POLL_MS);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== PROMPT_PAIR_NODE) return;

    chainMethod(nodeType, "onNodeCreated", function () {
      const helper = new PromptHelper(this);
      const widget = this.addDOMWidget("dco_base_prompt", "dco_base_prompt", helper.root, {
        getMinHeight: () => 44,
        getMaxHeight: () => 120,
        hideOnZoom: true,
        serialize: false,
      });
      widget.serialize = false;
      this.dcoPromptHelper = helper;
      for (const name of ["text", "word_map"]) {
        const w = this.widgets?.find((x) => x.name === name);
        if (!w) continue;
        const callback = w.callback;
        w.callback = function (...args) {
          const r = callback?.apply(this, args);
          helper.update();
          return r;
        };
        w.element?.addEventListener?.("input", () => helper.update());
      }
      helper.update(true);
    });
    chainMethod(nodeType, "onConnectionsChange", function () {
      this.dcoPromptHelper?.update();
    });
    chainMethod(nodeType, "onConfigure", function () {
      this.dcoPromptHelper?.update(true);
    });
    // Upstream widgets (the loader's file, the trainer's tokens) change without telling this node;
    // checking on each frame is cheap because update() does nothing when the inputs are unchanged.
    // Nodes 2.0 does not draw nodes on the canvas (no onDrawForeground): a slow timer covers it.
    chainMethod(nodeType, "onDrawForeground", function () {
      this.dcoPromptHelper?.update();
    });
    chainMethod(nodeType, "onRemoved", function () {
      this.dcoPromptHelper?.dispose();
    });
  },
});
