"""HTTP routes for the frontend (web/): only what the page cannot know by itself.

`GET /dco/embeddings?name=<embeddings file>` (also under `/api/`) answers
`{"name", "tokens": [...], "words": [...], "recorded": bool, "rows": {"clip_l": n, "clip_g": n}}`:
the tokens an embeddings file records in its metadata, the plain word each one started from (in row
order), and how many rows each encoder has. DCO Prompt Pair's
helper in the page uses them to show the base prompt while the user types. Only the metadata is
read, never the tensors, and only files ComfyUI lists in its embeddings folders are answered.

`GET /dco/subject?name=<LoRA file>` answers `{"name", "tokens", "words", "embeddings", "cfg", "rg"}`:
what a LoRA's metadata tells DCO Load Subject (dco_train.formats.read_subject_metadata; empty lists
and nulls for a file that records nothing), so the page can follow a token CLIP back to its LoRA.

Routes are registered only when ComfyUI's `PromptServer.instance` exists (never at plain import,
so the pack still imports without a server).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..dco_train.formats import EMBED_KEYS, META_INITIALIZERS, META_TOKENS

log = logging.getLogger(__name__)

EMBEDDINGS_ROUTE = "/dco/embeddings"  # web/dco_shared.js EMBEDDINGS_ROUTE
SUBJECT_ROUTE = "/dco/subject"  # web/dco_shared.js SUBJECT_ROUTE
_registered: list[Any] = []


def token_metadata(path: str) -> dict[str, Any]:
    """Tokens and initializer words recorded in an embeddings file, and its row count per encoder
    (from the header: no tensor is read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        rows = {}
        for key in EMBED_KEYS:
            if key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                rows[key] = int(shape[0]) if len(shape) > 1 else 1
    tokens = json.loads(meta[META_TOKENS]) if META_TOKENS in meta else []
    words = json.loads(meta[META_INITIALIZERS]) if META_INITIALIZERS in meta else []
    if not isinstance(tokens, list) or not isinstance(words, list):
        raise ValueError(f"the {META_TOKENS} / {META_INITIALIZERS} metadata is not a list")
    words = [str(w) for w in words] + [""] * max(0, len(tokens) - len(words))
    return {"tokens": [str(t) for t in tokens], "words": words[: len(tokens)], "recorded": META_TOKENS in meta,
            "rows": rows}


async def embeddings_info(request: Any) -> Any:
    from aiohttp import web

    import folder_paths

    name = request.query.get("name", "")
    if not name:
        return web.json_response({"error": "Give the embeddings file as ?name=<file>."}, status=400)
    if name not in folder_paths.get_filename_list("embeddings"):
        return web.json_response(
            {"error": f"The embeddings file {name!r} is not in ComfyUI's embeddings folder(s)."}, status=404
        )
    path = folder_paths.get_full_path("embeddings", name)
    try:
        info = token_metadata(path)
    except Exception as exc:  # noqa: BLE001 - a broken file is the user's to fix; say which
        return web.json_response({"error": f"Cannot read the metadata of {name}: {exc}."}, status=422)
    return web.json_response({"name": name, **info})


def subject_info(path: str, name: str) -> dict[str, Any]:
    """A LoRA file's subject metadata, from its header only."""
    from ..dco_train.formats import read_metadata, read_subject_metadata

    info = read_subject_metadata(read_metadata(path), name)
    return {"tokens": info.tokens, "words": info.words, "embeddings": info.embeddings, "cfg": info.cfg, "rg": info.rg}


async def lora_subject(request: Any) -> Any:
    from aiohttp import web

    import folder_paths

    name = request.query.get("name", "")
    if not name:
        return web.json_response({"error": "Give the LoRA file as ?name=<file>."}, status=400)
    if name not in folder_paths.get_filename_list("loras"):
        return web.json_response({"error": f"The LoRA {name!r} is not in ComfyUI's loras folder(s)."}, status=404)
    try:
        info = subject_info(folder_paths.get_full_path("loras", name), name)
    except Exception as exc:  # noqa: BLE001 - a broken file is the user's to fix; say which
        return web.json_response({"error": f"Cannot read the metadata of {name}: {exc}".rstrip(".") + "."}, status=422)
    return web.json_response({"name": name, **info})


def register() -> bool:
    """Add the routes to ComfyUI's server; False (and nothing done) without a running server."""
    if _registered:
        return True
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    server.routes.get(EMBEDDINGS_ROUTE)(embeddings_info)
    server.routes.get(SUBJECT_ROUTE)(lora_subject)
    _registered.append(server)
    log.debug("ComfyUI-DCO: registered %s and %s", EMBEDDINGS_ROUTE, SUBJECT_ROUTE)
    return True
