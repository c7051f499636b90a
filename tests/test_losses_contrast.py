"""mDPO and SymMPO losses against hand-computed values; per-term metrics."""

import math

import pytest
import torch

from halludpo.losses import (LOSSES, N_SEGMENTS, loss_terms, mdpo, preference_loss, sigmoid_dpo, symmpo,
                             symmpo_terms)


def nls(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), written out by hand."""
    return math.log(1 + math.exp(-x))


def logps_with_rewards(rewards: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) whose difference is `rewards`, with non-trivial absolute values."""
    reference = -torch.arange(1, 1 + len(rewards) * len(rewards[0]), dtype=torch.float64).reshape(len(rewards), -1)
    return reference + torch.tensor(rewards, dtype=torch.float64), reference


def test_mdpo_hand_computed():
    # rows [y_w|m, y_l|m, y_w|m_c]; column 0: r = (2, -1, -2); column 1: r = (0, 0, 1)
    policy = torch.tensor([[-10.0, -5.0], [-20.0, -6.0], [-15.0, -3.0]])
    reference = torch.tensor([[-12.0, -5.0], [-19.0, -6.0], [-13.0, -4.0]])
    losses, chosen, rejected = mdpo(policy, reference, beta=0.1)
    expected_0 = nls(0.1 * 3) + nls(0.1 * 4) + nls(0.1 * 2)  # dpo (2 - -1), image (2 - -2), anchor 2
    expected_1 = nls(0.0) + nls(0.1 * -1) + nls(0.0)  # dpo 0, image (0 - 1), anchor 0
    assert losses.tolist() == pytest.approx([expected_0, expected_1])
    assert chosen.tolist() == pytest.approx([0.2, 0.0])
    assert rejected.tolist() == pytest.approx([-0.1, 0.0])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_mdpo_beta_scales_every_term():
    policy, reference = logps_with_rewards([[2.0], [-1.0], [-2.0]])
    losses, _, _ = mdpo(policy, reference, beta=0.5)
    assert losses.item() == pytest.approx(nls(0.5 * 3) + nls(0.5 * 4) + nls(0.5 * 2))


def test_symmpo_hand_computed_with_given_parameters():
    # rows [y_w|m, y_l|m, y'_w|m, y_w|m', y'_w|m']; r = (2, -1, 0.5, 1, 3)
    policy, reference = logps_with_rewards([[2.0], [-1.0], [0.5], [1.0], [3.0]])
    losses, chosen, rejected = symmpo(policy, reference, beta1=0.1, beta2=0.2, lam=0.5, gamma=0.01)
    h_dpo, h1, h2 = 2 - -1, 2 - 0.5, 3 - 1
    expected = (nls(0.1 * h_dpo) + 0.5 * (nls(0.1 * h1) + nls(0.1 * h2))
                + nls(0.1 * 2) + nls(0.2 * 3) + 0.01 * (h1 - h2) ** 2)
    assert losses.item() == pytest.approx(expected)
    assert chosen.item() == pytest.approx(0.2)
    assert rejected.item() == pytest.approx(-0.1)


def test_symmpo_defaults_are_methods_md():
    # b1 = b2 = 0.1, lambda = 0.5, gamma = 1e-4; r = (1, -3, -2, 4, 0.5): h_dpo 4, h1 3, h2 -3.5
    policy, reference = logps_with_rewards([[1.0], [-3.0], [-2.0], [4.0], [0.5]])
    expected = (nls(0.4) + 0.5 * (nls(0.3) + nls(-0.35)) + nls(0.1) + nls(0.05) + 1e-4 * (3 - -3.5) ** 2)
    assert symmpo(policy, reference)[0].item() == pytest.approx(expected)


def test_symmpo_margin_term_is_unscaled():
    # h1 = 40, h2 = 0: gamma * (h1 - h2)^2 = 1e-4 * 1600 = 0.16; scaled by beta it would be 0.0016
    policy, reference = logps_with_rewards([[40.0], [0.0], [0.0], [0.0], [0.0]])
    terms = loss_terms("symmpo", policy, reference)
    assert terms["loss/margin"].item() == pytest.approx(0.16)
    with_gamma = symmpo(policy, reference, gamma=1e-4)[0]
    without_gamma = symmpo(policy, reference, gamma=0.0)[0]
    assert (with_gamma - without_gamma).item() == pytest.approx(0.16)


def test_gradients_flow_to_every_segment_with_hand_computed_values():
    # at r = 0 every sigmoid is 1/2: d(-log sigmoid(b*h))/dh = -b/2
    policy = torch.full((3, 1), -4.0, requires_grad=True)
    mdpo(policy, torch.full((3, 1), -4.0), beta=0.1)[0].sum().backward()
    assert policy.grad[:, 0].tolist() == pytest.approx([-0.15, 0.05, 0.05])

    policy = torch.full((5, 1), -4.0, requires_grad=True)
    symmpo(policy, torch.full((5, 1), -4.0), beta1=0.1, beta2=0.1, lam=0.5, gamma=1e-4)[0].sum().backward()
    # row 0: dpo -0.05, image -0.025, anchor -0.05; row 4: image_contrast -0.025, anchor_contrast -0.05
    assert policy.grad[:, 0].tolist() == pytest.approx([-0.125, 0.05, 0.025, 0.025, -0.075])


def test_margin_term_gradient():
    # only the margin term, at h1 = 2, h2 = 0: d/d r0 of gamma*(h1-h2)^2 = 2*gamma*2, and through h2 on rows 3, 4
    policy = torch.tensor([[2.0], [0.0], [0.0], [0.0], [0.0]], requires_grad=True)
    terms = loss_terms("symmpo", policy, torch.zeros(5, 1))
    assert not terms["loss/margin"].requires_grad
    symmpo_terms(policy, torch.zeros(5, 1), gamma=0.5)["margin"].loss.sum().backward()
    assert policy.grad[:, 0].tolist() == pytest.approx([2.0, 0.0, -2.0, 2.0, -2.0])


@pytest.mark.parametrize(("loss", "n"), [(mdpo, 3), (symmpo, 5)])
def test_shape_errors(loss, n):
    with pytest.raises(ValueError, match=rf"expected policy and reference of shape \({n}, batch\)"):
        loss(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=rf"\({n}, batch\), got \({n}, 4\) and \({n}, 3\)"):
        loss(torch.zeros(n, 4), torch.zeros(n, 3))
    with pytest.raises(ValueError, match="expected policy and reference"):
        loss(torch.zeros(n), torch.zeros(n))


def test_registry_and_segments():
    assert LOSSES["mdpo"] is mdpo and LOSSES["symmpo"] is symmpo
    assert N_SEGMENTS["mdpo"] == 3 and N_SEGMENTS["symmpo"] == 5
    policy, reference = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(preference_loss("symmpo", policy, reference, lam=0.3)[0], symmpo(policy, reference, lam=0.3)[0])
    assert torch.equal(preference_loss("mdpo", policy[:3], reference[:3])[0], mdpo(policy[:3], reference[:3])[0])


@pytest.mark.parametrize(("name", "params"), [("sigmoid", {"beta": 0.3}), ("cdpo", {}), ("mdpo", {"beta": 0.2}),
                                             ("symmpo", {"beta1": 0.2, "beta2": 0.3, "lam": 0.7, "gamma": 0.01})])
def test_loss_terms_sum_to_the_loss(name, params):
    torch.manual_seed(0)
    policy, reference = torch.randn(N_SEGMENTS[name], 6), torch.randn(N_SEGMENTS[name], 6)
    terms = loss_terms(name, policy, reference, **params)
    total = sum(v for k, v in terms.items() if k.startswith("loss/"))
    assert torch.allclose(total, preference_loss(name, policy, reference, **params)[0])
    assert all(v.shape == (6,) for v in terms.values())


def test_loss_terms_names_and_accuracies():
    # r = (2, -1, 0.5, 1, 3) and (-1, 0, 0, 2, 1): h_dpo (3, -1), h1 (1.5, -1), h2 (2, -1)
    policy, reference = logps_with_rewards([[2.0, -1.0], [-1.0, 0.0], [0.5, 0.0], [1.0, 2.0], [3.0, 1.0]])
    terms = loss_terms("symmpo", policy, reference)
    assert sorted(terms) == sorted(
        [f"loss/{t}" for t in ("dpo", "image", "image_contrast", "anchor", "anchor_contrast", "margin")]
        + [f"accuracy/{t}" for t in ("dpo", "image", "image_contrast", "anchor", "anchor_contrast")])
    assert terms["accuracy/dpo"].tolist() == [1.0, 0.0]
    assert terms["accuracy/image"].tolist() == [1.0, 0.0]
    assert terms["accuracy/image_contrast"].tolist() == [1.0, 0.0]
    assert terms["accuracy/anchor"].tolist() == [1.0, 0.0]
    assert terms["accuracy/anchor_contrast"].tolist() == [1.0, 1.0]
    assert terms["loss/image"][0].item() == pytest.approx(0.5 * nls(0.15))  # lambda-weighted, as in the loss

    assert sorted(loss_terms("mdpo", policy[:3], reference[:3])) == [
        "accuracy/anchor", "accuracy/dpo", "accuracy/image", "loss/anchor", "loss/dpo", "loss/image"]
    dpo = loss_terms("sigmoid", policy[:2], reference[:2], beta=0.1)
    assert torch.allclose(dpo["loss/dpo"], sigmoid_dpo(policy[:2], reference[:2])[0])
    with pytest.raises(ValueError, match="unknown preference loss 'ipo'; valid: cdpo, mdpo, sigmoid, symmpo"):
        loss_terms("ipo", policy, reference)
