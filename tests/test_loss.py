"""The DCO loss as pure functions, checked against numbers computed by hand."""

import math

import pytest
import torch

from dco_train.loss import dco_loss, diffusion_target, min_snr_weight, per_sample_error


def test_dco_loss_matches_the_formula_on_batch_means():
    err_model = torch.tensor([0.30, 0.50])
    err_ref = torch.tensor([0.40, 0.44])
    beta = 1000.0
    loss, stats = dco_loss(err_model, err_ref, beta)
    gap = (0.30 + 0.50) / 2 - (0.40 + 0.44) / 2  # -0.02
    expected = -math.log(1 / (1 + math.exp(-(-beta * gap))))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.err_model == pytest.approx(0.40)
    assert stats.err_ref == pytest.approx(0.42)
    assert stats.reward_gap == pytest.approx(0.02)


def test_dco_loss_per_sample_averages_the_sigmoids():
    err_model = torch.tensor([0.30, 0.50])
    err_ref = torch.tensor([0.40, 0.44])
    loss, _ = dco_loss(err_model, err_ref, 10.0, per_sample=True)
    expected = sum(-math.log(1 / (1 + math.exp(10.0 * (m - r)))) for m, r in [(0.30, 0.40), (0.50, 0.44)]) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_non_positive_beta_is_the_plain_mse(beta):
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    err = per_sample_error(pred, target)
    loss, stats = dco_loss(err, None, beta)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(pred, target).item(), rel=1e-6)
    assert stats.err_ref is None and stats.reward_gap is None


def test_equal_errors_give_ln2_and_the_gradient_pushes_err_model_down():
    err_model = torch.tensor([0.7], requires_grad=True)
    loss, _ = dco_loss(err_model, torch.tensor([0.7]), 1000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    loss.backward()
    assert err_model.grad.item() == pytest.approx(1000.0 * 0.5)  # d/dx -logσ(-βx) at 0 = β/2 > 0


def test_weights_scale_both_errors_alike():
    err_model, err_ref, w = torch.tensor([0.2, 0.4]), torch.tensor([0.3, 0.3]), torch.tensor([1.0, 0.5])
    _, stats = dco_loss(err_model, err_ref, 1.0, weights=w)
    assert stats.err_model == pytest.approx((0.2 + 0.2) / 2)
    assert stats.err_ref == pytest.approx((0.3 + 0.15) / 2)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 20.0])
    eps = min_snr_weight(snr, 5.0, "epsilon")
    v = min_snr_weight(snr, 5.0, "v_prediction")
    assert eps.tolist() == pytest.approx([1.0, 1.0, 0.25])
    assert v.tolist() == pytest.approx([0.5 / 1.5, 5 / 6, 5 / 21])


def test_velocity_target_for_v_prediction():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    v = diffusion_target(noise, x0, t, sched, "v_prediction")
    a = sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(v, a * noise - s * x0, atol=1e-6)
    assert diffusion_target(noise, x0, t, sched, "epsilon") is noise
