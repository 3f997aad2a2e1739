"""Rebuild `example_workflows/` (JSON + thumbnail), the README screenshots and the stock-node snapshot.

    ~/ComfyUI/.venv/bin/python tests/comfy/make_workflows.py      # or COMFYUI_PATH=... for another tree

It starts a throwaway ComfyUI server with the pack, opens the page in headless Chromium, builds each
graph of `workflows.SPECS` with the frontend's own LiteGraph API and exports `app.graph.serialize()`,
so the files are exactly what the frontend writes. Run it after changing a node's inputs (the
workflow checks fail until then) and look at the images it writes. It also rewrites
`tests/data/stock_nodes.json` from the server's `/object_info`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402

ROOT = harness.REPO_ROOT
WORKFLOWS = ROOT / "example_workflows"
DOCS = ROOT / "docs"
STOCK_FILE = ROOT / "tests" / "data" / "stock_nodes.json"
VIEW = {"left": 70, "top": 100, "right": 30, "bottom": 80}  # room for the frontend's side and top bars


def jpeg(png: bytes, box: dict | None, max_width: int, quality: int, margin: int = 12) -> bytes:
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB")
    if box:
        x0, y0 = max(0, int(box["x"]) - margin), max(0, int(box["y"]) - margin)
        x1 = min(im.width, int(box["x"] + box["width"]) + margin)
        y1 = min(im.height, int(box["y"] + box["height"]) + margin)
        im = im.crop((x0, y0, x1, y1))
    if im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
    return out.getvalue()


def stock_snapshot(object_info: dict, types: list[str]) -> dict:
    from workflow_rules import schema_from_object_info, schema_to_json

    return {
        "about": "Stock ComfyUI nodes used by example_workflows/, as /object_info describes them (v0.8.0 and v0.3.64 "
                 "agree). Written by tests/comfy/make_workflows.py; tests/comfy/test_comfy_frontend.py checks it "
                 "against both versions. inputs: [name, type, optional, has a control_after_generate widget].",
        "nodes": {t: schema_to_json(schema_from_object_info(t, object_info[t])) for t in sorted(types)},
    }


def dump_snapshot(snapshot: dict) -> str:
    """JSON with one node per block and one input per line (readable diffs)."""
    lines = ["{", f'  "about": {json.dumps(snapshot["about"])},', '  "nodes": {']
    items = list(snapshot["nodes"].items())
    for i, (name, node) in enumerate(items):
        inputs = ",\n".join(f"      {json.dumps(x)}" for x in node["inputs"])
        lines += [f"    {json.dumps(name)}: {{", '      "inputs": [', inputs, "      ],",
                  f'      "outputs": {json.dumps(node["outputs"])}', "    }" + ("," if i < len(items) - 1 else "")]
    return "\n".join(lines + ["  }", "}"]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="workflow names to rebuild (default: all)")
    args = ap.parse_args()

    harness.import_comfy()
    from browser import Browser
    from test_comfy_server import Server
    from workflows import BUILD_JS, FIT_JS, SPECS, write_demo_models, write_settings
    from workflow_rules import FRONTEND_ONLY

    base = Path(tempfile.mkdtemp(prefix="dco-make-workflows-"))
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-DCO")
    write_settings(base)
    write_demo_models(base)
    server = Server(base)
    try:
        with Browser(1600, 1000) as b:
            b.open(server.url)
            b.wait_for("!!(window.app?.graph && document.querySelector('#graph-canvas') && "
                       "app.extensions.some((e) => e.name === 'dco.train_monitor'))", 120)
            b.eval("app.canvas.setDirty(true, true)")
            types: set[str] = set()
            for spec in SPECS:
                if args.only and spec["name"] not in args.only:
                    continue
                wf = b.eval(f"({BUILD_JS})({json.dumps(spec)})")
                # the README screenshot: the whole graph, and the view the file opens with
                box = b.eval(f"({FIT_JS})({json.dumps({'margin': VIEW})})")
                ds = b.eval("({scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset]})")
                DOCS.mkdir(exist_ok=True)
                (DOCS / f"{spec['name']}.jpg").write_bytes(jpeg(b.screenshot_bytes(), box, 1400, 72))
                # the Templates browser thumbnail: the DCO nodes, 4:3
                box = b.eval(f"({FIT_JS})({json.dumps({'margin': VIEW, 'ids': spec['thumb'], 'aspect': 4 / 3})})")
                (WORKFLOWS / f"{spec['name']}.jpg").write_bytes(jpeg(b.screenshot_bytes(), box, 480, 80, margin=0))
                wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-dco/{spec['name']}"))
                wf.setdefault("extra", {})["ds"] = ds
                (WORKFLOWS / f"{spec['name']}.json").write_text(json.dumps(wf, indent=2) + "\n", encoding="utf-8")
                types |= {n["type"] for n in wf["nodes"]}
                print(f"{spec['name']}: {len(wf['nodes'])} nodes, {len(wf['links'])} links")
            ours = {t for t in types if t.startswith("DCO")}
            stock = sorted(types - ours - set(FRONTEND_ONLY))
            if not args.only:
                info = server.get("/object_info")
                STOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
                STOCK_FILE.write_text(dump_snapshot(stock_snapshot(info, stock)), encoding="utf-8")
            errors = [e for e in b.errors() if "/extensions/ComfyUI-DCO/" in (e.get("url") or "") + e["text"]]
            if errors:
                print("errors from the pack's JS:", json.dumps(errors, indent=1), file=sys.stderr)
                return 1
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
