"""What the trainer node allocates is released the moment it returns: success, an error inside
the loop, or Cancel. No reference cycle may keep the engine's UNet copy, its text encoders or the
optimizer alive until Python's cycle collector happens to run.

The collector is switched off while the node runs, so a cycle keeps its objects alive for certain
and the test fails; nothing here calls `gc.collect()`.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest

import harness

harness.require()

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

from test_comfy_trainer import CAPTIONS, folders, graph_models, node_inputs, run_node, write_dataset  # noqa: E402,F401

convert = harness.pack_module("nodes.convert")


class Watch:
    """Weak references to what one training allocates: the converted UNet and text encoders (by
    wrapping the node's conversion) and every optimizer that steps (torch's global step hook)."""

    def __init__(self, monkeypatch):
        self.refs: dict[str, weakref.ref] = {}
        real = convert.components_from_graph

        def recording(*args, **kwargs):
            comps = real(*args, **kwargs)
            for name in ("unet", "text_encoder", "text_encoder_2"):
                self.refs[name] = weakref.ref(getattr(comps, name))
            # the token table carries the TI hooks (a cycle through them would outlive its encoder)
            self.refs["token_table"] = weakref.ref(comps.text_encoder_2.get_input_embeddings())
            return comps

        monkeypatch.setattr(convert, "components_from_graph", recording)

    def _step_hook(self, optimizer, args, kwargs):
        self.refs["optimizer"] = weakref.ref(optimizer)

    @contextlib.contextmanager
    def no_collector(self):
        handle = register_optimizer_step_pre_hook(self._step_hook)
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield self
        finally:
            handle.remove()
            if enabled:
                gc.enable()

    def alive(self) -> list[str]:
        return sorted(name for name, ref in self.refs.items() if ref() is not None)


def _inputs(folders, **overrides):
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    return node_inputs(data, steps=3, **overrides)


def test_success_releases_everything(folders, monkeypatch):
    model, clip, vae = graph_models()
    watch = Watch(monkeypatch)
    with watch.no_collector():
        outputs = run_node(model, clip, vae, **_inputs(folders))
        assert set(watch.refs) == {"unet", "text_encoder", "text_encoder_2", "token_table", "optimizer"}
        assert watch.alive() == []
    assert outputs[2] == "dco_test.safetensors"


def test_error_inside_the_loop_releases_everything(folders, monkeypatch):
    import comfy.utils

    model, clip, vae = graph_models()
    watch = Watch(monkeypatch)

    def boom(value, total, preview, node_id=None):
        if value >= 2:
            raise RuntimeError("disk on fire")

    comfy.utils.set_progress_bar_global_hook(boom)
    try:
        with watch.no_collector():
            failed = False
            try:
                run_node(model, clip, vae, **_inputs(folders))
            except RuntimeError:  # as ComfyUI's executor does: report, then drop the exception
                failed = True
            assert failed and "optimizer" in watch.refs
            assert watch.alive() == []
    finally:
        comfy.utils.set_progress_bar_global_hook(None)


def test_cancel_releases_everything(folders, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    model, clip, vae = graph_models()
    watch = Watch(monkeypatch)

    def cancel(value, total, preview, node_id=None):
        if value >= 2:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(cancel)
    try:
        with watch.no_collector():
            cancelled = False
            try:
                run_node(model, clip, vae, **_inputs(folders, checkpoint_every=0))
            except mm.InterruptProcessingException:
                cancelled = True
            assert cancelled and "optimizer" in watch.refs
            assert watch.alive() == []
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)


@pytest.mark.parametrize("drift_every", [0])
def test_control_a_held_reference_is_seen(folders, monkeypatch, drift_every):
    """The check can fail: a reference kept on purpose is reported alive."""
    model, clip, vae = graph_models()
    watch = Watch(monkeypatch)
    kept = []
    real = convert.components_from_graph

    def keep(*args, **kwargs):
        comps = real(*args, **kwargs)
        kept.append(comps.unet)
        return comps

    monkeypatch.setattr(convert, "components_from_graph", keep)
    Watch.__init__(watch, monkeypatch)  # wrap the keeping function too
    with watch.no_collector():
        run_node(model, clip, vae, **_inputs(folders))
        assert watch.alive() == ["unet"]
