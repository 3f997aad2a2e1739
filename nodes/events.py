"""Websocket events the pack sends; web/ listens for the same names."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

TRAIN = "dco.train"  # one per training step, plus start / done / interrupted / error
FILES_CHANGED = "dco.files_changed"  # new LoRA / embeddings files: refresh the dropdowns


def send(event: str, data: dict[str, Any]) -> None:
    """Send to the client that queued the prompt (a no-op without a running server)."""
    # ComfyUI's main.py has imported `server` before any node runs. Importing it here instead would,
    # without a server (the engine's tests, a bench), re-run a failing import on every training step.
    prompt_server = getattr(sys.modules.get("server"), "PromptServer", None)
    server = getattr(prompt_server, "instance", None)
    if server is None:
        return
    try:
        server.send_sync(event, data, getattr(server, "client_id", None))
    except Exception:  # noqa: BLE001 - a closed socket must not stop training
        log.debug("could not send %s", event, exc_info=True)
