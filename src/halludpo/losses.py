"""Preference losses as small pure functions over summed log-probs.

Layout used everywhere: a (segments x batch) tensor of summed response log-probs, one row per scored
(image, response) segment. Plain DPO and C-DPO have 2 segments, rows [chosen, rejected]; mDPO and SymMPO add
image-contrast segments. `policy` and `reference` have the same layout.
r(s) = policy[s] - reference[s] is the implicit reward without beta (methods.md).
"""

from __future__ import annotations

from collections.abc import Callable

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


LOSSES: dict[str, Callable[..., LossOutput]] = {"sigmoid": sigmoid_dpo, "cdpo": context_dpo}
N_SEGMENTS = {"sigmoid": 2, "cdpo": 2}


def preference_loss(name: str, policy: torch.Tensor, reference: torch.Tensor, **params) -> LossOutput:
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; valid: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](policy, reference, **params)
