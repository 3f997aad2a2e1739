"""The reward-guidance guider against stock ComfyUI graphs and a brute-force reference.

Tolerance: ours and the references differ only by float32 rounding (LoRA merged into the weight
vs added to the layer output, different batch compositions), so every comparison allows
`TOL * max|reference|` with TOL = 1e-5, and also checks that the LoRA's own effect on the result
is at least 100 times larger than that difference (a guider that dropped the LoRA would fail).
"""

from __future__ import annotations

import re

import pytest

import harness

harness.require()

import comfy.model_management as mm  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py)
import torch  # noqa: E402
from comfy_extras import nodes_custom_sampler as ncs  # noqa: E402
from comfy_extras import nodes_hooks  # noqa: E402

guider_mod = harness.pack_module("nodes.guider")
bypass_mod = harness.pack_module("nodes.bypass")
formats = harness.pack_module("dco_train.formats")
DCOError = harness.pack_module("dco_train.errors").DCOError

TOL = 1e-5
TOKEN_TEXT, BASE_TEXT, NEG_TEXT = "a photo of <dog> dog on a beach", "a photo of dog on a beach", "blurry"
SUBJECT, STYLE = "subject.safetensors", "style.safetensors"


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clip():
    return harness.build_clip(seed=0)


@pytest.fixture(scope="module")
def conds(clip):
    return {"token": harness.encode(clip, TOKEN_TEXT), "base": harness.encode(clip, BASE_TEXT),
            "neg": harness.encode(clip, NEG_TEXT)}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """Two engine-format LoRAs (subject: rank 4, alpha 2; style: rank 8, alpha 8) in a loras folder,
    plus a LoCon-style one that also targets a 3x3 resnet convolution."""
    folder = tmp_path_factory.mktemp("loras")
    shape_model = harness.build_model(seed=0)
    harness.save_engine_lora(folder / SUBJECT, shape_model, rank=4, alpha=2.0, seed=1)
    harness.save_engine_lora(folder / STYLE, shape_model, rank=8, alpha=8.0, seed=2)
    _save_conv_lora(folder / "conv.safetensors", shape_model)
    with harness.model_folder("loras", folder):
        yield folder


def _save_conv_lora(path, model, rank: int = 4) -> None:
    """kohya keys for one attention projection and one 3x3 conv (diffusers names)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    sd = model.model.diffusion_model.state_dict()
    out = {}
    for dname, sgm in (("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
                       ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", "input_blocks.3.1.transformer_blocks.0.attn2.to_v")):
        w = sd[sgm + ".weight"]
        name = "lora_unet_" + dname.replace(".", "_")
        kernel = tuple(w.shape[2:])
        out[name + ".lora_down.weight"] = torch.randn(rank, w.shape[1], *kernel, generator=gen) * 0.2
        out[name + ".lora_up.weight"] = torch.randn(w.shape[0], rank, *([1] * len(kernel)), generator=gen) * 0.2
        out[name + ".alpha"] = torch.tensor(2.0)
    save_file(out, str(path))


def load_loras(model, clip, loras):
    """model_ft the way users build it: stock LoraLoader nodes, chained."""
    for name, strength in loras:
        model, clip = harness.call_node(comfy_nodes.LoraLoader, model=model, clip=clip, lora_name=name,
                                        strength_model=strength, strength_clip=strength)
    return model


def sample(guider, latent, sampler="euler", steps=1, scheduler="karras", seed=7, callback=None):
    sigmas = harness.call_node(ncs.BasicScheduler, model=guider.model_patcher, scheduler=scheduler, steps=steps, denoise=1.0)[0]
    if callback is None:
        noise = harness.call_node(ncs.RandomNoise, noise_seed=seed)[0]
        sampler_obj = harness.call_node(ncs.KSamplerSelect, sampler_name=sampler)[0]
        return harness.call_node(ncs.SamplerCustomAdvanced, noise=noise, guider=guider, sampler=sampler_obj,
                                 sigmas=sigmas, latent_image={"samples": latent})[0]["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, callback=callback, seed=seed)


def our_guider(model, model_ft, conds, cfg=5.0, rg=3.0, one_batch=True):
    guider = harness.call_node(guider_mod.DCORewardGuidanceGuider, model=model, model_ft=model_ft,
                               positive_token=conds["token"], positive_base=conds["base"], negative=conds["neg"],
                               cfg=cfg, rg=rg)[0]
    guider.one_batch = one_batch
    return guider


def stock_guider(model, clip, conds, loras, cfg=5.0, rg=3.0):
    """DualCFGGuider 'regular': cond1 = token prompt with the LoRA(s) as hooks
    (CreateHookLora -> SetClipHooks -> CLIP Text Encode), cond2 = base prompt, negative."""
    token = conds["token"]
    if loras:
        hooks = None
        for name, strength in loras:
            hooks = harness.call_node(nodes_hooks.CreateHookLora, lora_name=name, strength_model=strength,
                                      strength_clip=strength, prev_hooks=hooks)[0]
        hooked_clip = harness.call_node(nodes_hooks.SetClipHooks, clip=clip, apply_to_conds=True,
                                        schedule_clip=False, hooks=hooks)[0]
        token = harness.call_node(comfy_nodes.CLIPTextEncode, clip=hooked_clip, text=TOKEN_TEXT)[0]
    return harness.call_node(ncs.DualCFGGuider, model=model, cond1=token, cond2=conds["base"], negative=conds["neg"],
                             cfg_conds=rg, cfg_cond2_negative=cfg, style="regular")[0]


def assert_close(ours, ref, plain, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    effect = (ref - plain).abs().max().item()
    assert diff <= TOL * scale, f"{what}: max|ours - reference| = {diff:.3g} > {TOL} * {scale:.3g}"
    assert effect > 100 * max(diff, 1e-12), f"{what}: the LoRA effect {effect:.3g} is not well above the difference {diff:.3g}"


# ------------------------------------------------------------------------------------------- against the stock graph
CASES = [
    # (loras, one_batch, sampler, steps, prediction, latent shape)
    pytest.param([(SUBJECT, 1.0)], True, "euler", 1, "eps", (1, 4, 8, 8), id="subject-1step"),
    pytest.param([(SUBJECT, 1.0)], False, "euler", 1, "eps", (1, 4, 8, 8), id="subject-1step-twopass"),
    pytest.param([(SUBJECT, 1.0), (STYLE, 0.8)], True, "euler", 1, "eps", (1, 4, 8, 8), id="merge-1step"),
    pytest.param([(SUBJECT, 1.0), (STYLE, 0.8)], False, "dpmpp_2m", 3, "eps", (1, 4, 8, 8), id="merge-dpmpp2m-twopass"),
    pytest.param([(SUBJECT, 1.0), (STYLE, 0.8)], True, "dpmpp_2m", 3, "v", (2, 4, 8, 12), id="merge-vpred-batch2-nonsquare"),
    pytest.param([("conv.safetensors", 0.9)], True, "euler", 2, "eps", (1, 4, 8, 8), id="conv-lora"),
]


@pytest.mark.parametrize("loras, one_batch, sampler, steps, prediction, shape", CASES)
def test_equals_stock_dualcfg_with_hook_lora(clip, conds, lora_dir, loras, one_batch, sampler, steps, prediction, shape):
    model = harness.build_model(seed=0, prediction=prediction)
    model_ft = load_loras(model, clip, loras)
    latent = torch.zeros(shape)
    ours = sample(our_guider(model, model_ft, conds, one_batch=one_batch), latent, sampler, steps)
    ref = sample(stock_guider(model, clip, conds, loras), latent, sampler, steps)
    plain = sample(stock_guider(model, clip, conds, []), latent, sampler, steps)
    assert_close(ours, ref, plain, "vs DualCFG + hook LoRA")


def test_base_model_with_its_own_lora(clip, conds, lora_dir):
    """model already carries a style LoRA; model_ft adds the subject on top. Only the extra patch
    is bypassed: equal to DualCFG on the styled model with the subject as a hook."""
    model = load_loras(harness.build_model(seed=0), clip, [(STYLE, 0.7)])
    model_ft = load_loras(model, clip, [(SUBJECT, 0.9)])
    assert list(guider_mod.RewardGuidanceGuider(model, model_ft).extra) != []
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample(our_guider(model, model_ft, conds), latent)
    ref = sample(stock_guider(model, clip, conds, [(SUBJECT, 0.9)]), latent)
    plain = sample(stock_guider(model, clip, conds, []), latent)
    assert_close(ours, ref, plain, "styled base vs DualCFG + hook")
    mm.unload_all_models()


# ------------------------------------------------------------------------------------------- against patched weights
def patched_model(prediction: str, deltas: dict[str, torch.Tensor]):
    """A separately built copy of the base model with `deltas` added to its weights by hand."""
    model = harness.build_model(seed=0, prediction=prediction)
    sd = model.model.diffusion_model.state_dict()
    with torch.no_grad():
        for key, delta in deltas.items():
            sd[key].add_(delta.to(sd[key].dtype))
    return model


def lora_deltas(folder, loras) -> dict[str, torch.Tensor]:
    """Σ strength · alpha/rank · up @ down per weight, read with the engine's reader (not ComfyUI's)."""
    to_sgm = {d.replace(".", "_"): s for d, s in harness.diffusers_attention_modules().items()}
    to_sgm["down_blocks_0_resnets_0_conv1"] = "input_blocks.1.0.in_layers.2"
    out: dict[str, torch.Tensor] = {}
    for name, strength in loras:
        for kohya, mod in formats.load_lora(folder / name).modules["unet"].items():
            key = to_sgm[kohya[len("lora_unet_"):]] + ".weight"
            delta = strength * mod.scale * (mod.up.float().flatten(1) @ mod.down.float().flatten(1))
            out[key] = out.get(key, 0) + delta.view(mod.up.shape[0], *mod.down.shape[1:])
    return out


class BruteForceGuider(comfy.samplers.CFGGuider):
    """DESIGN 2.4 written out: ε_ref passes on the base model, the token pass on another model
    whose weights have the LoRA merged in."""

    def __init__(self, model, ft_model, cfg: float, rg: float):
        super().__init__(model)
        self.ft, self.cfg, self.rg = ft_model, cfg, rg

    def set_conds(self, token, base, negative):
        self.inner_set_conds({"positive": base, "negative": negative, "tok": token})

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        neg, base = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["negative"], self.conds["positive"]],
                                                   x, timestep, model_options)
        self.ft.model.current_patcher = self.ft
        tok = comfy.samplers.calc_cond_batch(self.ft.model, [self.conds["tok"]], x, timestep, model_options)[0]
        return neg + self.cfg * (base - neg) + self.rg * (tok - base)


@pytest.mark.parametrize("loras", [[(SUBJECT, 1.0)], [(SUBJECT, 1.0), (STYLE, 0.8)], [("conv.safetensors", 1.0)]],
                         ids=["subject", "merge", "conv"])
def test_equals_brute_force_patched_weights(clip, conds, lora_dir, loras):
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, loras)
    ft = patched_model("eps", lora_deltas(lora_dir, loras))
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample(our_guider(model, model_ft, conds), latent, "dpmpp_2m", 2)
    brute = BruteForceGuider(model, ft, 5.0, 3.0)
    brute.set_conds(conds["token"], conds["base"], conds["neg"])
    ref = sample(brute, latent, "dpmpp_2m", 2)
    no_lora = BruteForceGuider(model, harness.build_model(seed=0), 5.0, 3.0)
    no_lora.set_conds(conds["token"], conds["base"], conds["neg"])
    assert_close(ours, ref, sample(no_lora, latent, "dpmpp_2m", 2), "vs brute-force patched weights")


def test_non_lora_patches_use_a_precomputed_delta(clip, conds):
    """'diff' patches (not LoRA) on a Linear weight, a Conv weight and a bias go through the
    precomputed-delta fallback and match the brute-force model with those diffs added."""
    model = harness.build_model(seed=0)
    sd = model.model.diffusion_model.state_dict()
    gen = torch.Generator().manual_seed(3)
    keys = ["input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.1.0.in_layers.2.weight",
            "input_blocks.3.1.proj_out.bias"]
    deltas = {k: torch.randn(sd[k].shape, generator=gen) * 0.1 for k in keys}
    model_ft = model.clone()
    assert len(model_ft.add_patches({"diffusion_model." + k: ("diff", (d,)) for k, d in deltas.items()}, 1.0)) == 3
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample(our_guider(model, model_ft, conds), latent, "euler", 2)
    brute = BruteForceGuider(model, patched_model("eps", deltas), 5.0, 3.0)
    brute.set_conds(conds["token"], conds["base"], conds["neg"])
    no_lora = BruteForceGuider(model, harness.build_model(seed=0), 5.0, 3.0)
    no_lora.set_conds(conds["token"], conds["base"], conds["neg"])
    assert_close(ours, sample(brute, latent, "euler", 2), sample(no_lora, latent, "euler", 2), "diff patches")


def test_patches_on_other_layers_are_refused(conds):
    model = harness.build_model(seed=0)
    model_ft = model.clone()
    key = "diffusion_model.out.0.weight"  # a GroupNorm scale
    model_ft.add_patches({key: ("diff", (torch.ones(32) * 0.1,))}, 1.0)
    with pytest.raises(DCOError, match=r"out\.0\.weight, a GroupNorm weight.*Linear and Conv"):
        our_guider(model, model_ft, conds)
    assert _hook_count(model) == 0


def test_weight_wrappers_on_model_ft_are_refused(conds):
    """A MODEL with an in-memory trained adapter (weight wrapper, as TrainLoraNode outputs) is refused."""
    model = harness.build_model(seed=0)
    model_ft = model.clone()
    model_ft.add_weight_wrapper("diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight", lambda w: w * 2)
    with pytest.raises(DCOError, match="weight wrapper on .*attn1.to_q.weight"):
        our_guider(model, model_ft, conds)


# ------------------------------------------------------------------------------------------- rg = 0 and the passes
def _record_batches(model):
    sizes: list[int] = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, args: sizes.append(int(args[0].shape[0])))
    return sizes, handle


@pytest.mark.parametrize("cfg, rg, one_batch, per_step", [
    (5.0, 0.0, True, [2]), (5.0, 3.0, True, [3]), (5.0, 3.0, False, [2, 1]), (1.0, 3.0, True, [2]), (1.0, 1.0, True, [1]),
], ids=["rg0", "one-batch", "two-pass", "cfg1", "cfg1-rg1"])
def test_forward_passes_per_step(clip, conds, lora_dir, cfg, rg, one_batch, per_step):
    """rg = 0 runs token + negative only (no base pass); otherwise one batch of three prompts,
    or a pair then the token prompt alone; cfg 1 skips the negative, and rg 1 then the base too."""
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0)])
    sizes, handle = _record_batches(model)
    latent = torch.zeros(1, 4, 8, 8)
    try:
        ours = sample(our_guider(model, model_ft, conds, cfg=cfg, rg=rg, one_batch=one_batch), latent, "euler", 3)
    finally:
        handle.remove()
    assert sizes == per_step * 3
    if rg:
        ref = sample(stock_guider(model, clip, conds, [(SUBJECT, 1.0)], cfg=cfg, rg=rg), latent, "euler", 3)
        plain = sample(stock_guider(model, clip, conds, [], cfg=cfg, rg=rg), latent, "euler", 3)
        assert_close(ours, ref, plain, f"cfg {cfg} rg {rg} vs DualCFG + hook LoRA")


def test_one_batch_falls_back_to_two_passes(clip, conds, lora_dir, caplog):
    """When a layer's batch does not line up with the prompts' rows, the guider switches to two
    passes for the rest of the run and gives exactly the two-pass result."""
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0)])

    class Misaligned(guider_mod.RewardGuidanceGuider):
        @staticmethod
        def _rows_wrapper(bypass):
            inner = guider_mod.RewardGuidanceGuider._rows_wrapper(bypass)

            def wrapper(executor, x, t, *args, **kwargs):
                def misaligned(*a, **k):
                    if bypass.rows is not None and bypass.rows is not bypass_mod.ALL_ROWS:
                        bypass.batch += 1  # what a layer that reshapes its batch would look like
                    return executor(*a, **k)
                return inner(misaligned, x, t, *args, **kwargs)
            return wrapper

    guider = Misaligned(model, model_ft)
    guider.set_conds(conds["token"], conds["base"], conds["neg"])
    guider.set_cfg(5.0, 3.0)
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample(guider, latent, "euler", 2)
    assert any("using two passes" in r.getMessage() for r in caplog.records)
    two_pass = sample(our_guider(model, model_ft, conds, one_batch=False), latent, "euler", 2)
    assert torch.equal(ours, two_pass)
    assert guider.one_batch, "the fallback lasts one run; the next run tries one batch again"


def test_rg_zero_is_plain_cfg_of_model_ft(clip, conds, lora_dir):
    """rg = 0 equals the stock CFGGuider on model_ft with the token prompt (what KSampler does)."""
    model = harness.build_model(seed=0)
    before = harness.model_hash(model)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0), (STYLE, 0.8)])
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample(our_guider(model, model_ft, conds, rg=0.0), latent, "euler", 2)
    assert harness.model_hash(model) == before
    stock = harness.call_node(ncs.CFGGuider, model=model_ft, positive=conds["token"], negative=conds["neg"], cfg=5.0)[0]
    ref = sample(stock, latent, "euler", 2)
    plain_cfg = harness.call_node(ncs.CFGGuider, model=model, positive=conds["token"], negative=conds["neg"], cfg=5.0)[0]
    plain = sample(plain_cfg, latent, "euler", 2)
    assert_close(ours, ref, plain, "rg=0 vs CFGGuider(model_ft)")
    mm.unload_all_models()  # the stock run baked the LoRA into the shared module; ComfyUI restores it
    assert harness.model_hash(model) == before


# ------------------------------------------------------------------------------------------- model left unchanged
def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())


class _Boom(Exception):
    pass


def test_model_bit_identical_after_success_exception_and_interrupt(clip, conds, lora_dir):
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0), (STYLE, 0.8)])
    before, hooks_before = harness.model_hash(model), _hook_count(model)
    latent = torch.zeros(1, 4, 8, 8)
    guider = our_guider(model, model_ft, conds)

    first = sample(guider, latent, "euler", 3, callback=lambda *a: None)
    assert harness.model_hash(model) == before and _hook_count(model) == hooks_before

    def fail_at_step_2(step, *args):
        if step == 1:
            raise _Boom("callback failure")

    with pytest.raises(_Boom):
        sample(guider, latent, "euler", 3, callback=fail_at_step_2)
    assert harness.model_hash(model) == before and _hook_count(model) == hooks_before

    # interrupt in the middle of the LoRA-on (token) forward of step 2
    target = model.model.get_submodule("diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q")
    calls = {"n": 0}

    def interrupt(module, args, output):
        if guider._bypass is not None and guider._bypass.rows is not None:
            calls["n"] += 1
            if calls["n"] == 2:
                if hasattr(comfy.ops, "run_every_op"):  # v0.8.0: the next comfy op raises, as a real interrupt
                    mm.interrupt_current_processing(True)
                else:
                    raise mm.InterruptProcessingException()

    handle = target.register_forward_hook(interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(guider, latent, "euler", 3, callback=lambda *a: None)
    finally:
        handle.remove()
        mm.interrupt_current_processing(False)
    assert calls["n"] == 2
    assert harness.model_hash(model) == before and _hook_count(model) == hooks_before
    assert guider._bypass is None

    again = sample(guider, latent, "euler", 3, callback=lambda *a: None)
    assert torch.equal(again, first), "a rerun after the failures must give the same result bit for bit"


# ------------------------------------------------------------------------------------------- refusals and the sampler node
def test_model_ft_from_another_checkpoint_is_refused(clip, conds, lora_dir):
    model = harness.build_model(seed=0)
    other = load_loras(harness.build_model(seed=0), clip, [(SUBJECT, 1.0)])  # same weights, another load
    with pytest.raises(DCOError, match="model_ft is not a clone of model"):
        our_guider(model, other, conds)


def test_model_ft_not_downstream_of_model_is_refused(clip, conds, lora_dir):
    plain = harness.build_model(seed=0)
    styled = load_loras(plain, clip, [(STYLE, 1.0)])
    subject_only = load_loras(plain, clip, [(SUBJECT, 1.0)])
    with pytest.raises(DCOError, match="model carries a patch .* that model_ft lacks"):
        our_guider(styled, subject_only, conds)


def test_sampler_node_equals_guider_with_sampler_custom_advanced(clip, conds, lora_dir):
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0)])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    for denoise in (1.0, 0.6):
        out = harness.call_node(guider_mod.DCORewardGuidanceSampler, model=model, model_ft=model_ft,
                                positive_token=conds["token"], positive_base=conds["base"], negative=conds["neg"],
                                latent_image=latent, seed=11, steps=3, cfg=5.0, rg=3.0, sampler_name="dpmpp_2m",
                                scheduler="karras", denoise=denoise)[0]["samples"]
        sigmas = harness.call_node(ncs.BasicScheduler, model=model, scheduler="karras", steps=3, denoise=denoise)[0]
        ref = harness.call_node(ncs.SamplerCustomAdvanced, noise=harness.call_node(ncs.RandomNoise, noise_seed=11)[0],
                                guider=our_guider(model, model_ft, conds),
                                sampler=harness.call_node(ncs.KSamplerSelect, sampler_name="dpmpp_2m")[0],
                                sigmas=sigmas, latent_image=latent)[0]["samples"]
        assert torch.equal(out, ref), f"denoise {denoise}"


@pytest.mark.parametrize("chunks, token, batch, expected", [
    ([0, 1, 2], 2, 6, slice(4, 6)),
    ([2, 1, 0], 2, 3, slice(0, 1)),
    ([2], 2, 2, bypass_mod.ALL_ROWS),
    ([0, 1], 2, 4, None),
    ([2, 0, 2], 2, 3, [0, 2]),
])
def test_row_selection(chunks, token, batch, expected):
    bp = bypass_mod.BypassLoRA(torch.nn.Module(), {})
    bp.select_rows(chunks, token, batch)
    if isinstance(expected, list):
        assert bp.rows.tolist() == expected
    else:
        assert bp.rows == expected


# ------------------------------------------------------------------------------------------- rg_start / rg_end window
OUTSIDE = {"ft": guider_mod.OUTSIDE_FT, "base": guider_mod.OUTSIDE_BASE}


def window_guider(model, model_ft, conds, rg_start, rg_end, outside, cfg=5.0, rg=3.0, one_batch=True):
    guider = harness.call_node(guider_mod.DCORewardGuidanceGuider, model=model, model_ft=model_ft,
                               positive_token=conds["token"], positive_base=conds["base"], negative=conds["neg"],
                               cfg=cfg, rg=rg, rg_start=rg_start, rg_end=rg_end, outside_window=OUTSIDE[outside])[0]
    guider.one_batch = one_batch
    return guider


class BruteForceWindowGuider(BruteForceGuider):
    """DESIGN 2.4 inside [percent_to_sigma(start), percent_to_sigma(end)] (ComfyUI's timestep-range
    test on the step's sigma); outside it plain CFG, of the merged-weights model on the token prompt
    ("ft") or of the base model on the base prompt ("base")."""

    def __init__(self, model, ft_model, cfg, rg, rg_start, rg_end, outside):
        super().__init__(model, ft_model, cfg, rg)
        sampling = model.get_model_object("model_sampling")
        self.high, self.low = sampling.percent_to_sigma(rg_start), sampling.percent_to_sigma(rg_end)
        self.outside = outside

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
        sigma = timestep[0].item()
        if self.low <= sigma <= self.high:
            return super().predict_noise(x, timestep, model_options, seed)
        if self.outside == "base":
            neg, cond = comfy.samplers.calc_cond_batch(
                self.inner_model, [self.conds["negative"], self.conds["positive"]], x, timestep, model_options)
        else:
            self.ft.model.current_patcher = self.ft
            neg, cond = comfy.samplers.calc_cond_batch(
                self.ft.model, [self.conds["negative"], self.conds["tok"]], x, timestep, model_options)
        return neg + self.cfg * (cond - neg)


@pytest.mark.parametrize("one_batch, cfg, rg", [(True, 5.0, 3.0), (False, 5.0, 3.0), (True, 5.0, 0.0), (True, 1.0, 1.0)],
                         ids=["one-batch", "two-pass", "rg0", "cfg1-rg1"])
def test_full_window_is_bit_identical_whatever_runs_outside(clip, conds, lora_dir, one_batch, cfg, rg):
    """rg_start 0, rg_end 1 is today's guider: every step inside, so the two outside choices (which
    differ a lot) and leaving the window out give the same latents bit for bit."""
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0), (STYLE, 0.8)])
    latent = torch.zeros(1, 4, 8, 8)
    default = sample(our_guider(model, model_ft, conds, cfg=cfg, rg=rg, one_batch=one_batch), latent, "dpmpp_2m", 3)
    for outside in OUTSIDE:
        full = sample(window_guider(model, model_ft, conds, 0.0, 1.0, outside, cfg=cfg, rg=rg, one_batch=one_batch),
                      latent, "dpmpp_2m", 3)
        assert torch.equal(full, default), outside
    never = sample(window_guider(model, model_ft, conds, 1.0, 1.0, "base", cfg=cfg, rg=rg), latent, "dpmpp_2m", 3)
    assert not torch.equal(never, default), "an empty window must change the result (the test would prove nothing)"


@pytest.mark.parametrize("outside", ["ft", "base"])
@pytest.mark.parametrize("rg_start, rg_end", [(0.0, 0.5), (0.3, 0.8)], ids=["first-half", "middle"])
def test_window_equals_brute_force(clip, conds, lora_dir, outside, rg_start, rg_end):
    loras = [(SUBJECT, 1.0), (STYLE, 0.8)]
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, loras)
    ft = patched_model("eps", lora_deltas(lora_dir, loras))
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample(window_guider(model, model_ft, conds, rg_start, rg_end, outside), latent, "dpmpp_2m", 6)
    brute = BruteForceWindowGuider(model, ft, 5.0, 3.0, rg_start, rg_end, outside)
    brute.set_conds(conds["token"], conds["base"], conds["neg"])
    ref = sample(brute, latent, "dpmpp_2m", 6)
    no_lora = BruteForceWindowGuider(model, harness.build_model(seed=0), 5.0, 3.0, rg_start, rg_end, outside)
    no_lora.set_conds(conds["token"], conds["base"], conds["neg"])
    assert_close(ours, ref, sample(no_lora, latent, "dpmpp_2m", 6), f"window {rg_start}-{rg_end}, outside {outside}")
    full = sample(our_guider(model, model_ft, conds), latent, "dpmpp_2m", 6)
    assert (ours - full).abs().max() > 100 * TOL * full.abs().max(), "the window must change the result"


@pytest.mark.parametrize("outside", ["ft", "base"])
def test_steps_outside_the_window_skip_the_third_pass(clip, conds, lora_dir, outside):
    """Inside the window one batch of three prompts; outside a pair (negative + one prompt), and for
    "base" the LoRA hooks stay off."""
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0)])
    steps = 6
    sigmas = harness.call_node(ncs.BasicScheduler, model=model, scheduler="karras", steps=steps, denoise=1.0)[0]
    low = model.get_model_object("model_sampling").percent_to_sigma(0.5)
    expected = [3 if s >= low else 2 for s in sigmas[:-1].tolist()]
    assert 3 in expected and 2 in expected
    guider = window_guider(model, model_ft, conds, 0.0, 0.5, outside)
    sizes, handle = _record_batches(model)
    lora_rows: list[int] = []
    target = model.model.get_submodule("diffusion_model.input_blocks.3.1.transformer_blocks.0.attn1.to_q")
    spy = target.register_forward_hook(lambda m, a, o: lora_rows.append(
        0 if guider._bypass.rows is None else 1))
    try:
        sample(guider, torch.zeros(1, 4, 8, 8), "euler", steps)
    finally:
        handle.remove()
        spy.remove()
    assert sizes == expected
    outside_rows = [r for r, n in zip(lora_rows, sizes) if n == 2]
    assert outside_rows == ([0] * len(outside_rows) if outside == "base" else [1] * len(outside_rows))


def test_sampler_node_takes_the_window_too(clip, conds, lora_dir):
    model = harness.build_model(seed=0)
    model_ft = load_loras(model, clip, [(SUBJECT, 1.0)])
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = harness.call_node(guider_mod.DCORewardGuidanceSampler, model=model, model_ft=model_ft,
                            positive_token=conds["token"], positive_base=conds["base"], negative=conds["neg"],
                            latent_image=latent, seed=11, steps=4, cfg=5.0, rg=3.0, sampler_name="euler",
                            scheduler="karras", denoise=1.0, rg_start=0.25, rg_end=0.75,
                            outside_window=guider_mod.OUTSIDE_BASE)[0]["samples"]
    sigmas = harness.call_node(ncs.BasicScheduler, model=model, scheduler="karras", steps=4, denoise=1.0)[0]
    ref = harness.call_node(ncs.SamplerCustomAdvanced, noise=harness.call_node(ncs.RandomNoise, noise_seed=11)[0],
                            guider=window_guider(model, model_ft, conds, 0.25, 0.75, "base"),
                            sampler=harness.call_node(ncs.KSamplerSelect, sampler_name="euler")[0],
                            sigmas=sigmas, latent_image=latent)[0]["samples"]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("rg_start, rg_end, message", [
    (0.6, 0.4, r"rg_start \(0.6\) is after rg_end \(0.4\)"),
    (-0.1, 1.0, "rg_start must be a fraction of the schedule from 0 to 1"),
    (0.0, float("nan"), "rg_end must be a fraction of the schedule from 0 to 1"),
])
def test_a_bad_window_is_refused_by_name(conds, rg_start, rg_end, message):
    assert re.search(message, guider_mod.DCORewardGuidanceGuider.validate_inputs(cfg=5.0, rg=3.0, rg_start=rg_start,
                                                                                 rg_end=rg_end))
    model = harness.build_model(seed=0)
    with pytest.raises(DCOError, match=message):
        guider_mod.make_guider(model, model, conds["token"], conds["base"], conds["neg"], 5.0, 3.0, rg_start, rg_end)


def test_outside_window_choices_are_the_guiders(conds):
    schema = guider_mod.DCORewardGuidanceGuider.define_schema()
    (combo,) = [i for i in schema.inputs if i.id == "outside_window"]
    assert tuple(combo.options) == guider_mod.OUTSIDE_CHOICES and combo.default == guider_mod.OUTSIDE_FT
    with pytest.raises(DCOError, match="outside_window must be one of"):
        guider_mod.check_window(0.0, 1.0, "the other model")
