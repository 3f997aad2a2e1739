"""The frontend extension (web/) against the rules it lives by, without a browser.

- Event names, node ids and the route path in web/dco_shared.js equal the Python side's
  (nodes/events.py, nodes/*.py, nodes/routes.py): renaming one side fails here.
- Every .js under web/ is ComfyUI-loadable: imports only ../../scripts/app.js, ../../scripts/api.js
  or a sibling module; extension files register exactly one `dco.<feature>` extension; the pure
  modules (what Node's test runner imports) import neither app nor api.
- The trainer-token cases shared with the page's mirror (tests/data/prompt_cases.json) hold for the
  Python parser. The base-prompt and loader cases need ComfyUI and run in tests/comfy.
- Behaviour, in Node (skipped without `node`): the JS unit tests (tests/js) pass, and the monitor's
  store, fed the events the trainer builds from the engine's own StepInfo rows (set-up phases, steps
  with and without err_ref, the drift baseline, a preview's cost, the done event with per-image
  errors), shows what those rows hold.
The behaviour in a real page is tested in tests/comfy/test_comfy_frontend.py.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess

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


NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (the JS tests need Node 18+)")


def _node(script: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([NODE, "--input-type=module", "-e", script], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=60)


@needs_node
def test_js_unit_tests_pass():
    """tests/js/*.test.mjs (the monitor's event handling, the prompt rules, the hook helper) in this suite."""
    run = subprocess.run([NODE, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"^# pass [1-9]", run.stdout, re.M) and re.search(r"^# fail 0$", run.stdout, re.M), run.stdout[-2000:]


# Replays events through the page's store and reports what the monitor would show.
REPLAY_JS = """
import { MonitorStore, perImageLines, phaseLine, previewCostLine, statusLine } from "./web/dco_monitor_data.js";
let input = "";
for await (const chunk of process.stdin) input += chunk;
const store = new MonitorStore();
const headers = [];
for (const ev of JSON.parse(input)) {
  const run = store.apply(ev);
  if (!run) throw new Error("event ignored: " + JSON.stringify(ev));
  headers.push(statusLine(run));
}
const run = store.get("12");
console.log(JSON.stringify({
  status: run.status, step: run.step, total: run.total, headers, phase: phaseLine(run.phase),
  loss: run.series("loss"), err_ref: run.series("err_ref"), drift: run.series("drift"),
  cost: previewCostLine(run), worst: perImageLines(run, 1), warnings: run.warnings,
}));
"""


def _event(status: str, **data) -> dict:
    """What nodes/trainer.py _Progress.event sends: {node, run, status, total, **data} (data's total wins)."""
    return {"node": "12", "run": "0123456789ab", "status": status, **data}


@needs_node
def test_monitor_shows_what_the_engines_step_rows_hold():
    from dco_train.train import StepInfo

    total = 3
    steps = [StepInfo(step=s, total=total, loss=0.7 - 0.1 * s, err_model=0.2, err_ref=None if s == 2 else 0.25,
                      reward_gap=None, lr=1e-4, elapsed_s=2.0 * s, eta_s=2.0 * (total - s)) for s in (1, 2, 3)]
    events = [_event("start", total=total),
              _event("setup", phase="Caching prompt embeddings", done=1, total=4),  # the phase's total
              _event("running", total=total, step=0, drift=0.0, fit=0.5),  # the drift meter's baseline (on_metrics)
              *[_event("running", **info.as_dict(), it_s=0.5) for info in steps[:2]],
              _event("setup", phase="Rendering preview", done=25, total=25),
              _event("running", total=total, step=2, preview_s=1.5, preview_steps_equiv=0.75),
              _event("running", **steps[2].as_dict(), it_s=0.5),
              _event("done", total=total, step=3, per_image=[{"name": "a.png", "err_lora": 0.1, "err_base": 0.3},
                                                       {"name": "b.png", "err_lora": 0.4, "err_base": 0.3}],
                     warnings=["only 2 images"])]
    run = _node(REPLAY_JS, json.dumps(events))
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert (shown["status"], shown["step"], shown["total"]) == ("done", 3, 3)
    assert shown["headers"][1] == "setting up · Caching prompt embeddings 1/4 · 3 steps to train"
    assert shown["headers"][5] == "step 2/3 · 0.5 it/s · ETA 0:02 · Rendering preview 25/25"
    assert shown["loss"] == [[1, 2, 3], [pytest.approx(0.6), pytest.approx(0.5), pytest.approx(0.4)]]
    assert shown["err_ref"] == [[1, 3], [0.25, 0.25]], "a step without err_ref (beta <= 0) leaves a gap"
    assert shown["drift"] == [[0], [0.0]]
    assert shown["cost"] == "last preview 1.5 s ≈ 0.75 steps (1 preview) · 25 % of the time so far"
    assert shown["worst"][0] == "b.png: 0.4 with the LoRA, 0.3 without" and shown["warnings"] == ["only 2 images"]
    assert shown["phase"] == ""
