// Names shared with the Python side (keep in sync with nodes/events.py, nodes/routes.py and the node ids
// in nodes/; tests/test_web.py fails when they disagree), and the one hook helper every feature uses.
// No imports: Node's test runner loads this too.

export const TRAIN_EVENT = "dco.train"; // nodes/events.py TRAIN
export const FILES_CHANGED_EVENT = "dco.files_changed"; // nodes/events.py FILES_CHANGED

export const TRAINER_NODE = "DCOTrainer";
export const LOAD_EMBEDDINGS_NODE = "DCOLoadTokenEmbeddings";
export const PROMPT_PAIR_NODE = "DCOPromptPair";
export const LOAD_SUBJECT_NODE = "DCOLoadSubject"; // its token CLIP (output 2) carries the LoRA's tokens

// GET route of nodes/routes.py: the tokens and plain words an embeddings file records.
export const EMBEDDINGS_ROUTE = "/dco/embeddings";
// GET route of nodes/routes.py: the tokens, words, embeddings file and cfg / rg a LoRA records.
export const SUBJECT_ROUTE = "/dco/subject";

/**
 * Wrap `nodeType.prototype[name]` so the original runs first (its result is returned) and then
 * `after`, with the same `this` and arguments. Every node hook of the extension goes through this.
 */
export function chainMethod(nodeType, name, after) {
  const original = nodeType.prototype[name];
  nodeType.prototype[name] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}
