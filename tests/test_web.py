"""The frontend extension (web/) against the rules it lives by, without a browser.

- Event names, node ids and the route path in web/dco_shared.js equal the Python side's
  (nodes/events.py, nodes/*.py, nodes/routes.py): renaming one side fails here.
- Every .js under web/ is ComfyUI-loadable: imports only ../../scripts/app.js, ../../scripts/api.js
  or a sibling module; extension files register exactly one `dco.<feature>` extension; the pure
  modules (what Node's test runner imports) import neither app nor api.
- The trainer-token cases shared with the page's mirror (tests/data/prompt_cases.json) hold for the
  Python parser. The base-prompt and loader cases need ComfyUI and run in tests/comfy.
The behaviour in a real page is tested in tests/comfy/test_comfy_frontend.py.
"""

from __future__ import annotations

import ast
import json
import re

import pytest

import node_schemas
from node_schemas import ROOT

WEB = ROOT / "web"
ALLOWED_IMPORTS = {"../../scripts/app.js", "../../scripts/api.js"}
EXTENSION_FILES = {"dco_train_monitor.js": "dco.train_monitor", "dco_refresh.js": "dco.refresh",
                   "dco_prompt_helper.js": "dco.prompt_helper"}
PURE_MODULES = {"dco_shared.js", "dco_monitor_data.js", "dco_chart.js", "dco_prompt_rules.js"}
CASES = json.loads((ROOT / "tests" / "data" / "prompt_cases.json").read_text(encoding="utf-8"))


def _js_constants(path) -> dict[str, str]:
    return dict(re.findall(r'^export const (\w+) = "([^"]*)";', path.read_text(encoding="utf-8"), re.M))


def _py_constants(path) -> dict[str, str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.targets[0].id: n.value.value for n in tree.body
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.Constant)}


def _imports(path) -> list[str]:
    return re.findall(r'^\s*import\s[^;]*?from\s+"([^"]+)"', path.read_text(encoding="utf-8"), re.M | re.S)


def test_event_names_node_ids_and_route_agree_with_python():
    js = _js_constants(WEB / "dco_shared.js")
    events = _py_constants(ROOT / "nodes" / "events.py")
    routes = _py_constants(ROOT / "nodes" / "routes.py")
    assert js["TRAIN_EVENT"] == events["TRAIN"] == "dco.train"
    assert js["FILES_CHANGED_EVENT"] == events["FILES_CHANGED"] == "dco.files_changed"
    assert js["EMBEDDINGS_ROUTE"] == routes["EMBEDDINGS_ROUTE"]
    assert js["SUBJECT_ROUTE"] == routes["SUBJECT_ROUTE"]
    ids = set(node_schemas.load())
    for name in ("TRAINER_NODE", "LOAD_EMBEDDINGS_NODE", "PROMPT_PAIR_NODE", "LOAD_SUBJECT_NODE"):
        assert js[name] in ids, f"web/dco_shared.js {name} = {js[name]!r} is not a node id of the pack"


def test_every_js_file_is_known_and_flat():
    files = sorted(p.relative_to(WEB).as_posix() for p in WEB.rglob("*.js"))
    assert files == sorted(set(EXTENSION_FILES) | PURE_MODULES), (
        "ComfyUI auto-loads every .js under web/; a new file must be one of the pack's own modules")


@pytest.mark.parametrize("name", sorted(set(EXTENSION_FILES) | PURE_MODULES))
def test_js_imports_only_app_api_or_siblings(name):
    for spec in _imports(WEB / name):
        sibling = spec.startswith("./") and (WEB / spec[2:]).is_file() and spec.count("/") == 1
        assert spec in ALLOWED_IMPORTS or sibling, f"{name} imports {spec!r}"
        if name in PURE_MODULES:
            assert spec not in ALLOWED_IMPORTS, f"{name} must stay importable by Node (no app/api import)"


@pytest.mark.parametrize("name, extension", sorted(EXTENSION_FILES.items()))
def test_each_feature_file_registers_one_named_extension(name, extension):
    text = (WEB / name).read_text(encoding="utf-8")
    assert re.findall(r'app\.registerExtension\(\{\s*name:\s*"([^"]+)"', text) == [extension]


def test_node_hooks_go_through_chain_method():
    """Wrapped node methods call the original first: every hook uses dco_shared.js chainMethod
    (unit-tested in tests/js/shared.test.mjs), none assigns to a prototype directly."""
    for name in EXTENSION_FILES:
        text = (WEB / name).read_text(encoding="utf-8")
        assert not re.search(r"prototype\.\w+\s*=", text), f"{name} assigns a node method without chainMethod"
        if "beforeRegisterNodeDef" in text:
            assert "chainMethod(nodeType, " in text, name


def test_web_package_json_marks_es_modules_for_node():
    assert json.loads((WEB / "package.json").read_text())["type"] == "module"


@pytest.mark.parametrize("case", CASES["trainer_tokens"], ids=lambda c: repr(c["spec"]))
def test_trainer_token_cases_hold_for_the_python_parser(case):
    from dco_train.config import parse_tokens
    from dco_train.errors import DCOError

    if "error" in case:
        with pytest.raises(DCOError, match=re.escape(case["error"])):
            parse_tokens(case["spec"])
    else:
        assert parse_tokens(case["spec"]) == case["map"]


def test_registry_metadata_names_the_pack_without_a_second_web_folder():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    assert "web" not in comfy, "[tool.comfy] web would serve web/ a second time and load every script twice"
    assert data["project"]["urls"]["Repository"] and data["project"]["license"] == {"file": "LICENSE"}
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").strip()
    init = (ROOT / "__init__.py").read_text(encoding="utf-8")
    assert 'WEB_DIRECTORY = "./web"' in init
