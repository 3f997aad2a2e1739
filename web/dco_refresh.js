// dco.refresh: when the trainer writes a LoRA / embeddings file, refresh every model dropdown
// (LoraLoader, DCO Load Token Embeddings, ...) without a restart or a page reload.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { FILES_CHANGED_EVENT } from "./dco_shared.js";

export const refreshed = { count: 0, last: null };

app.registerExtension({
  name: "dco.refresh",

  setup() {
    api.addEventListener(FILES_CHANGED_EVENT, async ({ detail }) => {
      try {
        await app.refreshComboInNodes();
        refreshed.count += 1;
        refreshed.last = detail ?? null;
      } catch (error) {
        console.warn("ComfyUI-DCO: could not refresh the model lists after training; press R to refresh them.", error);
      }
    });
  },
});
