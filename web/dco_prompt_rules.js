// The base-prompt rule of DCO Prompt Pair, mirrored from Python so the page can show the derived
// prompt while the user types. Pure ES module (no DOM, no ComfyUI imports): Node's test runner
// checks it against the same cases as the Python code (tests/data/prompt_cases.json).
//
// Python sources mirrored here:
//   nodes/embeddings.py  parse_tokens, parse_word_map, base_prompt, and how DCOLoadTokenEmbeddings /
//                        add_tokens build the token CLIP's token -> word map
//   dco_train/text.py    replace_tokens
//   dco_train/config.py  parse_tokens (the trainer's "tokens" widget, "<dog>=dog, <hat>=hat")
//   nodes/subject.py     subject_embeddings (DCO Load Subject's token CLIP)

const TOKEN_LIKE = /<[^<>\s()]+>/g;

/** A rule violation, worded like the Python node's error. */
export class PromptRuleError extends Error {}

function pyRepr(s) {
  return s.includes("'") && !s.includes('"') ? `"${s}"` : `'${s.replaceAll("'", "\\'")}'`;
}

/** DCO Load Token Embeddings' `tokens` widget: "<dog>, <cat>" -> ["<dog>", "<cat>"]. */
export function parseTokenList(text) {
  return (text ?? "").split(/[\s,]+/).filter(Boolean);
}

/** DCO Prompt Pair's `word_map` widget: "<dog>=dog, <cat>=cat" -> Map. Throws on a bad entry. */
export function parseWordMap(text) {
  const out = new Map();
  for (const raw of (text ?? "").split(/[,\n]+/)) {
    const entry = raw.trim();
    if (!entry) continue;
    const at = entry.indexOf("=");
    const token = at < 0 ? "" : entry.slice(0, at).trim();
    if (at < 0 || !token) {
      throw new PromptRuleError(`The word map entry ${pyRepr(entry)} is not of the form <token>=word, e.g. <dog>=dog.`);
    }
    out.set(token, entry.slice(at + 1).trim());
  }
  return out;
}

/** The trainer's `tokens` widget ("<dog>=dog, <hat>=hat"; "<dog>" alone has no word) -> Map. */
export function parseTrainerTokens(spec) {
  const out = new Map();
  for (const raw of (spec ?? "").split(/[,\n;]/)) {
    const part = raw.trim();
    if (!part) continue;
    const at = part.indexOf("=");
    const token = (at < 0 ? part : part.slice(0, at)).trim();
    const word = at < 0 ? "" : part.slice(at + 1).trim();
    if (!token || /\s/.test(token)) {
      throw new PromptRuleError(`Cannot read the token entry ${pyRepr(part)}; write it as <token>=word, e.g. <dog>=dog.`);
    }
    if (out.has(token)) throw new PromptRuleError(`The token ${token} is listed twice in ${pyRepr(spec)}.`);
    out.set(token, word);
  }
  return out;
}

/**
 * The token -> word map a DCOLoadTokenEmbeddings node adds, from what its file records (`file`, as
 * GET /dco/embeddings answers: {tokens, words, rows: {clip_l, clip_g}}) and its `tokens` widget.
 * Typed tokens rename the file's rows in order and keep the recorded words positionally
 * (dco_train/formats.py load_embeddings and TokenEmbeddings).
 */
export function loaderWordMap(file, typedTokens, fileName = "the embeddings file") {
  const typed = parseTokenList(typedTokens);
  const words = file.words ?? [];
  let tokens;
  if (typed.length) tokens = typed;
  else if (file.tokens && file.tokens.length) tokens = file.tokens;
  else {
    throw new PromptRuleError(
      `${fileName} does not record its tokens (a reference learned_embeds file); type them in, e.g. <dog>, one per row in the file's order.`,
    );
  }
  for (const key of ["clip_l", "clip_g"]) {
    const rows = file.rows?.[key];
    if (typeof rows === "number" && rows < tokens.length) {
      throw new PromptRuleError(
        `The embeddings have ${rows} ${key} row(s) but ${tokens.length} token(s) (${tokens.join(", ")}); give at most ${rows} token(s).`,
      );
    }
  }
  return new Map(tokens.map((t, i) => [t, words[i] ?? ""]));
}

/**
 * The token -> word map one LoRA of a DCOLoadSubject node adds to its token CLIP (nodes/subject.py
 * subject_embeddings). `lora` is what GET /dco/subject answers ({tokens, words, embeddings});
 * `chosen` the GET /dco/embeddings answer for a file chosen in the node's `embeddings` input (null
 * for "(from the LoRA file)", where the LoRA's own tokens and words stand for the file it records);
 * `typed` the node's `tokens` widget ("<dog>=dog"), which renames the rows in order and sets words.
 * Empty for a LoRA without tokens (a style). Throws PromptRuleError.
 */
export function subjectWordMap(lora, { chosen = null, typed = "", loraName = "the LoRA" } = {}) {
  const own = parseTrainerTokens(typed);
  const recorded = new Map((lora.tokens ?? []).map((t, i) => [t, lora.words?.[i] ?? ""]));
  let file = chosen;
  if (!file && lora.embeddings) file = { tokens: lora.tokens ?? [], words: lora.words ?? [] };
  if (!file) {
    if (!own.size && !recorded.size) return new Map();
    const what = recorded.size && !own.size ? `records the tokens ${[...recorded.keys()].join(", ")}` : "has tokens typed in";
    throw new PromptRuleError(
      `${loraName} ${what} but does not name its embeddings file (it was trained before ComfyUI-DCO recorded ` +
        "it, or by another tool); choose the embeddings file in the embeddings input.",
    );
  }
  let rows;
  try {
    rows = loaderWordMap(file, [...own.keys()].join(", "), loraName);
  } catch (e) {
    throw new PromptRuleError(e.message.replace("type them in", "type them in the tokens input"));
  }
  return new Map([...rows].map(([t, w]) => [t, own.get(t) || w || recorded.get(t) || ""]));
}

/** dco_train/text.py replace_tokens: longest token first, whitespace tidied. */
const WORD_CHAR = /[\p{L}\p{N}_]/u;
const escapeRegExp = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** dco_train/text.py token_pattern: longest token first; a token that begins or ends with a letter
 * or digit (`sks`) only matches as a whole word, so `asks` is left alone. */
export function tokenPattern(tokens) {
  const parts = [...tokens].sort((a, b) => b.length - a.length).map((t) =>
    (WORD_CHAR.test(t[0]) ? "(?<![\\p{L}\\p{N}_])" : "") + escapeRegExp(t) +
    (WORD_CHAR.test(t.at(-1)) ? "(?![\\p{L}\\p{N}_])" : ""));
  return new RegExp(parts.join("|"), "gu");
}

export function replaceTokens(prompt, wordMap) {
  const out = wordMap.size ? prompt.replace(tokenPattern(wordMap.keys()), (m) => wordMap.get(m)) : prompt;
  return out.split(/\s+/).filter(Boolean).join(" ");
}

/**
 * nodes/embeddings.py base_prompt: `text` with every token replaced by its plain word. `known` is the
 * token CLIP's map (Map token -> word, "" when the file records none); `mapping` the word_map widget
 * (wins over the file; an empty word there deliberately drops the token). Throws PromptRuleError.
 */
export function basePrompt(text, known, mapping) {
  const words = new Map([...known, ...mapping]);
  const unknown = [...new Set(text.match(TOKEN_LIKE) ?? [])].filter((t) => !known.has(t)).sort();
  if (unknown.length) {
    throw new PromptRuleError(
      `The prompt names ${unknown.join(", ")}, which the token CLIP does not know. Load its embeddings with ` +
        "DCO Load Token Embeddings (and use that CLIP as token_clip), or remove it from the prompt.",
    );
  }
  const used = [...words.keys()].filter((t) => text.includes(t));
  const missing = used.filter((t) => !mapping.has(t) && !words.get(t));
  if (missing.length) {
    throw new PromptRuleError(
      `No plain word is known for ${missing.join(", ")} (the embeddings file does not record one); ` +
        `fill the word_map field, e.g. ${missing[0]}=dog.`,
    );
  }
  return replaceTokens(text, new Map(used.map((t) => [t, words.get(t)])));
}
