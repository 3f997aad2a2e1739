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

from test_comfy_trainer import (CAPTIONS, _steps_seen, graph_models, node_inputs, run_node,  # noqa: E402,F401
                                write_dataset)

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
    steps = _steps_seen(monkeypatch)  # the set-up phases move the progress bar too: fire on a training step

    def boom(value, total, preview, node_id=None):
        if steps and steps[-1] >= 2:
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
    steps = _steps_seen(monkeypatch)  # the set-up phases move the progress bar too: fire on a training step

    def cancel(value, total, preview, node_id=None):
        if steps and steps[-1] >= 2:
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


# ------------------------------------------------------------------------------- frozen weights
def _storages(module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_frozen_unet_shares_comfyuis_storage_when_dtype_and_device_match():
    """fp32 training of an fp32 MODEL on the CPU: the engine's UNet is ComfyUI's weights, no copy,
    yet ordinary tensors (not inference tensors), so backward can save them."""
    with torch.inference_mode():
        model = harness.build_model(seed=1)
    comfy_storage = _storages(model.model.diffusion_model)
    unet = convert.unet_from_model(model, torch.device("cpu"), torch.float32)
    params = list(unet.parameters())
    assert _storages(unet) <= comfy_storage
    assert not any(p.is_inference() for p in params) and all(p.dtype == torch.float32 for p in params)


def test_frozen_unet_is_cast_to_the_training_dtype():
    with torch.inference_mode():
        model = harness.build_model(seed=1)
    comfy_storage = _storages(model.model.diffusion_model)
    unet = convert.unet_from_model(model, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    assert not (_storages(unet) & comfy_storage)  # a copy, in bf16 only: no fp32 copy beside ComfyUI's


def test_a_lora_loaded_in_the_graph_is_baked_into_the_weights(tmp_path):
    """A MODEL carrying a LoRA: the engine trains on base + LoRA, and ComfyUI's module keeps its
    own base weights (bit-identical once ComfyUI unloads the patch)."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():
        model = harness.build_model(seed=1)
        path = harness.save_engine_lora(tmp_path / "l.safetensors", model, rank=4, alpha=4.0, seed=2)
        model_ft, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path)), 1.0, 0.0)
    before = harness.model_hash(model)
    plain = dict(convert.unet_from_model(model, torch.device("cpu"), torch.float32).named_parameters())
    baked = dict(convert.unet_from_model(model_ft, torch.device("cpu"), torch.float32).named_parameters())
    changed = [k for k in plain if not torch.equal(plain[k], baked[k])]
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for k in changed)
    assert len(changed) == len(harness.diffusers_attention_modules())
    mm.unload_all_models()
    assert harness.model_hash(model) == before
