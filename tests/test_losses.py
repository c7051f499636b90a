import math

import pytest
import torch

from halludpo.losses import context_dpo, preference_loss, sigmoid_dpo


def test_sigmoid_dpo_hand_computed():
    # pair 1: r(y_w) = -10 - (-12) = 2, r(y_l) = -20 - (-19) = -1 -> margin 3, beta 0.1 -> -log sigmoid(0.3)
    # pair 2: r(y_w) = -5 - (-5) = 0, r(y_l) = -6 - (-6) = 0 -> -log sigmoid(0) = log 2
    policy = torch.tensor([[-10.0, -5.0], [-20.0, -6.0]])
    reference = torch.tensor([[-12.0, -5.0], [-19.0, -6.0]])
    losses, chosen, rejected = sigmoid_dpo(policy, reference, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.3)), math.log(2)])
    assert chosen.tolist() == pytest.approx([0.2, 0.0])
    assert rejected.tolist() == pytest.approx([-0.1, 0.0])
    assert not chosen.requires_grad


def test_gradient_raises_chosen_and_lowers_rejected():
    policy = torch.tensor([[-3.0], [-4.0]], requires_grad=True)
    losses, _, _ = sigmoid_dpo(policy, torch.tensor([[-3.0], [-4.0]]), beta=0.5)
    losses.sum().backward()
    assert policy.grad[0, 0] < 0 < policy.grad[1, 0]  # descent raises log pi(y_w), lowers log pi(y_l)
    assert policy.grad[0, 0].item() == pytest.approx(-0.25)  # -beta * sigmoid(0) = -0.25


def test_cdpo_hand_computed_and_registry_names_losses():
    # C-DPO = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]), beta 0.5:
    # pair 1: r(y_w) = -4 - (-6) = 2, r(y_l) = -9 - (-8) = -1 -> margin 3 -> -log sigmoid(1.5) = log(1 + e^-1.5)
    # pair 2: r(y_w) = -3 - (-2) = -1, r(y_l) = -7 - (-9) = 2 -> margin -3 -> -log sigmoid(-1.5) = log(1 + e^1.5)
    policy = torch.tensor([[-4.0, -3.0], [-9.0, -7.0]])
    reference = torch.tensor([[-6.0, -2.0], [-8.0, -9.0]])
    expected = [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1.5))]
    for losses, chosen, rejected in (context_dpo(policy, reference, beta=0.5),
                                     preference_loss("cdpo", policy, reference, beta=0.5)):
        assert losses.tolist() == pytest.approx(expected)
        assert chosen.tolist() == pytest.approx([1.0, -0.5])  # beta * r(y_w)
        assert rejected.tolist() == pytest.approx([-0.5, 1.0])  # beta * r(y_l)
    policy, reference = torch.randn(2, 4), torch.randn(2, 4)
    assert torch.equal(preference_loss("sigmoid", policy, reference, beta=0.1)[0], sigmoid_dpo(policy, reference)[0])
    with pytest.raises(ValueError, match="unknown preference loss 'ipo'; valid: cdpo, mdpo, sigmoid, symmpo"):
        preference_loss("ipo", policy, reference)
    with pytest.raises(ValueError, match=r"expected policy and reference of shape \(2, batch\)"):
        sigmoid_dpo(torch.zeros(3, 2), torch.zeros(3, 2))
