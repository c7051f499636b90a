"""Preference losses as small pure functions over summed log-probs.

Layout used everywhere: a (segments x batch) tensor of summed response log-probs, one row per scored
(image, response) segment. Plain DPO and C-DPO have 2 segments, rows [chosen, rejected]; mDPO and SymMPO add
image-contrast segments. `policy` and `reference` have the same layout.
r(s) = policy[s] - reference[s] is the implicit reward without beta (docs/methods.md).

Row orders (segments):
    sigmoid, cdpo  (2): [y_w | m, y_l | m]
    mdpo           (3): [y_w | m, y_l | m, y_w | m_c]                    m_c = corrupted m (contrast.corrupt_image)
    symmpo         (5): [y_w | m, y_l | m, y'_w | m, y_w | m', y'_w | m']  m' = contrast image, y'_w its chosen
The first two rows are always the plain DPO pair, so chosen/rejected rewards mean the same thing in every loss.

Per-term metrics: LOSS_TERMS maps each loss name to a function returning its per-example terms; `loss_terms`
returns them detached as {"loss/<term>": (B,), "accuracy/<term>": (B,) of 0./1.}. The "loss/" terms sum to the
loss; "accuracy/<term>" is 1 where that term's margin (the quantity inside its logsigmoid) is positive. A term
without a margin (SymMPO's squared margin difference) has no accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (losses, chosen_rewards, rejected_rewards), (B,)


def sigmoid_dpo(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> LossOutput:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7).

        L = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

    Args:
        policy, reference: (2, B) summed log-probs, rows [chosen, rejected].
        beta: strength of the KL constraint (0.1 in APASI, SENTINEL, SymMPO, mDPO).
    Returns:
        losses (B,), chosen_rewards (B,) = beta * r(y_w), rejected_rewards (B,) = beta * r(y_l); rewards detached.
    """
    check_segments(policy, reference, 2)
    chosen_logratios = policy[0] - reference[0]
    rejected_logratios = policy[1] - reference[1]
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def context_dpo(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> LossOutput:
    """C-DPO (SENTINEL): sigmoid DPO on (image, question, context) -> y_win vs y_lose.

    The formula is sigmoid_dpo's; what differs is the scoring: question AND context tokens are masked out of the
    log-probs (only the sentence after the context is scored), which the trainer does through the labels.
    """
    return sigmoid_dpo(policy, reference, beta)


def check_segments(policy: torch.Tensor, reference: torch.Tensor, n_segments: int) -> None:
    if policy.shape != reference.shape or policy.dim() != 2 or policy.shape[0] != n_segments:
        raise ValueError(f"expected policy and reference of shape ({n_segments}, batch), "
                         f"got {tuple(policy.shape)} and {tuple(reference.shape)}")


class Term(NamedTuple):
    """One per-example loss term (B,) and its margin (B,), the quantity whose sign says the order is right."""

    loss: torch.Tensor
    margin: torch.Tensor | None


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> dict[str, Term]:
    """sigmoid_dpo's single term: dpo = -log sigmoid(beta * [r(m,y_w) - r(m,y_l)]). Rows [y_w|m, y_l|m]."""
    check_segments(policy, reference, 2)
    r = policy - reference
    return {"dpo": logsigmoid_term(beta, r[0] - r[1])}


def mdpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> dict[str, Term]:
    """The three per-example terms of `mdpo` (same rows and formula), keyed dpo, image, anchor."""
    check_segments(policy, reference, 3)
    r = policy - reference
    return {
        "dpo": logsigmoid_term(beta, r[0] - r[1]),
        "image": logsigmoid_term(beta, r[0] - r[2]),
        "anchor": logsigmoid_term(beta, r[0]),
    }


def mdpo(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> LossOutput:
    """mDPO, conditional preference optimisation (Wang et al. 2024; docs/methods.md "mDPO").

        L = -log sigmoid(beta * [r(m, y_w) - r(m, y_l)])      response preference (plain DPO)
            -log sigmoid(beta * [r(m, y_w) - r(m_c, y_w)])    image-conditional: y_w is better with m than with m_c
            -log sigmoid(beta * r(m, y_w))                    anchor: keep the chosen reward positive (threshold 0)

    with r(m, y) = log pi(y | m, x) - log pi_ref(y | m, x) and m_c the corrupted image (a random crop keeping
    1-20% of the area, resized back, sampled once per example so policy and reference see the same crop).

    Args:
        policy, reference: (3, B) summed log-probs, rows [y_w | m, y_l | m, y_w | m_c].
        beta: strength of the KL constraint, shared by the three terms (0.1 in mDPO).
    Returns:
        losses (B,), chosen_rewards (B,) = beta * r(m, y_w), rejected_rewards (B,) = beta * r(m, y_l); rewards
        detached.
    """
    terms = mdpo_terms(policy, reference, beta)
    return sum_terms(terms), *pair_rewards(policy, reference, beta)


def symmpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta1: float = 0.1, beta2: float = 0.1,
                 lam: float = 0.5, gamma: float = 1e-4) -> dict[str, Term]:
    """The six per-example terms of `symmpo` (same rows and formula, weights applied), keyed dpo, image,
    image_contrast, anchor, anchor_contrast, margin."""
    check_segments(policy, reference, 5)
    r = policy - reference
    h1 = r[0] - r[2]  # y_w beats y'_w on m
    h2 = r[4] - r[3]  # y'_w beats y_w on m'
    image, image_contrast = logsigmoid_term(beta1, h1), logsigmoid_term(beta1, h2)
    return {
        "dpo": logsigmoid_term(beta1, r[0] - r[1]),
        "image": Term(lam * image.loss, h1),
        "image_contrast": Term(lam * image_contrast.loss, h2),
        "anchor": logsigmoid_term(beta1, r[0]),
        "anchor_contrast": logsigmoid_term(beta2, r[4]),
        "margin": Term(gamma * (h1 - h2) ** 2, None),
    }


def symmpo(policy: torch.Tensor, reference: torch.Tensor, beta1: float = 0.1, beta2: float = 0.1,
           lam: float = 0.5, gamma: float = 1e-4) -> LossOutput:
    """SymMPO, symmetric multimodal preference optimisation (docs/methods.md "SymMPO").

        h_dpo = r(m, y_w) - r(m, y_l)
        h1    = r(m, y_w) - r(m, y'_w)        y_w fits m better than the contrast image's answer does
        h2    = r(m', y'_w) - r(m', y_w)      and symmetrically y'_w fits m' better than y_w does
        L = -log sigmoid(beta1 * h_dpo)
            + lam * (-log sigmoid(beta1 * h1) - log sigmoid(beta1 * h2))
            - log sigmoid(beta1 * r(m, y_w)) - log sigmoid(beta2 * r(m', y'_w))
            + gamma * (h1 - h2)^2

    The margin term uses the UN-scaled margins h1, h2 (no beta), as the original does.

    Args:
        policy, reference: (5, B) summed log-probs, rows [y_w | m, y_l | m, y'_w | m, y_w | m', y'_w | m'],
            with m' the contrast image and y'_w its preferred response to the same question.
        beta1: beta of the DPO, both image-contrast terms and the anchor on m (0.1).
        beta2: beta of the anchor on m' (0.1).
        lam: weight of the two image-contrast terms (0.5).
        gamma: weight of the squared margin difference (1e-4).
    Returns:
        losses (B,), chosen_rewards (B,) = beta1 * r(m, y_w), rejected_rewards (B,) = beta1 * r(m, y_l); rewards
        detached.
    """
    terms = symmpo_terms(policy, reference, beta1, beta2, lam, gamma)
    return sum_terms(terms), *pair_rewards(policy, reference, beta1)


def logsigmoid_term(beta: float, margin: torch.Tensor) -> Term:
    return Term(-F.logsigmoid(beta * margin), margin)


def sum_terms(terms: dict[str, Term]) -> torch.Tensor:
    return torch.stack([t.loss for t in terms.values()]).sum(0)


def pair_rewards(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * r of rows 0 and 1 (the plain chosen/rejected pair), detached."""
    rewards = beta * (policy[:2] - reference[:2]).detach()
    return rewards[0], rewards[1]


LOSSES: dict[str, Callable[..., LossOutput]] = {"sigmoid": sigmoid_dpo, "cdpo": context_dpo, "mdpo": mdpo,
                                                "symmpo": symmpo}
N_SEGMENTS = {"sigmoid": 2, "cdpo": 2, "mdpo": 3, "symmpo": 5}
LOSS_TERMS: dict[str, Callable[..., dict[str, Term]]] = {"sigmoid": dpo_terms, "cdpo": dpo_terms,
                                                         "mdpo": mdpo_terms, "symmpo": symmpo_terms}


def preference_loss(name: str, policy: torch.Tensor, reference: torch.Tensor, **params) -> LossOutput:
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](policy, reference, **params)


def loss_terms(name: str, policy: torch.Tensor, reference: torch.Tensor, **params) -> dict[str, torch.Tensor]:
    """Detached per-example (B,) metrics of loss `name`: "loss/<term>" (summing to the loss) and
    "accuracy/<term>" (1. where the term's margin is positive). `params` are the loss's own parameters."""
    if name not in LOSS_TERMS:
        raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(sorted(LOSS_TERMS))}")
    metrics = {}
    for key, term in LOSS_TERMS[name](policy, reference, **params).items():
        metrics[f"loss/{key}"] = term.loss.detach()
        if term.margin is not None:
            metrics[f"accuracy/{key}"] = (term.margin.detach() > 0).float()
    return metrics
