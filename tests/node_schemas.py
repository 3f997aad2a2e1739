"""Our nodes' inputs and outputs, read statically from `nodes/*.py` (no ComfyUI needed).

Each node's `define_schema` returns `io.Schema(node_id=..., inputs=[io.X.Input("id", ...)...],
outputs=[...])`. This module walks that code with `ast`: input lists may be literals, sums of
lists, or calls to module-level helper functions that return one (`_common_inputs()`). Anything
else raises `SchemaParseError`, so a schema written another way fails the tests loudly instead of
being skipped. `tests/comfy/test_comfy_frontend.py` checks the result against ComfyUI's live
`/object_info` on both supported versions, so the parse itself cannot drift either.

Used by `tests/test_workflows.py` (example workflows' `widgets_values` against the current inputs)
and by the README node-reference check.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NODES_DIR = ROOT / "nodes"

# io.<Class> -> the socket type ComfyUI reports
IO_TYPES = {
    "Model": "MODEL", "Clip": "CLIP", "Vae": "VAE", "Conditioning": "CONDITIONING", "Latent": "LATENT",
    "Image": "IMAGE", "Mask": "MASK", "Guider": "GUIDER", "Sampler": "SAMPLER", "Sigmas": "SIGMAS",
    "Noise": "NOISE", "Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN", "Combo": "COMBO",
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control widget to these unless told not to


class SchemaParseError(RuntimeError):
    pass


@dataclass
class Socket:
    name: str
    type: str
    optional: bool = False
    tooltip: str | None = None
    options: list[Any] | None = None  # static Combo options, when written as a literal
    control_after_generate: bool | None = None
    display_name: str | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    @property
    def has_control(self) -> bool:
        """Whether the frontend adds a `control_after_generate` widget after this one."""
        if self.type != "INT":
            return False
        if self.control_after_generate is None:
            return self.name in SEED_NAMES
        return bool(self.control_after_generate)


@dataclass
class NodeSchema:
    node_id: str
    class_name: str
    file: str
    display_name: str = ""
    category: str = ""
    description: str = ""
    inputs: list[Socket] = field(default_factory=list)
    outputs: list[Socket] = field(default_factory=list)

    def ordered_inputs(self) -> list[Socket]:
        """Required inputs, then optional ones: the order /object_info and the frontend use."""
        return [s for s in self.inputs if not s.optional] + [s for s in self.inputs if s.optional]

    def widget_inputs(self) -> list[Socket]:
        """Widgets in the order the frontend creates them: required inputs, then optional ones."""
        widgets = [s for s in self.inputs if s.is_widget]
        return [s for s in widgets if not s.optional] + [s for s in widgets if s.optional]

    def widget_slots(self) -> list[tuple[Socket, bool]]:
        """One entry per value in a workflow's `widgets_values`: (input, is_its_control_widget)."""
        out: list[tuple[Socket, bool]] = []
        for s in self.widget_inputs():
            out.append((s, False))
            if s.has_control:
                out.append((s, True))
        return out

    def link_inputs(self) -> list[Socket]:
        return [s for s in self.inputs if not s.is_widget]


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        return None


class _ModuleParser:
    def __init__(self, path: Path):
        self.path = path
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, ast.FunctionDef)}
        self.constants = {}  # module-level string constants (shared tooltips)
        for n in self.tree.body:
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name):
                value = _literal(n.value)
                if isinstance(value, str):
                    self.constants[n.targets[0].id] = value

    def text(self, node: ast.AST | None) -> Any:
        if isinstance(node, ast.Name) and node.id in self.constants:
            return self.constants[node.id]
        return _literal(node) if node is not None else None

    def fail(self, node: ast.AST, what: str) -> SchemaParseError:
        return SchemaParseError(
            f"{self.path.name}:{getattr(node, 'lineno', '?')}: cannot read {what} statically; write it as a list of "
            "io.<Type>.Input(...) / .Output(...) calls (or a module-level helper returning one), or teach "
            "tests/node_schemas.py the new form."
        )

    def items(self, expr: ast.AST, what: str) -> list[ast.Call]:
        if isinstance(expr, (ast.List, ast.Tuple)):
            out = []
            for e in expr.elts:
                if isinstance(e, ast.Starred):
                    out += self.items(e.value, what)
                elif isinstance(e, ast.Call):
                    out.append(e)
                else:
                    raise self.fail(e, what)
            return out
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self.items(expr.left, what) + self.items(expr.right, what)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in self.functions:
            returns = [n for n in ast.walk(self.functions[expr.func.id]) if isinstance(n, ast.Return)]
            if len(returns) != 1 or returns[0].value is None:
                raise self.fail(expr, what)
            return self.items(returns[0].value, what)
        raise self.fail(expr, what)

    def socket(self, call: ast.Call, kind: str) -> Socket:
        func = call.func
        if not (isinstance(func, ast.Attribute) and func.attr == kind):
            raise self.fail(call, f"an {kind.lower()}")
        base = func.value
        if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "io":
            if base.attr not in IO_TYPES:
                raise self.fail(call, f"the socket type io.{base.attr}")
            typ = IO_TYPES[base.attr]
        elif (isinstance(base, ast.Call) and isinstance(base.func, ast.Attribute) and base.func.attr == "Custom"
              and base.args and isinstance(_literal(base.args[0]), str)):
            typ = _literal(base.args[0])
        else:
            raise self.fail(call, "a socket type")
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        name = _literal(call.args[0]) if call.args else _literal(kw["id"]) if "id" in kw else None
        if kind == "Input" and not isinstance(name, str):
            raise self.fail(call, "an input id")
        options = _literal(kw["options"]) if "options" in kw else None
        return Socket(
            name=name or "", type=typ, optional=bool(_literal(kw.get("optional", ast.Constant(False)))),
            tooltip=self.text(kw.get("tooltip")),
            options=list(options) if isinstance(options, (list, tuple)) else None,
            control_after_generate=_literal(kw["control_after_generate"]) if "control_after_generate" in kw else None,
            display_name=_literal(kw["display_name"]) if "display_name" in kw else None,
        )

    def schemas(self) -> list[NodeSchema]:
        found = []
        for cls in [n for n in self.tree.body if isinstance(n, ast.ClassDef)]:
            method = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "define_schema"), None)
            if method is None:
                continue
            call = next((c for c in ast.walk(method) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                         and c.func.attr == "Schema"), None)
            if call is None:
                raise self.fail(method, f"{cls.name}.define_schema (no io.Schema call)")
            kw = {k.arg: k.value for k in call.keywords if k.arg}
            node_id = _literal(kw.get("node_id"))
            if not isinstance(node_id, str):
                raise self.fail(call, f"{cls.name}'s node_id")
            found.append(NodeSchema(
                node_id=node_id, class_name=cls.name, file=self.path.name,
                display_name=self.text(kw.get("display_name")) or "", category=self.text(kw.get("category")) or "",
                description=self.text(kw.get("description")) or "",
                inputs=[self.socket(c, "Input") for c in self.items(kw["inputs"], "inputs")] if "inputs" in kw else [],
                outputs=[self.socket(c, "Output") for c in self.items(kw["outputs"], "outputs")] if "outputs" in kw else [],
            ))
        return found


def registered_classes(nodes_dir: Path = NODES_DIR) -> list[str]:
    """Class names `nodes/registry.py` registers (from its imports inside node_classes())."""
    tree = ast.parse((nodes_dir / "registry.py").read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names += [a.name for a in node.names]
    return names


def load(nodes_dir: Path = NODES_DIR) -> dict[str, NodeSchema]:
    """Every node the pack registers, by node id."""
    by_class: dict[str, NodeSchema] = {}
    for path in sorted(nodes_dir.glob("*.py")):
        for schema in _ModuleParser(path).schemas():
            by_class[schema.class_name] = schema
    out = {}
    for name in registered_classes(nodes_dir):
        if name not in by_class:
            raise SchemaParseError(f"nodes/registry.py registers {name}, but no class of that name has a define_schema.")
        out[by_class[name].node_id] = by_class[name]
    return out


# ----------------------------------------------------------------------------- README node reference
REFERENCE_START = "<!-- node-reference:start (generated by: python tests/node_schemas.py) -->"
REFERENCE_END = "<!-- node-reference:end -->"


CATEGORY_ORDER = ("DCO/training", "DCO/loaders", "DCO/conditioning", "DCO/sampling")


def _cell(text: str | None) -> str:
    """Markdown-safe: `<dog>` would otherwise vanish as an HTML tag."""
    return (text or "").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|").replace("\n", " ")


def reference_markdown(schemas: dict[str, NodeSchema] | None = None) -> str:
    """The README's node reference: each node's inputs and outputs, from the schemas' own tooltips."""
    schemas = schemas or load()
    out = [REFERENCE_START, ""]
    def rank(s: NodeSchema) -> tuple:
        return (CATEGORY_ORDER.index(s.category) if s.category in CATEGORY_ORDER else len(CATEGORY_ORDER), s.display_name)

    for schema in sorted(schemas.values(), key=rank):
        out += [f"### {_cell(schema.display_name)} (`{schema.node_id}`, {schema.category})", "", _cell(schema.description), "",
                "| input | type | |", "|---|---|---|"]
        for s in schema.inputs:
            typ = s.type.lower() if s.is_widget else s.type
            if s.options:
                typ += ": " + " / ".join(f"`{o}`" for o in s.options)
            out.append(f"| `{s.name}`{' (optional)' if s.optional else ''} | {typ} | {_cell(s.tooltip)} |")
        out += ["", "| output | type | |", "|---|---|---|"]
        for s in schema.outputs:
            out.append(f"| `{s.display_name or s.name}` | {s.type} | {_cell(s.tooltip)} |")
        out.append("")
    return "\n".join(out + [REFERENCE_END])


if __name__ == "__main__":
    import sys

    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if REFERENCE_START not in text or REFERENCE_END not in text:
        sys.exit(f"README.md has no {REFERENCE_START} ... {REFERENCE_END} block to fill.")
    head, rest = text.split(REFERENCE_START, 1)
    tail = rest.split(REFERENCE_END, 1)[1]
    readme.write_text(head + reference_markdown() + tail, encoding="utf-8")
    print("README.md node reference updated")
