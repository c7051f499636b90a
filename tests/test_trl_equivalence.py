"""Our sigmoid DPO loss equals TRL's DPOTrainer loss on the same tiny model and batch (TRL is a test-only dependency).

TRL side (trl 1.16): `DPOTrainer(...)` tokenises the text dataset (`_prepare_dataset`), `get_train_dataloader()`
collates a batch with its `DataCollatorForPreference` ([chosen_1..B; rejected_1..B], right-padded, completion_mask),
and `compute_loss(model, batch)` runs its own policy/reference forwards (fused LM head) and loss.

Our side: the same token sequences built independently, labels masking the prompt, `collate_segments` ->
`summed_logps` (policy and reference logits) -> (2, B) -> `sigmoid_dpo` -> mean.

What TRL scores, read from trl/trainer/dpo_trainer.py (1.16):
  * non-conversational data: `add_eos` appends the tokenizer's EOS *string* to chosen and rejected, so the scored
    completion is the response tokens + EOS; we append EOS the same way.
  * prompt, prompt+chosen and prompt+rejected are tokenised with `tokenizer(text=...)`; the word tokenizer has no
    post-processor, so no BOS is added (asserted below) and we add none either.
  * labels = input_ids with completion_mask == 0 set to -100: prompt and padding masked, every completion token
    (EOS included) scored, the first completion token predicted from the last prompt position — the same shift by one
    as `summed_logps`.
  * with loss_type=["sigmoid"], ld_alpha=None, use_weighting=False, label_smoothing=0, f_divergence_type="reverse_kl"
    the loss is mean(-logsigmoid(beta * (chosen_logratios - rejected_logratios))) over summed (not length-normalised)
    log-probs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from halludpo.losses import sigmoid_dpo
from halludpo.models import build_word_tokenizer
from halludpo.logprobs import IGNORE, collate_segments, summed_logps

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

BETA = 0.1
MAX_LENGTH = 64  # far above the longest sequence here (asserted), so TRL truncates nothing

# Completions start with a space: TRL concatenates prompt + completion strings as they are.
EXAMPLES = [
    {"prompt": "is there a red cat on the mat ?", "chosen": " yes , a red cat sits on the mat .",
     "rejected": " no ."},
    {"prompt": "what is on the rug ?", "chosen": " a blue dog .", "rejected": " a red cat and a blue dog sit there ."},
    {"prompt": "describe the image .", "chosen": " a dog sits on a rug near the mat .",
     "rejected": " a cat sits on a red mat near a blue dog ."},
    {"prompt": "is the dog blue ?", "chosen": " yes .", "rejected": " no , the dog is red ."},
]


def _words() -> list[str]:
    return sorted({w for ex in EXAMPLES for text in ex.values() for w in text.split()})


def _tiny_models(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).float()
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # perturb the reference so the log-ratios, and hence the loss, are far from log 2
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    policy.eval()
    reference.eval()
    return policy, reference


def _our_segments(tokenizer) -> list[dict]:
    """[chosen_1..B, rejected_1..B]: prompt + response + EOS (as TRL's add_eos), labels = response + EOS only."""
    segments = {"chosen": [], "rejected": []}
    for ex in EXAMPLES:
        prompt_ids = tokenizer(ex["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            response_ids = tokenizer(ex[key])["input_ids"] + [tokenizer.eos_token_id]
            input_ids = torch.tensor(prompt_ids + response_ids)
            labels = input_ids.clone()
            labels[: len(prompt_ids)] = IGNORE
            segments[key].append({"input_ids": input_ids, "labels": labels})
    return segments["chosen"] + segments["rejected"]


def test_sigmoid_dpo_matches_trl_dpo_trainer(tmp_path):
    from trl import DPOConfig, DPOTrainer

    tokenizer = build_word_tokenizer(_words())
    assert tokenizer.bos_token_id not in tokenizer("the dog")["input_ids"]  # no BOS is added, by TRL or by us
    policy, reference = _tiny_models(tokenizer)
    n = len(EXAMPLES)

    # --- ours (before DPOTrainer patches a fused LM head onto the models' forward)
    batch = collate_segments(_our_segments(tokenizer), tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] < MAX_LENGTH
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        policy_logps, _ = summed_logps(policy(**inputs).logits, batch["labels"])
        reference_logps, _ = summed_logps(reference(**inputs).logits, batch["labels"])
    losses, _, _ = sigmoid_dpo(policy_logps.view(2, n), reference_logps.view(2, n), beta=BETA)
    ours = losses.mean().item()

    # --- TRL, through its own dataset preparation, collator, dataloader and compute_loss
    args = DPOConfig(
        output_dir=str(tmp_path), beta=BETA, loss_type=["sigmoid"], ld_alpha=None, label_smoothing=0.0,
        use_weighting=False, f_divergence_type="reverse_kl", max_length=MAX_LENGTH, truncation_mode="keep_start",
        per_device_train_batch_size=n, train_sampling_strategy="sequential", report_to="none", use_cpu=True,
        bf16=False, disable_dropout=True, precompute_ref_log_probs=False, dataloader_num_workers=0, seed=0,
        activation_checkpointing=False,  # TRL defaults gradient_checkpointing=True; this is its transformers-5 name
    )
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(EXAMPLES))
    trl_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trl_batch).item()

    # Both sides score exactly the same tokens: same sequences, same padding, same scored positions.
    assert torch.equal(trl_batch["input_ids"].cpu(), batch["input_ids"])
    assert torch.equal(trl_batch["attention_mask"].cpu(), batch["attention_mask"])
    assert torch.equal(trl_batch["completion_mask"].cpu().bool(), batch["labels"] != IGNORE)

    assert abs(trl_loss - math.log(2)) > 1e-3, "reference too close to the policy: the comparison would be vacuous"
    assert abs(ours - trl_loss) < 1e-5, (ours, trl_loss)
