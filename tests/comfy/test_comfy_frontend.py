"""The pack's frontend, example workflows and registry packaging in a real ComfyUI server and page.

One throwaway server per module (the pack and the test-only tiny-SDXL pack in its `custom_nodes/`,
a small captioned dataset, a few embeddings files). Without a browser:
- the JS files, GET /dco/embeddings and GET /dco/subject are served, the five workflows are in
  /workflow_templates;
- our nodes' live /object_info equals the static parse that the main suite checks workflows with
  (tests/node_schemas.py), and the stock-node snapshot equals the live stock nodes;
- every workflow passes the workflow checks against the live node list;
- the prompt cases shared with the page's mirror hold for the Python node code.
In headless Chromium (skipped with the reason when Chromium is not installed):
- the extension loads with no console errors; each workflow loads from the Templates endpoint with
  every node type known and `widgets_values` unchanged by the frontend;
- DCO Prompt Pair shows the base prompt as the user types, and follows DCO Load Subject's token CLIP
  (the LoRA's tokens through GET /dco/subject, its tokens override) and base CLIP;
- dco_load_subject (on the tiny model, with a demo LoRA that records its embeddings file) runs from
  the page, and so does the generate -> train -> sample graph (workflows.train_on_generated);
- a tiny-model variant of dco_train_subject with two trainers is queued from the page: each
  trainer's monitor receives its own run and draws its points, the run succeeds, the final curve
  image arrives, the monitor survives collapse and zoom, and the new LoRAs appear in a LoraLoader
  dropdown without a reload; each validation preview shows once (in the monitor, not again under
  the node);
- the monitor shows the set-up phases with a progress bar, each preview's cost, the dataset's
  warnings and the worst-fitting images (the trainer's events sent into the page);
- the frontend is at least requirements.txt's comfyui-frontend-package minimum (v0.3.64 runs that
  minimum itself);
- with Nodes 2.0 (the Vue node renderer, setting Comfy.VueNodes.Enabled) on: the prompt helper
  follows typing in the Vue node's textarea, a training run shows in the monitor inside the Vue
  node, and the dropdowns refresh; skipped, saying why, where the frontend has no Nodes 2.0 or
  its Nodes 2.0 draws no DOM widgets (1.27.x).
Screenshots go to test-artifacts/browser-<ComfyUI version>/. Look at them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import harness

harness.require()

import torch  # noqa: E402

import node_schemas  # noqa: E402
import workflows  # noqa: E402
from browser import Browser, find_chromium  # noqa: E402
from test_comfy_server import Server  # noqa: E402
from test_comfy_trainer import CAPTIONS, write_dataset  # noqa: E402
from workflow_rules import (STOCK_FILE, check_workflow, load_workflow, schema_from_object_info,  # noqa: E402
                            schema_to_json, workflow_files)

formats = harness.pack_module("dco_train.formats")
PACK = "ComfyUI-DCO"
OURS = sorted(node_schemas.load())
OUT = harness.REPO_ROOT / "test-artifacts" / f"browser-{harness.comfy_version()}"
CASES = json.loads((harness.REPO_ROOT / "tests" / "data" / "prompt_cases.json").read_text(encoding="utf-8"))
# Console errors that are not ours: files a fresh user directory lacks, and one error that
# frontend 1.27.10 always logs (research/v3-both-versions.md).
MISSING_USER_FILES = re.compile(r"/(api/userdata/user\.css|user\.css|favicon\.ico|api/userdata\?dir=\w+.*|"
                                r"api/userdata/comfy\.templates\.json)$")
FRONTEND_1_27_ERROR = "Cannot read properties of undefined (reading 'id')"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = harness.server_base(tmp_path_factory.mktemp("comfy-frontend"), PACK)
    workflows.write_settings(base)
    # dco_dog.safetensors: <dog> from "dog" sized for the tiny model, and the LoRA that records it
    workflows.write_demo_models(base, hidden=(harness.HIDDEN_L, harness.HIDDEN_G))
    lora = base / "models" / "loras" / "dco_dog.safetensors"  # weights for the tiny model, same metadata
    formats.save_lora(lora, {"unet": harness.peft_unet_lora(harness.build_model(seed=0), 4, 1)}, {"unet": 4.0},
                      formats.read_metadata(lora), dtype="fp32")
    emb = base / "models" / "embeddings"
    gen = torch.Generator().manual_seed(0)
    formats.save_embeddings(emb / "pets.safetensors", formats.TokenEmbeddings(
        tokens=["<dog>", "<cat>"], clip_l=torch.randn(3, 768, generator=gen), clip_g=torch.randn(3, 1280, generator=gen),
        initializers=["dog", ""]))
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(emb / "reference.safetensors"))
    write_dataset(base / "input" / "dco" / "star", CAPTIONS)
    OUT.mkdir(parents=True, exist_ok=True)
    srv = Server(base)  # one torch thread in the server (see Server)
    try:
        yield srv
    finally:
        srv.stop()


def _get_raw(server, path: str) -> tuple[int, str, bytes]:
    import urllib.request

    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


# ----------------------------------------------------------------------------- server side
def test_pack_loads_and_serves_every_js_file(server):
    log = server.log_text()
    assert "Error while calling comfy_entrypoint" not in log, log[-3000:]
    loaded = [line for line in log.splitlines() if "seconds" in line and line.rstrip().endswith(f"/{PACK}")]
    assert loaded and "IMPORT FAILED" not in loaded[0], log[-3000:]
    ours = [line for line in log.splitlines()
            if f"/{PACK}/" in line or (PACK in line and re.search(r"warn|error|fail|traceback", line, re.I))]
    assert not ours, "ComfyUI logged these about the pack:\n" + "\n".join(ours)
    served = {p for p in server.get("/api/extensions") if f"/extensions/{PACK}/" in p}
    expected = {f"/extensions/{PACK}/{p.name}" for p in (harness.REPO_ROOT / "web").glob("*.js")}
    assert served == expected
    for path in expected:
        status, ctype, body = _get_raw(server, path)
        assert status == 200 and "javascript" in ctype and body, path


def test_embeddings_route_answers_tokens_words_and_rows(server):
    info = server.get("/api/dco/embeddings?name=pets.safetensors")
    assert info == {"name": "pets.safetensors", "tokens": ["<dog>", "<cat>"], "words": ["dog", ""], "recorded": True,
                    "rows": {"clip_l": 2, "clip_g": 2}}
    assert server.get("/dco/embeddings?name=reference.safetensors")["recorded"] is False
    assert server.get("/dco/embeddings?name=reference.safetensors")["tokens"] == []  # no metadata: type them
    for query, code in (("", 400), ("?name=missing.safetensors", 404), ("?name=../models/embeddings/pets.safetensors", 404)):
        status, _, body = _get_raw(server, f"/api/dco/embeddings{query}")
        assert status == code and json.loads(body)["error"].endswith("."), (query, body)


def test_subject_route_answers_what_the_lora_records(server):
    info = server.get("/api/dco/subject?name=dco_dog.safetensors")
    assert info == {"name": "dco_dog.safetensors", "tokens": ["<dog>"], "words": ["dog"],
                    "embeddings": "dco_dog.safetensors", "cfg": 6.0, "rg": 2.5}
    for query, code in (("", 400), ("?name=missing.safetensors", 404)):
        status, _, body = _get_raw(server, f"/api/dco/subject{query}")
        assert status == code and json.loads(body)["error"].endswith("."), (query, body)


def test_workflow_templates_lists_every_workflow_with_thumbnails(server):
    templates = server.get("/api/workflow_templates")
    assert sorted(templates[PACK]) == sorted(workflows.NAMES) and len(workflows.NAMES) == 5
    for path in workflow_files():
        assert server.get(f"/api/workflow_templates/{PACK}/{path.name}") == load_workflow(path)
        status, _, body = _get_raw(server, f"/api/workflow_templates/{PACK}/{path.stem}.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff", path.stem


def test_registry_metadata_reads_with_comfyuis_own_parser():
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(harness.REPO_ROOT))
    assert config.project.name == "dco-sdxl" and config.project.version
    assert config.tool_comfy.publisher_id == "comfyui-dco" and config.tool_comfy.display_name
    assert config.tool_comfy.web is None, "the web folder is served through WEB_DIRECTORY only"
    assert config.project.supported_comfyui_version == ">=0.3.64"
    assert config.project.urls.repository and (harness.REPO_ROOT / config.project.license.file).is_file()


@pytest.mark.parametrize("node_id", OURS)
def test_static_schema_parse_matches_object_info(server, node_id):
    live = schema_from_object_info(node_id, server.get(f"/object_info/{node_id}")[node_id])
    static = node_schemas.load()[node_id]
    assert schema_to_json(static) == schema_to_json(live)
    assert [s.tooltip for s in static.ordered_inputs()] == [s.tooltip for s in live.ordered_inputs()], (
        "the static parse reads other tooltips than the node has (the README's reference uses them)")
    assert (static.display_name, static.category) == (live.display_name, live.category)
    assert static.description == live.description


def test_stock_node_snapshot_matches_object_info(server):
    saved = json.loads(STOCK_FILE.read_text(encoding="utf-8"))["nodes"]
    info = server.get("/object_info")
    live = {t: schema_to_json(schema_from_object_info(t, info[t])) for t in saved if t in info}
    assert live == saved, ("tests/data/stock_nodes.json no longer matches this ComfyUI's stock nodes; "
                           "rebuild it with tests/comfy/make_workflows.py")


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.stem)
def test_workflow_passes_the_checks_against_the_live_node_list(server, path):
    info = server.get("/object_info")
    schemas = {t: schema_from_object_info(t, spec) for t, spec in info.items()}
    problems = check_workflow(load_workflow(path), schemas)
    assert not problems, "\n".join(problems)


def test_prompt_cases_hold_for_the_python_nodes(tmp_path, monkeypatch):
    emb = harness.pack_module("nodes.embeddings")
    errors = harness.pack_module("dco_train.errors")
    for case in CASES["base_prompt"]:
        def run():
            return emb.base_prompt(case["text"], case["known"], emb.parse_word_map(case["word_map"]))
        if "error" in case:
            with pytest.raises(errors.DCOError, match=re.escape(case["error"])):
                run()
        else:
            assert run() == case["base"], case
    for i, case in enumerate(CASES["loader"]):
        path = tmp_path / f"case{i}.safetensors"
        rows = {"clip_l": torch.zeros(case["rows"], 768), "clip_g": torch.zeros(case["rows"], 1280)}
        meta = {}
        if case["file_tokens"]:
            meta = {formats.META_TOKENS: json.dumps(case["file_tokens"]),
                    formats.META_INITIALIZERS: json.dumps(case["file_words"])}
        formats.save_safetensors(path, rows, meta)

        def load():
            return formats.load_embeddings(path, emb.parse_tokens(case["typed"]) or None).word_map
        if "error" in case:
            with pytest.raises(errors.DCOError, match=re.escape(case["error"])):
                load()
        else:
            assert list(load().items()) == list(case["map"].items()), case
    subject = harness.pack_module("nodes.subject")
    for i, case in enumerate(CASES["subject"]):
        lora = tmp_path / f"subject{i}" / "lora.safetensors"
        lora.parent.mkdir()
        files = {"chosen.safetensors": case.get("chosen")}
        if case["lora"]["embeddings"]:  # the file the LoRA records, beside it: its tokens and words
            files[case["lora"]["embeddings"]] = {**case["lora"], "rows": {"clip_l": len(case["lora"]["tokens"])}}
        for name, file in files.items():
            if file is not None:
                n = max(1, file["rows"]["clip_l"])
                meta = {formats.META_TOKENS: json.dumps(file["tokens"]),
                        formats.META_INITIALIZERS: json.dumps(file["words"])} if file["tokens"] else {}
                formats.save_safetensors(lora.parent / name, {"clip_l": torch.zeros(n, 768),
                                                              "clip_g": torch.zeros(n, 1280)}, meta)
        info = formats.SubjectInfo(tokens=case["lora"]["tokens"], words=case["lora"]["words"],
                                   embeddings=case["lora"]["embeddings"])
        chosen = "chosen.safetensors" if case.get("chosen") else subject.FROM_LORA
        monkeypatch.setattr(subject, "_embedding_path", lambda name, folder=lora.parent: str(folder / name))

        def pick():
            found = subject.subject_embeddings(info, "s.safetensors", str(lora), chosen, case["typed"])
            return {} if found is None else dict(zip(found[0].tokens, found[0].initializers))
        if "error" in case:
            with pytest.raises(errors.DCOError, match=re.escape(case["error"])):
                pick()
        else:
            assert list(pick().items()) == list(case["map"].items()), case


# ----------------------------------------------------------------------------- in the page
APP_READY = ("!!(window.app?.graph && document.querySelector('#graph-canvas') && window.LiteGraph && "
             "app.extensions?.some((e) => e.name === 'dco.prompt_helper'))")


@pytest.fixture(scope="module")
def page(server):
    if not find_chromium():
        pytest.skip("Chromium is not installed (apt-get install -y chromium); the real-browser tests need it")
    with Browser(1600, 1000) as b:
        b.open(server.url)
        b.wait_for(APP_READY, 120)
        b.eval("new Promise((r) => setTimeout(r, 500))")
        yield b


def _benign(m: dict) -> bool:
    url = m.get("url") or ""
    if f"/extensions/{PACK}/" in url + m["text"]:
        return False
    missing = "status of 404" in m["text"] and MISSING_USER_FILES.search(url)
    return bool(missing) or FRONTEND_1_27_ERROR in m["text"]


def _ours_or_unexplained(messages: list[dict]) -> list[dict]:
    return [m for m in messages if not _benign(m)]


def test_extension_loads_without_console_errors(page):
    names = page.eval("app.extensions.map((e) => e.name).filter((n) => n.startsWith('dco.'))")
    assert sorted(names) == ["dco.prompt_helper", "dco.refresh", "dco.train_monitor"]
    assert not _ours_or_unexplained(page.errors()), page.errors()
    warnings = [m for m in page.console if f"/extensions/{PACK}/" in m.get("url", "") and m["level"] != "debug"]
    assert not warnings, warnings


def _fit_and_shoot(page, name: str, ids: list[int] | None = None) -> Path:
    page.eval(f"({workflows.FIT_JS})({json.dumps({'margin': {'left': 70, 'top': 100, 'right': 30, 'bottom': 30}, 'ids': ids or []})})")
    return page.screenshot(OUT / f"{name}.png")


def _shoot_monitor(page, node_id: int, name: str) -> Path:
    """A close-up of a trainer's monitor and what ComfyUI draws under it (previews, the curve)."""
    rect = page.eval(f"""(async () => {{
      const n = app.graph.getNodeById({node_id});
      const ds0 = app.canvas.ds, c0 = app.canvas.canvas.getBoundingClientRect();
      ds0.scale = 1;  // at 100 %: the node's bottom near the bottom of the window
      ds0.offset[0] = 400 - n.pos[0];
      ds0.offset[1] = c0.height - 30 - (n.pos[1] + n.size[1]);
      app.canvas.setDirty(true, true);
      await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
      await new Promise((r) => setTimeout(r, 300));
      const r = n.dcoMonitor.root.getBoundingClientRect();
      const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
      const bottom = c.top + (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale;
      return [r.left - 8, r.top - 6, r.width + 16, Math.max(r.height, bottom - r.top) + 12];
    }})()""")
    return page.screenshot(OUT / f"{name}.png", clip=tuple(rect))


@pytest.mark.parametrize("name", workflows.NAMES)
def test_workflow_loads_from_the_templates_list(page, name):
    listed = page.eval("window.comfyAPI.api.api.getWorkflowTemplates()")
    assert name in listed[PACK], "the frontend's template list lacks the workflow"
    result = page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/{name}.json')")
    saved = load_workflow(harness.REPO_ROOT / "example_workflows" / f"{name}.json")
    assert result["missing"] == [], f"node types unknown to the frontend: {result['missing']}"
    assert result["nodes"] == len(saved["nodes"])
    assert result["mismatched"] == [], "the frontend changed widgets_values on load (a widget is serialised or missing)"
    _fit_and_shoot(page, f"workflow_{name}")
    assert not _ours_or_unexplained(page.errors()), page.errors()


def _helper(page) -> dict:
    return page.eval("app.graph.nodes.find((n) => n.type === 'DCOPromptPair').dcoPromptHelper.result")


def test_prompt_pair_shows_the_base_prompt_as_the_user_types(page):
    page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/dco_subject_rg.json')")
    first = page.wait_for("(() => { const r = app.graph.nodes.find((n) => n.type === 'DCOPromptPair')"
                          ".dcoPromptHelper.result; return !r.pending && r; })()", 20)
    assert first["base"] == "a dog playing saxophone on a beach at sunset" and first["error"] is None, first
    assert first["known"] == [["<dog>", "dog"]], "the words come from the embeddings file through GET /dco/embeddings"
    type_js = """(text) => {
      const node = app.graph.nodes.find((n) => n.type === 'DCOPromptPair');
      const w = node.widgets.find((x) => x.name === 'text');
      const el = [w.element, w.inputEl].find((e) => e?.tagName === 'TEXTAREA') ?? w.element?.querySelector?.('textarea');
      el.value = text;
      el.dispatchEvent(new Event('input', { bubbles: true }));
      return w.value;
    }"""
    assert page.eval(f"({type_js})('a <dog> and a <cat>')") == "a <dog> and a <cat>"
    typed = _helper(page)
    assert typed["base"] is None and "The prompt names <cat>" in typed["error"], typed
    page.eval("""(() => { const node = app.graph.nodes.find((n) => n.type === 'DCOPromptPair');
      const w = node.widgets.find((x) => x.name === 'word_map'); w.value = '<dog>=puppy'; w.callback?.(w.value); })()""")
    page.eval(f"({type_js})('(<dog>:1.2) at night')")
    assert _helper(page)["base"] == "(puppy:1.2) at night"
    shown = page.eval("app.graph.nodes.find((n) => n.type === 'DCOPromptPair').dcoPromptHelper.root.textContent")
    assert "(puppy:1.2) at night" in shown
    _fit_and_shoot(page, "prompt_helper", ids=[3, 4])


HELPER_READY_JS = ("(() => { const r = app.graph.nodes.find((n) => n.type === 'DCOPromptPair')"
                   ".dcoPromptHelper.result; return !r.pending && r; })()")
SMALL_SAMPLING_JS = r"""
() => {
  const set = (t, v) => { for (const n of app.graph.nodes.filter((x) => x.type === t))
    for (const [k, x] of Object.entries(v)) n.widgets.find((w) => w.name === k).value = x; };
  set("BasicScheduler", { steps: 2 });
  set("EmptyLatentImage", { width: 64, height: 64 });
  app.canvas.setDirty(true, true);
}
"""


def _queue_and_wait(page, server) -> dict | None:
    """Queue the page's graph as the Run button does; its history entry once it completed."""
    before = set(server.get("/api/history"))
    page.eval("app.queuePrompt(0, 1).then(() => true)")
    return _wait_for_history(server, before, time.time())


def _run_error(entry: dict) -> str:
    """The node and message of a failed run (ComfyUI's execution_error), short enough to read."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} #{data.get('node_id')}: {data.get('exception_message')}"
    return json.dumps(entry["status"])[-1500:]


def _saved_images(entry: dict) -> list[str]:
    return [i["filename"] for out in entry.get("outputs", {}).values() for i in out.get("images", [])
            if i.get("type") == "output"]


def test_load_subject_workflow_shows_the_base_prompt_and_runs_from_the_page(page, server):
    page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/dco_load_subject.json')")
    helper = page.wait_for(HELPER_READY_JS, 20)
    assert helper["error"] is None and helper["base"] == "a dog playing saxophone on a beach at sunset", helper
    assert helper["known"] == [["<dog>", "dog"]], "the words come from the LoRA through GET /dco/subject"
    page.eval(f"(({TO_TINY_JS})(), true)")
    page.eval(f"({SMALL_SAMPLING_JS})()")
    _fit_and_shoot(page, "load_subject_before_run")
    entry = _queue_and_wait(page, server)
    assert entry is not None, "the queued prompt never reached the history"
    assert entry["status"]["status_str"] == "success", _run_error(entry)
    assert _saved_images(entry), "the run saved no image"
    page.eval("new Promise((r) => setTimeout(r, 800))")
    _fit_and_shoot(page, "load_subject_done")
    assert not _ours_or_unexplained(page.errors()), page.errors()


def test_prompt_helper_follows_load_subject_outputs(page):
    """The token CLIP carries the LoRA's tokens, a typed tokens override renames them, and the base
    CLIP output (followed like any pass-through CLIP) does not know them."""
    page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/dco_load_subject.json')")
    page.wait_for(HELPER_READY_JS, 20)
    set_js = """(v) => { const n = app.graph.nodes.find((x) => x.type === 'DCOLoadSubject');
      n.widgets.find((w) => w.name === 'tokens').value = v; }"""
    page.eval(f"({set_js})('<sks>=puppy')")
    renamed = page.wait_for("(() => { const r = app.graph.nodes.find((n) => n.type === 'DCOPromptPair')"
                            ".dcoPromptHelper.result; return r.known.length && r.known[0][0] === '<sks>' && r; })()", 10)
    assert renamed["known"] == [["<sks>", "puppy"]] and "The prompt names <dog>" in renamed["error"], renamed
    page.eval(f"({set_js})('')")
    page.eval("""(() => { const g = app.graph, s = g.nodes.find((x) => x.type === 'DCOLoadSubject');
      const p = g.nodes.find((x) => x.type === 'DCOPromptPair'); s.connect(3, p, 0); })()""")
    base = page.wait_for("(() => { const r = app.graph.nodes.find((n) => n.type === 'DCOPromptPair')"
                         ".dcoPromptHelper.result; return !r.pending && r.error && r; })()", 10)
    assert base["known"] == [] and "The prompt names <dog>" in base["error"], base


def test_graph_that_generates_trains_and_samples_runs_from_the_page(page, server):
    spec = workflows.train_on_generated()
    page.eval(f"({workflows.BUILD_JS})({json.dumps(spec)})")
    helper = page.wait_for(HELPER_READY_JS, 20)
    assert helper["base"] == "a photo of a toy on the grass", "the trainer's tokens widget gives the word"
    page.eval("(() => { const t = app.graph.nodes.find((n) => n.type === 'DCOTrainer');"
              " t.widgets.find((w) => w.name === 'overwrite').value = true; })()")
    _fit_and_shoot(page, "train_on_generated_before_run")
    entry = _queue_and_wait(page, server)
    assert entry is not None, "the queued prompt never reached the history"
    assert entry["status"]["status_str"] == "success", _run_error(entry)
    assert [f for f in _saved_images(entry) if f.startswith("dco_generated")], _saved_images(entry)
    trainer_id = next(n["id"] for n in spec["nodes"] if n["type"] == "DCOTrainer")
    trainer = _stats(page, trainer_id)
    assert (trainer["status"], trainer["step"]) == ("done", 3), trainer
    page.eval("new Promise((r) => setTimeout(r, 800))")
    _fit_and_shoot(page, "train_on_generated_done")
    _shoot_monitor(page, trainer_id, "train_on_generated_monitor")
    assert not _ours_or_unexplained(page.errors()), page.errors()


# The loaded workflow's Load Checkpoint replaced by the test-only tiny SDXL (same outputs, wired the
# same way); returns the new node.
TO_TINY_JS = r"""
() => {
  const g = app.graph;
  const ckpt = g.nodes.find((n) => n.type === "CheckpointLoaderSimple");
  const tiny = LiteGraph.createNode("DCOTestTinySDXL");
  g.add(tiny);
  tiny.pos = [...ckpt.pos];
  for (const w of tiny.widgets) for (const c of w.linkedWidgets ?? []) c.value = "fixed";
  for (let slot = 0; slot < 3; slot++) {
    for (const id of [...(ckpt.outputs[slot].links ?? [])]) {
      const link = g.getLink?.(id) ?? g.links.get?.(id) ?? g.links[id];
      tiny.connect(slot, g.getNodeById(link.target_id), link.target_slot);
    }
  }
  g.remove(ckpt);
  return tiny;
}
"""

# The browser-test variant of dco_train_subject: the test-only tiny SDXL instead of Load Checkpoint,
# training small enough for the CPU, a second trainer, and a muted LoraLoader whose dropdown must
# pick up the new files.
TINY_VARIANT_JS = r"""
async () => {
  const g = app.graph;
  const byType = (t) => g.nodes.filter((n) => n.type === t);
  const set = (node, values) => { for (const [k, v] of Object.entries(values)) node.widgets.find((w) => w.name === k).value = v; };
  const tiny = (TO_TINY_JS)();
  const [a] = byType("DCOTrainer");
  const small = { dataset_dir: "dco/star", tokens: "<obj>=toy", rank: 4, learning_rate: 0.001, text_encoder_lr: 0.001,
                  resolution: 64, mixed_precision: "no", checkpoint_every: 0, seed: 0, overwrite: true };
  set(a, { ...small, output_name: "browser_a", steps: 40, validation_prompt: "a <obj> on the beach", validation_every: 20 });
  const b = LiteGraph.createNode("DCOTrainer");
  g.add(b);
  b.pos = [a.pos[0], a.pos[1] + a.size[1] + 400]; // room for the image previews A grows by
  for (let slot = 0; slot < 3; slot++) tiny.connect(slot, b, slot);
  set(b, { ...small, output_name: "browser_b", steps: 4, validation_prompt: "", validation_every: 0 });
  set(byType("DCOPromptPair")[0], { text: "a photo of a <obj> on the beach" });
  set(byType("BasicScheduler")[0], { steps: 2 });
  set(byType("EmptyLatentImage")[0], { width: 64, height: 64 });
  const lora = LiteGraph.createNode("LoraLoader");
  g.add(lora);
  lora.pos = [tiny.pos[0] - 400, tiny.pos[1]];
  tiny.connect(0, lora, 0);
  tiny.connect(1, lora, 1);
  lora.mode = LiteGraph.NEVER ?? 2; // muted: only its dropdown matters
  app.canvas.setDirty(true, true);
  window.__dcoNoReload = true;
  return { a: a.id, b: b.id, lora: lora.id, tiny: tiny.id };
}
""".replace("TO_TINY_JS", TO_TINY_JS.strip())


def _stats(page, node_id: int) -> dict:
    return page.eval(f"app.graph.getNodeById({node_id}).dcoMonitor.stats()")


def _wait_for_history(server, before: set, t0: float, timeout: float = 600) -> dict | None:
    """The history entry of the prompt queued at t0 once it completed (None if it never did)."""
    entry = None
    while time.time() - t0 < timeout:
        new = {k: v for k, v in server.get("/api/history").items() if k not in before}
        entry = next(iter(new.values()), None)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.5)
    return entry


@pytest.fixture(scope="module")
def training(page, server):
    """Queue the tiny variant from the page and record what the monitors show on the way."""
    page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/dco_train_subject.json')")
    ids = page.eval(f"({TINY_VARIANT_JS})()")
    before = page.eval(f"app.graph.getNodeById({ids['lora']}).widgets[0].options.values")
    history_before = set(server.get("/api/history"))
    page.eval("app.queuePrompt(0, 1).then(() => true)")
    t0 = time.time()
    mid = page.wait_for(f"(() => {{ const s = app.graph.getNodeById({ids['a']}).dcoMonitor.stats();"
                        f" return s.status === 'running' && s.points >= 5 && s.drawn.loss > 0 && s; }})()", 300, 0.1)
    _fit_and_shoot(page, "monitor_midrun", ids=[ids["a"]])
    _shoot_monitor(page, ids["a"], "monitor_panel_midrun")
    # the first validation preview (step 20): in the monitor, and not again under the node
    page.wait_for(f"app.graph.getNodeById({ids['a']}).dcoMonitor.stats().preview", 300, 0.1)
    page.eval("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
    previewed = page.eval(f"(() => {{ const n = app.graph.getNodeById({ids['a']});"
                          f" return {{ stock: Object.keys(app.nodePreviewImages ?? {{}}).filter((k) => k.split(':').pop() === String(n.id)),"
                          f" imgs: (n.imgs ?? []).length, height: n.size[1] }}; }})()")
    _shoot_monitor(page, ids["a"], "monitor_panel_preview")
    entry = _wait_for_history(server, history_before, t0)
    page.wait_for(f"app.graph.getNodeById({ids['a']}).dcoMonitor.stats().finalImage", 30)
    page.eval("new Promise((r) => setTimeout(r, 800))")  # the dropdown refresh and the last redraws
    _fit_and_shoot(page, "monitor_done", ids=[ids["a"]])
    _shoot_monitor(page, ids["a"], "monitor_panel_done")
    _fit_and_shoot(page, "monitor_done_both", ids=[ids["a"], ids["b"]])
    return {"ids": ids, "mid": mid, "previewed": previewed, "entry": entry, "lora_before": before,
            "seconds": time.time() - t0,
            "a": _stats(page, ids["a"]), "b": _stats(page, ids["b"])}


def test_training_run_from_the_page_succeeds(training):
    entry = training["entry"]
    assert entry is not None, "the queued prompt never reached the history"
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]


def test_monitor_received_events_and_drew_points_mid_run(training):
    mid = training["mid"]
    assert mid["status"] == "running" and 5 <= mid["points"] < 40 and mid["total"] == 40
    assert mid["drawn"]["loss"] >= 2 * (mid["points"] - 1), "loss and err_model (at least) are drawn for every step"
    assert mid["monitorPoints"] == 1, "the drift meter's step-0 baseline is on the chart before the first step"
    assert re.match(r"^step \d+/40 · [\d.e+-]+ it/s · ETA \d+:\d\d$", mid["header"]), mid["header"]


def test_each_trainer_shows_its_own_finished_run(training):
    a, b = training["a"], training["b"]
    assert re.fullmatch(r"[0-9a-f]{12}", a["run"]) and re.fullmatch(r"[0-9a-f]{12}", b["run"]) and a["run"] != b["run"]
    assert (a["status"], a["step"], a["total"], a["points"]) == ("done", 40, 40, 40)
    assert (b["status"], b["step"], b["total"], b["points"]) == ("done", 4, 4, 4)
    assert a["drawn"]["loss"] == 3 * 40, "loss, err_model and err_ref for each of the 40 steps"
    assert a["monitorPoints"] == 2 and a["drawn"]["monitor"] >= 2, "the drift meter's baseline (step 0) and last step"
    assert a["preview"] is True, "validation previews (every 20 steps) reach the monitor"
    assert b["preview"] is False
    assert a["finalImage"] and "/view?" in a["finalImage"], "onExecuted delivers the final curve image"


def test_each_validation_preview_shows_once_in_the_monitor(training):
    previewed = training["previewed"]
    assert previewed["stock"] == [] and previewed["imgs"] == 0, (
        f"ComfyUI also keeps the preview to draw under the node: {previewed}")
    assert previewed["height"] < 1000, "the node grew past a 1600x1000 window during training"


def test_new_loras_appear_in_the_lora_dropdown_without_a_reload(training, page):
    values = page.eval(f"app.graph.getNodeById({training['ids']['lora']}).widgets[0].options.values")
    assert "browser_a.safetensors" not in training["lora_before"]
    assert {"browser_a.safetensors", "browser_b.safetensors"} <= set(values), values
    assert page.eval("window.__dcoNoReload === true"), "the page was reloaded"
    refreshed = page.eval(f"import('/extensions/{PACK}/dco_refresh.js').then((m) => m.refreshed)")
    assert refreshed["count"] >= 2 and refreshed["last"]["lora"] in ("browser_a.safetensors", "browser_b.safetensors")


def test_monitor_survives_collapse_and_zoom(training, page):
    node = training["ids"]["a"]
    before = _stats(page, node)
    page.eval(f"(async () => {{ const n = app.graph.getNodeById({node}); n.collapse(); app.canvas.setDirty(true, true);"
              " await new Promise((r) => setTimeout(r, 400)); })()")
    collapsed = _stats(page, node)
    assert collapsed["visible"] is False, "a collapsed node hides its monitor"
    page.eval(f"(async () => {{ const n = app.graph.getNodeById({node}); n.collapse(); app.canvas.setDirty(true, true);"
              " await new Promise((r) => setTimeout(r, 400)); })()")
    shown = _stats(page, node)
    assert shown["visible"] is True and shown["points"] == before["points"] == 40
    assert shown["drawn"]["loss"] == 120 and shown["drawn"]["frames"] > collapsed["drawn"]["frames"], "redrawn when shown"
    page.eval("(async () => { app.canvas.ds.scale = 0.4; app.canvas.setDirty(true, true);"
              " await new Promise((r) => setTimeout(r, 500)); })()")
    zoomed = _stats(page, node)
    assert zoomed["visible"] is True and zoomed["points"] == 40, "hideOnZoom is off: the chart stays when zoomed out"
    page.screenshot(OUT / "monitor_zoomed_out.png")
    assert not _ours_or_unexplained(page.errors()), page.errors()


# The trainer's events (nodes/trainer.py _Progress.event: {node, run, status, total, **data}) sent into
# the page's api as the websocket would, for the monitor states a tiny run passes too fast to see.
EVENTS_JS = r"""
async (events) => {
  const api = window.comfyAPI.api.api;
  for (const detail of events) api.dispatchEvent(new CustomEvent("dco.train", { detail }));
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
}
"""


def test_monitor_shows_setup_phases_preview_cost_and_the_results(page):
    node = page.eval("(() => { app.graph.clear(); const n = LiteGraph.createNode('DCOTrainer'); app.graph.add(n);"
                     " n.pos = [100, 100]; app.canvas.setDirty(true, true); return n.id; })()")

    def send(*events):
        page.eval(f"({EVENTS_JS})({json.dumps([{'node': str(node), 'run': 'feedc0ffee00', **e} for e in events])})")
        return _stats(page, node)

    s = send({"status": "start", "total": 40}, {"status": "setup", "total": 12, "phase": "Caching prompt embeddings",
                                                "done": 3})
    assert s["header"] == "setting up · Caching prompt embeddings 3/12 · 40 steps to train" and s["bar"] == "25%", s
    _shoot_monitor(page, node, "monitor_panel_setup")
    steps = [{"status": "running", "total": 40, "step": k, "loss": 0.69 - 0.01 * k, "err_model": 0.2 - 0.005 * k,
              "err_ref": 0.2, "reward_gap": 0.0, "lr": 1e-4, "elapsed_s": 2.0 * k, "eta_s": 2.0 * (40 - k), "it_s": 0.5}
             for k in range(1, 21)]
    s = send(*steps, {"status": "setup", "total": 25, "phase": "Rendering preview", "done": 10})
    assert s["status"] == "running" and s["header"].endswith(" · Rendering preview 10/25") and s["bar"] == "40%", s
    s = send({"status": "running", "total": 40, "step": 20, "preview_s": 12.0, "preview_steps_equiv": 6.0})
    assert s["points"] == 20 and s["bar"] is None, "the cost event adds no point and ends the preview phase"
    assert s["cost"] == "last preview 12 s ≈ 6 steps (1 preview) · 30 % of the time so far", s["cost"]
    per_image = [{"name": f"photo_{i}.jpg", "err_lora": 0.1 + 0.02 * i, "err_base": 0.2} for i in range(5)]
    s = send({"status": "done", "total": 40, "step": 40, "per_image": per_image,
              "warnings": ["only 2 images: expect a weak subject", "the captions are all the same"]})
    assert s["status"] == "done"
    assert "⚠ only 2 images: expect a weak subject" in s["notes"] and "photo_4.jpg: 0.18 with the LoRA" in s["notes"], s
    page.wait_for(f"app.graph.getNodeById({node}).dcoMonitor.stats().notesFit", 10)  # the node grew for them
    _shoot_monitor(page, node, "monitor_panel_results")
    assert not _ours_or_unexplained(page.errors()), page.errors()


def _declared_frontend_minimum() -> tuple[int, ...]:
    text = (harness.REPO_ROOT / "requirements.txt").read_text(encoding="utf-8")
    found = re.search(r"^comfyui-frontend-package>=([\d.]+)\s*$", text, re.M)
    assert found, "requirements.txt declares no comfyui-frontend-package lower bound"
    return tuple(int(x) for x in found.group(1).split("."))


def test_frontend_is_at_least_the_declared_minimum(page):
    """requirements.txt's lower bound must hold for the frontend these tests run against; on v0.3.64
    (frontend 1.27.10) that is the minimum itself, so that run tests the extension at the minimum."""
    version = page.eval("window.__COMFYUI_FRONTEND_VERSION__")
    running = tuple(int(x) for x in version.split("."))
    assert running >= _declared_frontend_minimum(), f"frontend {version} is older than requirements.txt allows"


# ----------------------------------------------------------------------------- Nodes 2.0 (Vue renderer)
# ComfyUI's frontend can draw nodes as Vue components instead of on the canvas: the setting below,
# public in the settings dialog from about 1.30 and a hidden experimental setting since 1.27.1.
VUE_SETTING = "Comfy.VueNodes.Enabled"
VUE_JS = r"""
async (on) => {
  if (!("vueNodesMode" in LiteGraph)) return { supported: false };
  await app.extensionManager.setting.set("%s", on);
  for (let i = 0; i < 100 && LiteGraph.vueNodesMode !== on; i++) await new Promise((r) => setTimeout(r, 100));
  await new Promise((r) => setTimeout(r, 500));
  return { supported: true, on: LiteGraph.vueNodesMode, nodes: document.querySelectorAll("[data-node-id]").length };
}
""" % VUE_SETTING
# The monitor's DOM inside the trainer's Vue node and the Vue node's own box, in page pixels.
VUE_BOXES_JS = r"""
(id) => {
  const el = document.querySelector(`[data-node-id="${id}"]`);
  const mon = app.graph.getNodeById(id).dcoMonitor.root;
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; };
  return { node: el ? box(el) : null, monitor: box(mon), inside: !!el && el.contains(mon),
           layout: [mon.offsetWidth, mon.offsetHeight], // CSS pixels, before the canvas zoom
           images: el ? [...el.querySelectorAll("img")].filter((i) => !mon.contains(i) && i.offsetParent).length : 0 };
}
"""


@pytest.fixture(scope="module")
def vue(page, training):
    """The page with Nodes 2.0 switched on (after the classic-canvas tests), switched off again after."""
    version = page.eval("window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown'")
    state = page.eval(f"({VUE_JS})(true)")
    if not state["supported"]:
        pytest.skip(f"frontend {version} has no Nodes 2.0 renderer ({VUE_SETTING} came in 1.27.1)")
    assert state["on"] is True, state
    try:
        # Early Nodes 2.0 (1.27.x, a hidden experimental setting) draws no DOM widgets at all, not even
        # ComfyUI's own multiline text boxes, so no DOM-widget extension can show there
        page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/dco_subject_rg.json')")
        drawn = _vue_wait_nodes(page, 5)
        dom = drawn and page.eval("(() => { const n = app.graph.nodes.find((x) => x.type === 'DCOPromptPair');"
                                  " return !!document.querySelector(`[data-node-id=\"${n.id}\"] textarea`); })()")
        if not drawn:
            page.screenshot(OUT / "vue_no_nodes.png")
            pytest.skip(f"frontend {version}'s Nodes 2.0 (experimental there) did not draw the nodes of a loaded workflow "
                        "(it kept the previous graph's); see vue_no_nodes.png")
        if not dom:
            page.screenshot(OUT / "vue_no_dom_widgets.png")
            pytest.skip(f"frontend {version}'s Nodes 2.0 draws no DOM widgets (not even the stock multiline text "
                        "of DCO Prompt Pair), so the monitor and the prompt helper cannot show there; see "
                        "vue_no_dom_widgets.png")
        yield {"version": version}
    finally:
        page.eval(f"({VUE_JS})(false)")


def _vue_wait_nodes(page, count: int, timeout: float = 30) -> bool:
    """Fit the graph in the window (Nodes 2.0 draws only the nodes in view) and wait until at least
    `count` Vue nodes are in the page; False if they never are."""
    page.eval(f"({workflows.FIT_JS})({json.dumps({'margin': {'left': 70, 'top': 100, 'right': 30, 'bottom': 30}})})")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if page.eval(f"document.querySelectorAll('[data-node-id]').length >= {count}"):
            page.eval("new Promise((r) => setTimeout(r, 800))")
            return True
        time.sleep(0.3)
    return False


def test_vue_prompt_helper_follows_typing(page, vue):
    page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/dco_subject_rg.json')")
    assert _vue_wait_nodes(page, 5), "Nodes 2.0 drew no nodes"
    first = page.wait_for("(() => { const r = app.graph.nodes.find((n) => n.type === 'DCOPromptPair')"
                          ".dcoPromptHelper.result; return !r.pending && r; })()", 20)
    assert first["base"] == "a dog playing saxophone on a beach at sunset", first
    node = page.eval("app.graph.nodes.find((n) => n.type === 'DCOPromptPair').id")
    shown = page.eval(f"(() => {{ const el = document.querySelector('[data-node-id=\"{node}\"]');"
                      " const h = app.graph.getNodeById(" + str(node) + ").dcoPromptHelper.root;"
                      " return { inside: !!el && el.contains(h), visible: h.offsetParent !== null, text: h.textContent }; })()")
    assert shown["inside"] and shown["visible"], f"the helper is not drawn inside the Vue node: {shown}"
    # type into the textarea that the Vue node shows for the `text` widget
    typed = page.eval(f"""(() => {{
      const el = document.querySelector('[data-node-id="{node}"]');
      const helper = app.graph.getNodeById({node}).dcoPromptHelper.root;
      const area = [...el.querySelectorAll('textarea')].find((t) => !helper.contains(t) && t.value.includes('saxophone'));
      if (!area) return null;
      area.value = 'a <dog> and a <cat>';
      area.dispatchEvent(new Event('input', {{ bubbles: true }}));
      area.dispatchEvent(new Event('change', {{ bubbles: true }}));
      return area.value;
    }})()""")
    assert typed == "a <dog> and a <cat>", "no prompt textarea in the Vue node"
    result = page.wait_for("(() => { const r = app.graph.nodes.find((n) => n.type === 'DCOPromptPair')"
                           ".dcoPromptHelper.result; return r.error && r; })()", 10)
    assert "The prompt names <cat>" in result["error"], result
    page.screenshot(OUT / "vue_prompt_helper.png")
    assert not _ours_or_unexplained(page.errors()), page.errors()


@pytest.fixture(scope="module")
def vue_training(page, server, vue):
    """The tiny variant again, drawn by Nodes 2.0: trainer A with previews, B without."""
    page.eval(f"({workflows.LOAD_JS})('/api/workflow_templates/{PACK}/dco_train_subject.json')")
    ids = page.eval(f"({TINY_VARIANT_JS})()")
    page.eval(f"""(() => {{ const g = app.graph, a = g.getNodeById({ids['a']}), b = g.getNodeById({ids['b']});
      const set = (n, v) => {{ for (const [k, x] of Object.entries(v)) n.widgets.find((w) => w.name === k).value = x; }};
      set(a, {{ output_name: "vue_a", steps: 8, validation_every: 4 }});
      set(b, {{ output_name: "vue_b" }}); }})()""")
    assert _vue_wait_nodes(page, 6), "Nodes 2.0 drew no nodes"
    refreshed = page.eval(f"import('/extensions/{PACK}/dco_refresh.js').then((m) => m.refreshed.count)")
    history_before = set(server.get("/api/history"))
    page.eval("app.queuePrompt(0, 1).then(() => true)")
    t0 = time.time()
    page.wait_for(f"app.graph.getNodeById({ids['a']}).dcoMonitor.stats().points >= 2", 300, 0.1)
    page.screenshot(OUT / "vue_monitor_midrun.png")
    entry = _wait_for_history(server, history_before, t0)
    page.wait_for(f"app.graph.getNodeById({ids['a']}).dcoMonitor.stats().finalImage", 30)
    page.eval("new Promise((r) => setTimeout(r, 1000))")
    boxes = page.eval(f"({VUE_BOXES_JS})({ids['a']})")
    page.screenshot(OUT / "vue_monitor_done.png")
    if boxes["node"]:
        x, y, w, h = boxes["node"]
        page.screenshot(OUT / "vue_monitor_panel_done.png", clip=(max(0, x - 8), max(0, y - 8), w + 16, h + 16))
    return {"ids": ids, "entry": entry, "refreshed_before": refreshed, "boxes": boxes,
            "a": _stats(page, ids["a"]), "b": _stats(page, ids["b"])}


def test_vue_training_run_succeeds_and_the_monitor_shows_it(vue_training):
    entry = vue_training["entry"]
    assert entry is not None and entry["status"]["status_str"] == "success", json.dumps(entry and entry["status"])[-3000:]
    a, b = vue_training["a"], vue_training["b"]
    assert (a["status"], a["step"], a["points"]) == ("done", 8, 8) and (b["status"], b["points"]) == ("done", 4)
    assert a["visible"] and a["drawn"]["loss"] == 3 * 8, "the charts are drawn inside the Vue node"
    assert a["preview"] is True and a["finalImage"], "previews and the final curve reach the monitor"
    boxes = vue_training["boxes"]
    assert boxes["inside"], f"the monitor is not part of the trainer's Vue node: {boxes}"
    assert boxes["layout"][0] > 200 and boxes["layout"][1] >= 250, f"the monitor is squashed: {boxes}"


def test_vue_dropdowns_refresh_after_training(vue_training, page):
    values = page.eval(f"app.graph.getNodeById({vue_training['ids']['lora']}).widgets[0].options.values")
    assert {"vue_a.safetensors", "vue_b.safetensors"} <= set(values), values
    count = page.eval(f"import('/extensions/{PACK}/dco_refresh.js').then((m) => m.refreshed.count)")
    assert count >= vue_training["refreshed_before"] + 2
    assert not _ours_or_unexplained(page.errors()), page.errors()
