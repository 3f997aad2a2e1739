// The page's mirror of DCO Prompt Pair's base-prompt rule (web/dco_prompt_rules.js), run on the same
// cases as the Python code (tests/data/prompt_cases.json): `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  PromptRuleError, basePrompt, loaderWordMap, parseTokenList, parseTrainerTokens, parseWordMap, replaceTokens,
  subjectWordMap,
} from "../../web/dco_prompt_rules.js";

const cases = JSON.parse(readFileSync(new URL("../data/prompt_cases.json", import.meta.url), "utf8"));
const asMap = (obj) => new Map(Object.entries(obj));

function expectCase(c, run, label) {
  if (c.error) {
    assert.throws(run, (e) => e instanceof PromptRuleError && e.message.includes(c.error), label);
  } else {
    return run();
  }
}

for (const c of cases.base_prompt) {
  test(`base prompt: ${JSON.stringify(c.text)} with ${JSON.stringify(c.word_map)}`, () => {
    const out = expectCase(c, () => basePrompt(c.text, asMap(c.known), parseWordMap(c.word_map)), c.error);
    if (!c.error) assert.equal(out, c.base);
  });
}

for (const c of cases.trainer_tokens) {
  test(`trainer tokens: ${JSON.stringify(c.spec)}`, () => {
    const out = expectCase(c, () => parseTrainerTokens(c.spec), c.error);
    if (!c.error) assert.deepEqual(Object.fromEntries(out), c.map);
  });
}

for (const c of cases.loader) {
  test(`loader: file ${JSON.stringify(c.file_tokens)} typed ${JSON.stringify(c.typed)}`, () => {
    const file = { tokens: c.file_tokens, words: c.file_words, rows: { clip_l: c.rows, clip_g: c.rows } };
    const out = expectCase(c, () => loaderWordMap(file, c.typed, "x.safetensors"), c.error);
    if (!c.error) assert.deepEqual([...out], Object.entries(c.map), "the order is the file's row order");
  });
}

test("the shared case file has cases of every kind", () => {
  assert.ok(cases.base_prompt.filter((c) => c.error).length >= 3);
  assert.ok(cases.base_prompt.filter((c) => !c.error).length >= 5);
  assert.ok(cases.trainer_tokens.length >= 3 && cases.loader.length >= 3 && cases.subject.length >= 3);
});

test("replace tokens: longest first, whitespace tidied", () => {
  assert.equal(replaceTokens(" a <dog>2\t<dog> ", new Map([["<dog>", "dog"], ["<dog>2", "puppy"]])), "a puppy dog");
});

test("token lists split on commas and whitespace", () => {
  assert.deepEqual(parseTokenList(" <a>,<b>  <c>,, "), ["<a>", "<b>", "<c>"]);
  assert.deepEqual(parseTokenList(undefined), []);
});

for (const c of cases.subject) {
  test(`load subject: LoRA ${JSON.stringify(c.lora.tokens)} typed ${JSON.stringify(c.typed)}${c.chosen ? " with a chosen file" : ""}`, () => {
    const run = () => subjectWordMap(c.lora, { chosen: c.chosen ?? null, typed: c.typed, loraName: "s.safetensors" });
    const out = expectCase(c, run, c.error);
    if (!c.error) assert.deepEqual([...out], Object.entries(c.map), "the order is the file's row order");
  });
}
