"""What a shipped example workflow must satisfy, as plain functions.

`check_workflow(workflow, schemas)` returns a list of problems (empty when the file is fine):
every node type is known, links agree with both ends, and each node's `widgets_values` line up
with its current widget inputs (count, value types, static combo options, fixed seeds).

The node schemas come from one of two places, and the tests use both:
- without ComfyUI (`tests/test_workflows.py`): our nodes parsed statically from `nodes/*.py`
  (`node_schemas.load()`) plus `tests/data/stock_nodes.json`, a snapshot of the stock nodes the
  workflows use;
- with ComfyUI (`tests/comfy/test_comfy_frontend.py`): the live `/object_info` of v0.8.0 and
  v0.3.64 through `schema_from_object_info`, which also proves the static parse and the snapshot
  right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node_schemas import CONTROL_VALUES, NodeSchema, Socket

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "example_workflows"
STOCK_FILE = Path(__file__).resolve().parent / "data" / "stock_nodes.json"

# Nodes that exist only in the frontend (no Python class, never sent to the server).
FRONTEND_ONLY = {"Note": 1, "MarkdownNote": 1}  # type -> number of widgets_values
PY_TYPES = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,), "COMBO": (str,)}


def workflow_files() -> list[Path]:
    return sorted(WORKFLOW_DIR.glob("*.json"))


def load_workflow(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


MODEL_FILE = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".sft", ".gguf")


def _is_file_list(options: list[Any]) -> bool:
    return not options or any(isinstance(o, str) and o.lower().endswith(MODEL_FILE) for o in options)


# ----------------------------------------------------------------------------- schemas
def schema_from_object_info(node_id: str, info: dict[str, Any]) -> NodeSchema:
    """A NodeSchema from one `/object_info` entry (the frontend's view of a node)."""
    inputs: list[Socket] = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {}) or {}
        names = order.get(section) or list(specs)
        for name in names:
            spec = specs[name]
            raw = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(raw, list):
                typ, options = "COMBO", list(raw)
            else:
                typ, options = str(raw), opts.get("options")
            if isinstance(options, list) and _is_file_list(options):
                options = None  # what this machine happens to have in its model folders
            if opts.get("forceInput"):
                typ = f"{typ}:socket"  # never a widget
            inputs.append(Socket(name=name, type=typ, optional=section == "optional", tooltip=opts.get("tooltip"),
                                 options=list(options) if isinstance(options, list) else None,
                                 control_after_generate=opts.get("control_after_generate")))
    outputs = [Socket(name=n, type=t) for t, n in zip(info.get("output", []), info.get("output_name", []))]
    return NodeSchema(node_id=node_id, class_name=node_id, file="object_info", display_name=info.get("display_name", ""),
                      category=info.get("category", ""), description=info.get("description", ""),
                      inputs=inputs, outputs=outputs)


def schema_to_json(schema: NodeSchema) -> dict[str, Any]:
    """The comparable part of a schema (what workflows depend on)."""
    return {
        "inputs": [[s.name, s.type, s.optional, s.has_control] for s in schema.ordered_inputs()],
        "outputs": [s.type for s in schema.outputs],
    }


def schema_from_json(node_id: str, data: dict[str, Any]) -> NodeSchema:
    inputs = [Socket(name=n, type=t, optional=o, control_after_generate=c) for n, t, o, c in data["inputs"]]
    return NodeSchema(node_id=node_id, class_name=node_id, file=str(STOCK_FILE.name), inputs=inputs,
                      outputs=[Socket(name="", type=t) for t in data["outputs"]])


def stock_schemas() -> dict[str, NodeSchema]:
    data = json.loads(STOCK_FILE.read_text(encoding="utf-8"))
    return {k: schema_from_json(k, v) for k, v in data["nodes"].items()}


# ----------------------------------------------------------------------------- checks
def _types_match(a: str, b: str) -> bool:
    if "*" in (a, b):
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def check_widgets(node: dict[str, Any], schema: NodeSchema) -> list[str]:
    where = f"node {node.get('id')} ({node.get('type')})"
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, dict):
        return [f"{where}: widgets_values is a dict; the example workflows use the list form."]
    slots = schema.widget_slots()
    if len(values) != len(slots):
        names = [f"{s.name}{' (control)' if c else ''}" for s, c in slots]
        return [f"{where}: {len(values)} widgets_values for {len(slots)} widgets ({', '.join(names)}); "
                "the node's inputs changed, so rebuild the workflow (tests/comfy/make_workflows.py)."]
    problems = []
    for (socket, is_control), value in zip(slots, values):
        if is_control:
            if value not in CONTROL_VALUES:
                problems.append(f"{where}: the control of {socket.name} is {value!r}, not one of {CONTROL_VALUES}.")
            elif value != "fixed":
                problems.append(f"{where}: {socket.name} is {value!r}; example seeds must be fixed.")
            continue
        ok = PY_TYPES[socket.type]
        if not isinstance(value, ok) or (socket.type in ("INT", "FLOAT") and isinstance(value, bool)):
            problems.append(f"{where}: {socket.name} = {value!r} is not a {socket.type}.")
        elif socket.type == "COMBO" and socket.options is not None and value not in socket.options:
            problems.append(f"{where}: {socket.name} = {value!r} is not one of {socket.options}.")
    return problems


def check_workflow(wf: dict[str, Any], schemas: dict[str, NodeSchema]) -> list[str]:
    problems: list[str] = []
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    if len(nodes) != len(wf.get("nodes", [])):
        problems.append("Two nodes share an id.")
    links = {}
    for link in wf.get("links", []):
        if not (isinstance(link, list) and len(link) == 6):
            problems.append(f"Link {link!r} is not [id, from node, from slot, to node, to slot, type].")
            continue
        if link[0] in links:
            problems.append(f"Two links share the id {link[0]}.")
        links[link[0]] = link
    if nodes and wf.get("last_node_id", 0) < max(nodes):
        problems.append(f"last_node_id {wf.get('last_node_id')} is below the largest node id {max(nodes)}.")
    if links and wf.get("last_link_id", 0) < max(links):
        problems.append(f"last_link_id {wf.get('last_link_id')} is below the largest link id {max(links)}.")

    for node in nodes.values():
        typ = node.get("type")
        where = f"node {node['id']} ({typ})"
        if typ in FRONTEND_ONLY:
            if len(node.get("widgets_values") or []) != FRONTEND_ONLY[typ]:
                problems.append(f"{where}: a note has exactly {FRONTEND_ONLY[typ]} widget value.")
            continue
        schema = schemas.get(typ)
        if schema is None:
            problems.append(f"{where}: {typ} is neither one of our nodes nor a known stock node.")
            continue
        problems += check_widgets(node, schema)
        sockets = {s.name: s for s in schema.inputs}
        for i, inp in enumerate(node.get("inputs") or []):
            sock = sockets.get(inp.get("name"))
            if sock is None:
                problems.append(f"{where}: input slot {i} is named {inp.get('name')!r}, which {typ} does not have.")
                continue
            link_id = inp.get("link")
            if link_id is None:
                if not sock.is_widget and not sock.optional:
                    problems.append(f"{where}: the required input {sock.name} is not connected.")
                continue
            link = links.get(link_id)
            if link is None:
                problems.append(f"{where}: input {sock.name} names link {link_id}, which does not exist.")
            elif link[3] != node["id"] or link[4] != i:
                problems.append(f"{where}: link {link_id} ends at node {link[3]} slot {link[4]}, not here (slot {i}).")
        for i, out in enumerate(node.get("outputs") or []):
            if i >= len(schema.outputs):
                problems.append(f"{where}: output slot {i} does not exist on {typ}.")
                continue
            for link_id in out.get("links") or []:
                link = links.get(link_id)
                if link is None:
                    problems.append(f"{where}: output {i} names link {link_id}, which does not exist.")
                elif link[1] != node["id"] or link[2] != i:
                    problems.append(f"{where}: link {link_id} starts at node {link[1]} slot {link[2]}, not here (slot {i}).")

    for link_id, (_, src, src_slot, dst, dst_slot, typ) in links.items():
        a, b = nodes.get(src), nodes.get(dst)
        if a is None or b is None:
            problems.append(f"Link {link_id} joins node {src} to node {dst}, but one of them does not exist.")
            continue
        sa, sb = schemas.get(a["type"]), schemas.get(b["type"])
        if sa is None or sb is None:
            continue
        if src_slot >= len(sa.outputs):
            problems.append(f"Link {link_id}: {a['type']} has no output slot {src_slot}.")
            continue
        inputs = b.get("inputs") or []
        if dst_slot >= len(inputs):
            problems.append(f"Link {link_id}: node {dst} has no input slot {dst_slot}.")
            continue
        outs = a.get("outputs") or []
        if src_slot >= len(outs) or link_id not in (outs[src_slot].get("links") or []):
            problems.append(f"Link {link_id} is missing from the links of node {src}'s output {src_slot}.")
        target = next((s for s in sb.inputs if s.name == inputs[dst_slot].get("name")), None)
        out_type = sa.outputs[src_slot].type
        if typ != out_type:
            problems.append(f"Link {link_id} is typed {typ} but {a['type']} output {src_slot} gives {out_type}.")
        if target is not None and not _types_match(out_type, target.type.split(":")[0]):
            problems.append(f"Link {link_id} feeds {out_type} into {b['type']}.{target.name}, which takes {target.type}.")
    return problems
