"""Stage `pretrain` (rule pretrain_base): train the toy base model (model_0) on the toy world's training split.

Supervised fine-tuning from scratch of a tiny LlavaForConditionalGeneration on two conversations per image: a
description (a reference caption) and yes/no questions about present and absent objects.
The captions sometimes mention an absent co-occurring object, so the model learns the language prior along with
perception — it hallucinates the way LLaVA does on COCO.

    python -m halludpo.pretrain
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from halludpo import toyworld
from halludpo.config import per_round, stage_main, to_plain
from halludpo.io import InputError, load_image, read_json, write_json
from halludpo.models import IMAGE_TOKEN, build_toy_model, save_model

log = logging.getLogger(__name__)

EXTRA_WORDS = "yes no user assistant : , . ? ! the a an of on in at and with is are there it this that".split()


# ---------------------------------------------------------------------------------------------------------------
# Data


def load_split(instances_path: str | Path, captions_path: str | Path) -> list[dict]:
    """[{image_id, file_name, objects, caption}] for a labelled split (pycocotools-compatible JSON files)."""
    instances, captions = read_json(instances_path), read_json(captions_path)
    names = {c["id"]: c["name"] for c in instances["categories"]}
    objects: dict[int, list[str]] = {im["id"]: [] for im in instances["images"]}
    for ann in instances["annotations"]:
        if ann["image_id"] not in objects:
            raise InputError(f"{instances_path}: annotation {ann['id']} refers to unknown image {ann['image_id']}")
        objects[ann["image_id"]].append(names[ann["category_id"]])
    caption_of = {c["image_id"]: c["caption"] for c in captions["annotations"]}
    missing = [i for i in objects if i not in caption_of]
    if missing:
        raise InputError(f"{captions_path}: no caption for image id(s) {missing[:5]}")
    return [{"image_id": im["id"], "file_name": im["file_name"], "objects": objects[im["id"]],
             "caption": caption_of[im["id"]]} for im in instances["images"]]


def toy_vocabulary(examples: list[dict], extra: list[str] = ()) -> list[str]:
    """Every word the toy model can read or write: captions, prompts, questions, category names, synonyms."""
    words = set(EXTRA_WORDS) | set(extra)
    texts = [e["caption"] for e in examples] + toyworld.DESCRIBE_PROMPTS
    texts += [toyworld.QUESTION_TEMPLATE] + toyworld.vocabulary_text().replace(",", " ").splitlines()
    for text in texts:
        words.update(text.lower().replace("?", " ? ").replace(".", " . ").replace(",", " , ").split())
    words.discard("{article}")
    words.discard("{obj}")
    return sorted(words)


def question(obj: str) -> str:
    return toyworld.QUESTION_TEMPLATE.format(article=toyworld.article(obj), obj=obj)


def conversations(example: dict, rng: random.Random, qa_per_image: int) -> list[list[dict]]:
    """Two conversations per image, each opening with the image: a description, and yes/no questions.

    Kept apart so that no answer can be copied from an earlier turn: both must come from the pixels, as at
    evaluation time. Questions alternate present / absent objects; half of the absent ones are co-occurrence
    partners of present objects (the hard negatives of POPE's adversarial split).
    """
    present = sorted(set(example["objects"]))
    absent_partners = sorted({p for o in present if (p := toyworld.partner_of(o)) and p not in present})
    absent = [c for c in toyworld.categories() if c not in present]
    qa = []
    for q in range(qa_per_image):
        if q % 2 == 0:
            qa.append((question(rng.choice(present)), "yes ."))
        else:
            pool = absent_partners if absent_partners and rng.random() < 0.5 else absent
            qa.append((question(rng.choice(pool)), "no ."))
    rng.shuffle(qa)
    return [as_messages([(rng.choice(toyworld.DESCRIBE_PROMPTS), example["caption"])]), as_messages(qa)]


def as_messages(turns: list[tuple[str, str]]) -> list[dict]:
    """[(user, assistant), ...] -> chat messages with the image in the first user turn."""
    messages = []
    for i, (user, assistant) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": user}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": assistant}]}]
    return messages


def encode(processor, messages: list[dict], n_image_tokens: int, max_length: int) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 outside assistant turns), from the processor's chat template.

    Each assistant span is found by rendering the template up to the turn (with the generation prompt) and up to
    its end; the image placeholder is expanded exactly as the processor does, so positions line up.
    """
    tok = processor.tokenizer
    expand = lambda text: text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)  # noqa: E731
    n_tokens = lambda text: len(tok(expand(text), add_special_tokens=False)["input_ids"])  # noqa: E731
    full = processor.apply_chat_template(messages, tokenize=False)
    input_ids = tok(expand(full), add_special_tokens=False)["input_ids"]
    labels = [-100] * len(input_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = n_tokens(processor.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = n_tokens(processor.apply_chat_template(messages[: i + 1], tokenize=False))
        labels[start:end] = input_ids[start:end]
    if len(input_ids) > max_length:
        raise ValueError(f"conversation of {len(input_ids)} tokens exceeds max_length={max_length}; raise "
                         "model.pretrain.max_length (truncation would cut a turn)")
    return input_ids, labels


def collate(batch: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """(pixel_values, input_ids, labels[, loss_weight]) items -> a right-padded batch (training needs no generation
    alignment); `loss_weights` (one per row) when the items carry them."""
    width = max(len(item[1]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (_, ids, lab, *_) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
           "pixel_values": torch.stack([item[0] for item in batch])}
    if len(batch[0]) > 3:
        out["loss_weights"] = torch.tensor([float(item[3]) for item in batch])
    return out


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy where every labelled token of row i counts w_i times:

        loss = sum_i w_i sum_t CE(i, t) / sum_i n_i      (n_i = labelled tokens of row i)

    The denominator is the plain token count, so weighting some rows leaves the others' gradient as it was (a
    weighted count would dilute them). With all w_i = 1 it is the usual mean over labelled tokens.
    """
    targets = labels[:, 1:]
    token_ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                                                 ignore_index=-100, reduction="none")
    labelled = (targets != -100).float()
    return (token_ce * labelled * row_weights.view(-1, 1)).sum() / labelled.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# Yes/no probe: is the question-answering skill there yet? (logged per epoch; POPE depends on it)


def qa_probe_items(examples: list[dict], pixel_values: torch.Tensor, processor, n_image_tokens: int,
                   max_length: int, n_images: int, seed: int) -> list[tuple[torch.Tensor, list[int], list[int]]]:
    """A fixed probe: for each of the first n_images examples one present and one absent object, asked as in
    pretraining, with the answer as labels. Its own RNG, so probing never changes the training stream."""
    rng = random.Random(f"qa-probe-{seed}")
    items = []
    for i, example in enumerate(examples[:n_images]):
        present = sorted(set(example["objects"]))
        absent = [c for c in toyworld.categories() if c not in present]
        for pool, answer in ((present, "yes ."), (absent, "no .")):
            if pool:
                messages = as_messages([(question(rng.choice(pool)), answer)])
                items.append((pixel_values[i], *encode(processor, messages, n_image_tokens, max_length)))
    return items


@torch.no_grad()
def qa_probe_accuracy(model, items: list, processor, batch_size: int = 64) -> float:
    """Fraction of probe questions whose next-token logit ranks the right answer word ("yes" / "no") above the
    other, at the answer's first position."""
    yes_id, no_id = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    was_training = model.training
    model.eval()
    correct = 0
    for b in range(0, len(items), batch_size):
        batch = collate(items[b: b + batch_size], processor.tokenizer.pad_token_id)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, labels in enumerate(batch["labels"]):
            answer_at = int((labels != -100).nonzero()[0])
            says_yes = logits[row, answer_at - 1, yes_id] > logits[row, answer_at - 1, no_id]
            correct += int(bool(says_yes) == (int(labels[answer_at]) == yes_id))
    model.train(was_training)
    return correct / max(1, len(items))


# ---------------------------------------------------------------------------------------------------------------
# Training


def epoch_qa_weight(qa_weights, epoch: int) -> float:
    """The question conversation's loss weight in an epoch: one weight, or a per-epoch schedule whose last entry
    repeats."""
    return float(per_round(qa_weights, epoch, "model.pretrain.qa_weight"))


def conversations_per_image(qa_weight: float) -> int:
    """The description, and the questions unless their weight is 0."""
    return 2 if qa_weight > 0 else 1


def pretrain_toy(examples: list[dict], images_dir: str | Path, out_dir: str | Path, arch: dict, pretrain: dict,
                 progress: bool = True) -> dict:
    """Build and train the toy model; save model + processor with save_pretrained. Returns training stats."""
    seed = pretrain["seed"]
    random.seed(seed)
    torch.manual_seed(seed)
    model, processor = build_toy_model(toy_vocabulary(examples), arch, seed)
    n_image_tokens = (arch["image_size"] // arch["patch_size"]) ** 2
    images = [load_image(Path(images_dir) / e["file_name"]) for e in examples]  # decoded now: truncation fails here
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    rng = random.Random(seed)
    n_params = sum(p.numel() for p in model.parameters())
    qa_weights = pretrain.get("qa_weight", 1.0)
    total_steps = sum(math.ceil(conversations_per_image(epoch_qa_weight(qa_weights, epoch)) * len(examples)
                                / pretrain["batch_size"]) for epoch in range(pretrain["epochs"]))
    log.info("toy model: %.2f M parameters, %d examples, %d steps", n_params / 1e6, len(examples), total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=pretrain["lr"], weight_decay=pretrain["weight_decay"])
    if total_steps < 3:
        raise ValueError(f"pretraining needs at least 3 optimizer steps, got {total_steps}: more examples or epochs")
    # OneCycleLR divides by the warm-up length in steps: at least 1 step of warm-up, whatever warmup_frac says
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=pretrain["lr"], total_steps=total_steps,
        pct_start=max(pretrain["warmup_frac"], 2 / total_steps))
    probe = qa_probe_items(examples, pixel_values, processor, n_image_tokens, pretrain["max_length"],
                           pretrain.get("qa_probe", 0), seed)
    probe_accuracy = []
    # The yes/no answers are a few tokens beside a whole description, and the skill appears late and abruptly
    # (where it stands at the last epoch then depends on float details and the seed). Weighting the question turns
    # makes it appear within a few epochs, but kept up it starves the descriptions: so the weight holds only until
    # the probe says the skill is there (qa_weight_until), then the question turns count like the descriptions.
    qa_weight_until, skill_seen = pretrain.get("qa_weight_until"), False
    model.train()
    losses, start = [], time.time()
    bar = tqdm(total=total_steps, desc="pretrain", disable=not progress)
    for epoch in range(pretrain["epochs"]):
        qa_weight = 1.0 if skill_seen else epoch_qa_weight(qa_weights, epoch)
        # fresh conversations every epoch: new question objects and turn orders (seeded)
        data = [(pixel_values[i], *encode(processor, messages, n_image_tokens, pretrain["max_length"]), weight)
                for i, e in enumerate(examples)
                for messages, weight in zip(conversations(e, rng, pretrain["qa_per_image"]), (1.0, qa_weight))
                if weight > 0]  # a weight of 0: the epoch has no question conversations at all
        order = list(range(len(data)))
        rng.shuffle(order)
        for b in range(0, len(order), pretrain["batch_size"]):
            batch = collate([data[i] for i in order[b: b + pretrain["batch_size"]]], processor.tokenizer.pad_token_id)
            weights = batch.pop("loss_weights")
            if qa_weight in (0.0, 1.0):  # every row weighs 1: the model's own loss (the same bytes as before)
                loss = model(**batch).loss
            else:
                labels = batch.pop("labels")
                loss = weighted_lm_loss(model(**batch).logits, labels, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)  # tqdm refreshes on its interval
        if probe:
            probe_accuracy.append(qa_probe_accuracy(model, probe, processor))
            log.info("epoch %d: yes/no probe accuracy %.3f (%d questions on training images, question weight %g)",
                     epoch, probe_accuracy[-1], len(probe), qa_weight)
            skill_seen = skill_seen or (qa_weight_until is not None and probe_accuracy[-1] >= qa_weight_until)
    bar.close()
    model.eval()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, processor, tmp)
    stats = {"parameters": n_params, "examples": len(examples), "steps": total_steps,
             "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.time() - start, 1),
             "loss_curve": losses[:: max(1, len(losses) // 100)], "qa_probe_accuracy": probe_accuracy}
    write_json(tmp / "pretrain_stats.json", {k: v for k, v in stats.items() if k != "seconds"})  # bytes, no timings
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return stats


def run(cfg: DictConfig) -> None:
    if cfg.model.family != "toy":
        raise ValueError(f"model.family={cfg.model.family!r} is pretrained already; pretrain_base is for 'toy'")
    examples = load_split(cfg.data.train_instances, cfg.data.train_captions)
    m = to_plain(cfg.model)
    # a fixed thread count, whatever the rule was given: it decides how reductions split, and so model_0's bytes
    threads = m["pretrain"].get("threads")
    if threads:
        torch.set_num_threads(threads)
    log.info("pretraining on %d CPU threads, ATen kernels %s", torch.get_num_threads(),
             torch.backends.cpu.get_cpu_capability())
    stats = pretrain_toy(examples, cfg.data.train_images, cfg.model.path, m["arch"], m["pretrain"])
    log.info("pretrained in %.0f s, final loss %.3f -> %s", stats["seconds"], stats["final_loss"], cfg.model.path)


main = stage_main(run)

if __name__ == "__main__":
    main()
