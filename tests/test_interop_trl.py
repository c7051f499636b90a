"""TRL exports against TRL's own DPOTrainer (trl 1.16, a test-only dependency) on tiny random VLMs built offline.

An export written in the project root (whose pairs hold paths like results/data/...) trains from another folder;
for SENTINEL's sentence pairs TRL's vision collator ([chosen_1..B; rejected_1..B], completion_mask) scores exactly
the tokens our trainer scores (logprobs.encode_segment): the new sentence, with the end-of-turn only where the
sentence ends the answer. Plain-text rows go through TRL's collator untokenized beforehand (vision datasets skip
its dataset preparation), so its batch is where the scored token ids are read.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from halludpo.interop import export_pairs, import_pairs, main
from halludpo.io import InputError, read_jsonl, write_jsonl
from halludpo.logprobs import IGNORE, encode_segment, render_turn, scores_end
from tests.tiny_families import BUILDERS

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

IMAGES = {"results/data/toy/images/1.png": "red", "results/data/toy/images/2.png": "blue"}
CONTEXT = "The image shows a red square."
PAIRS = [
    {"image_id": "1", "image_path": "results/data/toy/images/1.png", "prompt": "Please describe this image in detail.",
     "context": "", "chosen": "The image shows a red square on a white background.",
     "rejected": "The image shows a red square and a dog.", "method": "apasi",
     "meta": {"mode": "insert", "injected_objects": ["dog"], "round": 0},
     "ref_logps": {"chosen": -3.5, "rejected": -7.0}},
    {"image_id": "2", "image_path": "results/data/toy/images/2.png", "prompt": "Please describe this image in detail.",
     "context": CONTEXT, "chosen": "A blue circle is next to a green tree.",
     "rejected": "There is a dog, a cat and a cup on the table.", "method": "sentinel",
     "meta": {"step": 1, "type": "context-coherent", "is_last_sent": False, "chosen_objects": ["circle", "tree"]}},
    {"image_id": "2", "image_path": "results/data/toy/images/2.png", "prompt": "Please describe this image in detail.",
     "context": f"{CONTEXT} A blue circle is next to a green tree.", "chosen": "The picture shows a park.",
     "rejected": "There is a dog on the table.", "method": "sentinel",
     "meta": {"step": 2, "type": "context-coherent", "is_last_sent": True, "chosen_objects": ["park"]}},
    # a stop pair: the empty response is "end the answer here" (its end-of-turn is all it says)
    {"image_id": "2", "image_path": "results/data/toy/images/2.png", "prompt": "Please describe this image in detail.",
     "context": CONTEXT, "chosen": "", "rejected": "There is a cup on the table.", "method": "sentinel",
     "meta": {"step": 1, "type": "stop_over_hallucinated", "is_last_sent": False, "n_empty": 3}},
]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root holding the images under results/data/ and pairs.jsonl with paths relative to it; the test
    starts in it (as the pipeline's users do)."""
    root = tmp_path / "project"
    for rel, color in IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), color).save(root / rel)
    write_jsonl(root / "results" / "pairs.jsonl", PAIRS)
    monkeypatch.chdir(root)
    return root


def tiny_family(family: str):
    """(model, processor) of tests/tiny_families.py; llava's tokenizer adds BOS itself, as llava-hf's does (the
    exported prompt then starts with the BOS string: TRL tokenizes without special tokens, our trainer with)."""
    from tokenizers.processors import TemplateProcessing

    model, processor = BUILDERS[family]()
    if family == "llava":
        tokenizer = processor.tokenizer
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)])
        assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    return model, processor


def end_of_turn(processor) -> list[int]:
    """The token ids the chat template puts after the assistant's text."""
    text = render_turn(processor, "Hi", "Done.")
    return processor.tokenizer(text[text.rfind("Done.") + len("Done."):], add_special_tokens=False)["input_ids"]


def trl_trainer(model, processor, dataset, out_dir):
    from trl import DPOConfig, DPOTrainer

    reference = copy.deepcopy(model)
    args = DPOConfig(
        output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=len(PAIRS), learning_rate=1e-3,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, bf16=False, save_strategy="no",
        dataloader_num_workers=0, seed=0, max_length=None, precompute_ref_log_probs=False,
        activation_checkpointing=False,  # TRL defaults gradient_checkpointing=True; this is its transformers-5 name
    )
    return DPOTrainer(model=model, ref_model=reference, args=args, processing_class=processor, train_dataset=dataset)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_trl_trains_from_another_folder_scoring_only_the_new_sentence(project, tmp_path, monkeypatch, family,
                                                                      one_torch_thread):
    model, processor = tiny_family(family)
    out = tmp_path / "export" / "trl.jsonl"
    stats = export_pairs("trl", "results/pairs.jsonl", out, processor=processor)
    assert stats["image_paths"] == "absolute" and stats["context"] == "prompt" and stats["continuing_pairs"] == 3
    assert stats["token_mismatches"] == 0
    records = read_jsonl(out)
    assert all(r["images"] == [str(project / PAIRS[i]["image_path"])] for i, r in enumerate(records))
    assert all(isinstance(r["prompt"], str) for r in records)  # plain text: the context sits in the prompt
    assert records[1]["prompt"].endswith(CONTEXT) and records[1]["chosen"] == " " + PAIRS[1]["chosen"]
    # the file says what its paths are
    assert json.loads(records[0]["halludpo"])["export"]["image_paths"] == "absolute"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    dataset = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    trainer = trl_trainer(model, processor, dataset, tmp_path / "trl_out")

    # TRL's batch: [chosen_1..B; rejected_1..B], flushed left; completion_mask = the tokens it scores
    batch = next(iter(trainer.get_train_dataloader()))
    n = len(PAIRS)
    for i, row in enumerate(PAIRS):
        image = Image.open(project / row["image_path"]).convert("RGB")
        for k, key in enumerate(("chosen", "rejected")):
            keep = batch["attention_mask"][k * n + i].bool()
            ids, scored = batch["input_ids"][k * n + i][keep], batch["completion_mask"][k * n + i][keep].bool()
            ours = encode_segment(processor, image, row["prompt"], row["context"], row[key], max_length=512,
                                  score_end=scores_end(row, row[key]))
            # the sequence our trainer sees, up to its last scored token (it keeps an unscored end-of-turn after a
            # sentence that continues the answer; a causal model's scores do not depend on it)
            ours_scored = ours["labels"] != IGNORE
            assert torch.equal(ids, ours["input_ids"][:len(ids)]) and not ours_scored[len(ids):].any(), (i, key)
            assert torch.equal(scored, ours_scored[:len(ids)]), (family, i, key)  # the same scored tokens
            # read as text: the new sentence, never the context; the end-of-turn (llava-1.5's is a space) only
            # where the response ends the answer
            text = processor.tokenizer.decode(ids[scored])
            assert text.strip().startswith(row[key]) and (CONTEXT not in text or not row["context"])
            bare = encode_segment(processor, image, row["prompt"], row["context"], row[key], max_length=512,
                                  score_end=False)
            with_end = int(scored.sum()) - int((bare["labels"] != IGNORE).sum())
            assert with_end == (0 if not scores_end(row, row[key]) else len(end_of_turn(processor))), (i, key)

    trainer.train()
    assert trainer.state.global_step == 1
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)

    # what failed before: paths relative to the project root do not load from here
    export_pairs("trl", project / "results" / "pairs.jsonl", tmp_path / "source.jsonl", processor=processor,
                 image_paths="source", project_root=project)
    (relative,) = [r for r in read_jsonl(tmp_path / "source.jsonl")][:1]
    assert relative["images"] == [PAIRS[0]["image_path"]]
    with pytest.raises(ValueError, match="Incorrect image source"):
        trainer.data_collator([{k: relative[k] for k in ("prompt", "chosen", "rejected", "images")}])


def test_trl_plain_text_round_trip_is_the_identity(project, tmp_path):
    """Through the command line, with --processor naming a saved model folder."""
    model, processor = BUILDERS["qwen2_vl"]()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    stats = main(["export", "--format", "trl", "--src", "results/pairs.jsonl", "--out", str(tmp_path / "trl.parquet"),
                  "--processor", str(tmp_path / "model")])
    assert stats["context"] == "prompt" and stats["token_mismatches"] == 0
    import_pairs("trl", tmp_path / "trl.parquet", tmp_path / "back.jsonl")
    assert read_jsonl(tmp_path / "back.jsonl") == PAIRS


def test_trl_without_a_processor_refuses_context_pairs(project, tmp_path):
    with pytest.raises(InputError, match=r"3 of 4 pairs continue an answer .* trl has no unscored prefix .* "
                                         r"--flatten-context .* --processor MODEL"):
        export_pairs("trl", "results/pairs.jsonl", tmp_path / "trl.jsonl")
    assert not (tmp_path / "trl.jsonl").exists()
    write_jsonl(tmp_path / "apasi.jsonl", PAIRS[:1])  # whole answers only: conversational rows, TRL's default
    export_pairs("trl", tmp_path / "apasi.jsonl", tmp_path / "trl.jsonl")
    (record,) = read_jsonl(tmp_path / "trl.jsonl")
    assert record["prompt"][0]["role"] == "user" and record["images"] == [str(project / PAIRS[0]["image_path"])]
