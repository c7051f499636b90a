"""Object verifiers for SENTINEL on the toy world: "is a <category> in this image?" answered by two small LEARNED
models that can be wrong, standing in for the original's two open-vocabulary detectors (GroundingDINO, YOLO).

* kind "cnn": a small convolutional multi-label classifier (3 conv blocks, global max pool, one logit per category);
* kind "features": logistic regression on hand-made features, a colour histogram + downsampled pixels (no
  convolution, so it sees colours well and shapes badly: a different architecture that errs differently);
* kind "mlp": the same features through one hidden ReLU layer (still no convolution).

Each is trained on a split's COCO annotations (multi-label targets: category present in the image) with binary
cross-entropy. :class:`AnnotationOracleVerifier` reads the ground truth instead: an explicitly named ablation, never a
default. Weights are saved as safetensors plus a JSON meta file, each written atomically.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from halludpo.config import stage_main
from halludpo.io import atomic_path, load_image, read_json, write_json

log = logging.getLogger(__name__)

KINDS = ("cnn", "features", "mlp")
WEIGHTS_FILE = "verifier.safetensors"
META_FILE = "verifier.json"
MARKER_FILE = "verifiers.json"  # in the folder of both kinds, written last by the stage


# ---------------------------------------------------------------------------------------------------------------
# Data


def _load_coco_quietly(path: str | os.PathLike):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
        return COCO(str(path))


def image_tensor(images: Sequence[str | os.PathLike | Image.Image], size: int) -> torch.Tensor:
    """Paths or PIL images -> float tensor (N, 3, size, size) in [0, 1]; images of another size are resized
    (bilinear)."""
    arrays = []
    for image in images:
        img = image if isinstance(image, Image.Image) else load_image(image)  # decoded now: truncation fails here
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_labelled_split(images_dir: str | os.PathLike, instances_json: str | os.PathLike,
                        size: int | None = None) -> dict:
    """A COCO split as tensors: {"images" (N,3,S,S), "targets" (N,C) 0/1 = category present, "image_ids",
    "categories" (names, ordered by category id), "paths"}. S = the first image's width unless `size` is given."""
    coco = _load_coco_quietly(instances_json)
    cat_ids = sorted(coco.getCatIds())
    categories = [coco.cats[c]["name"] for c in cat_ids]
    column = {cat_id: j for j, cat_id in enumerate(cat_ids)}
    image_ids = sorted(coco.getImgIds())
    paths = [Path(images_dir) / coco.imgs[i]["file_name"] for i in image_ids]
    size = size or int(coco.imgs[image_ids[0]]["width"])
    targets = torch.zeros(len(image_ids), len(categories))
    for row, image_id in enumerate(image_ids):
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            targets[row, column[ann["category_id"]]] = 1.0
    return {"images": image_tensor(paths, size), "targets": targets, "image_ids": image_ids,
            "categories": categories, "paths": [str(p) for p in paths]}


# ---------------------------------------------------------------------------------------------------------------
# Models


class CnnVerifier(nn.Module):
    """conv3x3(3->w) -> pool -> conv3x3(w->2w) -> pool -> conv3x3(2w->4w) -> global max pool -> linear(4w->C).
    The global max pool answers "is the pattern anywhere?", which suits presence."""

    def __init__(self, n_categories: int, width: int = 16) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, padding=1),
                                    nn.Conv2d(2 * width, 4 * width, 3, padding=1)])
        self.head = nn.Linear(4 * width, n_categories)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i < len(self.convs) - 1:
                x = F.max_pool2d(x, 2)
        return self.head(x.amax(dim=(2, 3)))


def colour_features(images: torch.Tensor, bins: int = 4, grid: int = 8) -> torch.Tensor:
    """[joint RGB histogram with bins^3 cells, as fractions of the pixels ; pixels average-pooled to grid x grid]:
    a (N, bins^3 + 3 * grid^2) matrix. Each channel value v in [0, 1] falls in cell min(floor(v * bins), bins-1)."""
    n = images.shape[0]
    cells = (images * bins).long().clamp(0, bins - 1)
    index = (cells[:, 0] * bins + cells[:, 1]) * bins + cells[:, 2]
    hist = torch.zeros(n, bins**3).scatter_add_(1, index.view(n, -1), torch.ones(n, index[0].numel()))
    hist = hist / index[0].numel()
    pooled = F.adaptive_avg_pool2d(images, grid).reshape(n, -1)
    return torch.cat([hist, pooled], dim=1)


class FeatureVerifier(nn.Module):
    """Logistic regression on standardised colour_features: logit = W (f - mean) / std + b.
    mean/std are buffers set from the training images, so a saved model carries them."""

    def __init__(self, n_categories: int, bins: int = 4, grid: int = 8) -> None:
        super().__init__()
        self.bins, self.grid = bins, grid
        n_features = bins**3 + 3 * grid * grid
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.linear = nn.Linear(n_features, n_categories)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return colour_features(images, self.bins, self.grid)

    def fit_standardisation(self, images: torch.Tensor) -> None:
        feats = self.features(images)
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear((self.features(images) - self.mean) / self.std)


class FeatureMlpVerifier(FeatureVerifier):
    """One hidden ReLU layer on the standardised colour_features: logit = W2 relu(W1 (f - mean) / std + b1) + b2.
    Sharper than the logistic regression, and still no convolution, so it errs differently from the CNN."""

    def __init__(self, n_categories: int, bins: int = 4, grid: int = 8, hidden: int = 256) -> None:
        super().__init__(n_categories, bins, grid)
        self.linear = nn.Linear(self.linear.in_features, hidden)
        self.out = nn.Linear(hidden, n_categories)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(super().forward(images)))


def build_model(kind: str, n_categories: int, **arch) -> nn.Module:
    if kind == "cnn":
        return CnnVerifier(n_categories, **arch)
    if kind == "features":
        return FeatureVerifier(n_categories, **arch)
    if kind == "mlp":
        return FeatureMlpVerifier(n_categories, **arch)
    raise ValueError(f"unknown verifier kind {kind!r}; valid kinds: {', '.join(KINDS)}")


class Verifier:
    """A trained verifier: the network plus what is needed to use it (kind, arch, categories, image size)."""

    def __init__(self, kind: str, net: nn.Module, categories: list[str], image_size: int, arch: dict,
                 info: dict | None = None) -> None:
        self.kind, self.net, self.categories, self.image_size = kind, net, list(categories), image_size
        self.arch, self.info = dict(arch), dict(info or {})

    def meta(self) -> dict:
        return {"kind": self.kind, "categories": self.categories, "image_size": self.image_size,
                "arch": self.arch, "info": self.info}


# ---------------------------------------------------------------------------------------------------------------
# Training


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fit(net: nn.Module, images: torch.Tensor, targets: torch.Tensor, epochs: int, lr: float, batch_size: int,
        weight_decay: float, pos_weight: float, generator: torch.Generator) -> list[float]:
    """Adam on mean binary cross-entropy over (image, category) cells, present cells weighted by pos_weight
    (objects are rare: ~3 of 24 categories per image); returns the mean loss of each epoch."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    pos_weight = torch.full((targets.shape[1],), float(pos_weight))
    losses = []
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(images), batch_size):
            idx = order[start: start + batch_size]
            loss = F.binary_cross_entropy_with_logits(net(images[idx]), targets[idx], pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        losses.append(total / len(images))
    net.eval()
    return losses


DEFAULT_HYPER = {
    "cnn": {"epochs": 60, "lr": 3e-3, "batch_size": 32, "weight_decay": 0.0, "pos_weight": 2.0},
    "features": {"epochs": 60, "lr": 1e-2, "batch_size": 32, "weight_decay": 1e-3, "pos_weight": 1.0},
    "mlp": {"epochs": 60, "lr": 1e-3, "batch_size": 32, "weight_decay": 1e-4, "pos_weight": 1.0},
}


def train_verifier(kind: str, images_dir: str | os.PathLike, instances_json: str | os.PathLike, seed: int = 0,
                   epochs: int | None = None, lr: float | None = None, batch_size: int | None = None,
                   weight_decay: float | None = None, pos_weight: float | None = None, image_size: int | None = None,
                   **arch) -> Verifier:
    """Train a verifier of `kind` on a labelled COCO split (images_dir + instances_json). Hyper-parameters left
    None take DEFAULT_HYPER[kind]; `arch` goes to the network (cnn: width; features: bins, grid; mlp: bins, grid, hidden). Deterministic
    for a seed on one machine."""
    if kind not in KINDS:
        raise ValueError(f"unknown verifier kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
             "pos_weight": pos_weight}
    hyper = DEFAULT_HYPER[kind] | {k: v for k, v in given.items() if v is not None}
    generator = _seed_everything(seed)
    data = load_labelled_split(images_dir, instances_json, image_size)
    net = build_model(kind, len(data["categories"]), **arch)
    if isinstance(net, FeatureVerifier):
        net.fit_standardisation(data["images"])
    losses = fit(net, data["images"], data["targets"], generator=generator, **hyper)
    info = {"seed": seed, "hyper": hyper, "train_images": len(data["image_ids"]), "final_loss": losses[-1],
            "instances_json": str(instances_json)}
    return Verifier(kind, net, data["categories"], data["images"].shape[-1], arch, info)


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save(verifier: Verifier, out_dir: str | os.PathLike) -> None:
    """out_dir/verifier.safetensors (the state dict) + out_dir/verifier.json (kind, categories, size, arch, info),
    each written to a temporary file and renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in verifier.net.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / META_FILE, verifier.meta())


def load(out_dir: str | os.PathLike) -> Verifier:
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    meta = read_json(out_dir / META_FILE)
    net = build_model(meta["kind"], len(meta["categories"]), **meta["arch"])
    net.load_state_dict(load_file(str(out_dir / WEIGHTS_FILE)))
    net.eval()
    return Verifier(meta["kind"], net, meta["categories"], meta["image_size"], meta["arch"], meta["info"])


# ---------------------------------------------------------------------------------------------------------------
# The oracle ablation


class AnnotationOracleVerifier:
    """ABLATION: answers from the COCO annotations, i.e. a perfect verifier. Images are identified by file name
    (the basename of the path), so it only answers for images of its instances file."""

    kind = "annotation_oracle"

    def __init__(self, instances_json: str | os.PathLike) -> None:
        coco = _load_coco_quietly(instances_json)
        self.categories = [coco.cats[c]["name"] for c in sorted(coco.getCatIds())]
        self.objects_by_file: dict[str, set[str]] = {im["file_name"]: set() for im in coco.imgs.values()}
        for ann in coco.dataset.get("annotations", []):
            file_name = coco.imgs[ann["image_id"]]["file_name"]
            self.objects_by_file[file_name].add(coco.cats[ann["category_id"]]["name"])

    def present(self, images: Sequence[str | os.PathLike], categories: Sequence[str]) -> np.ndarray:
        rows = []
        for image in images:
            name = Path(image).name
            if name not in self.objects_by_file:
                raise KeyError(f"{name}: not an image of the oracle's instances file")
            rows.append([c in self.objects_by_file[name] for c in categories])
        return np.array(rows, dtype=bool).reshape(len(rows), len(categories))


# ---------------------------------------------------------------------------------------------------------------
# Prediction


def _columns(known: list[str], categories: Sequence[str]) -> list[int]:
    missing = [c for c in categories if c not in known]
    if missing:
        raise KeyError(f"categories unknown to the verifier: {missing}")
    return [known.index(c) for c in categories]


@torch.no_grad()
def presence_probabilities(verifier: Verifier, images, batch_size: int = 256) -> torch.Tensor:
    """sigmoid(logits): (N, C) over the verifier's own categories. `images`: paths / PIL images, or a float
    tensor (N, 3, H, W) in [0, 1] already at the verifier's image size."""
    if not isinstance(images, torch.Tensor):
        images = image_tensor(images, verifier.image_size)
    verifier.net.eval()
    chunks = [torch.sigmoid(verifier.net(images[i: i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, len(verifier.categories))


def predict_present(verifier, images, categories: Sequence[str], threshold: float = 0.5) -> np.ndarray:
    """Bool matrix (N images, len(categories)): present = P(category | image) >= threshold. For the
    AnnotationOracleVerifier (images must be paths) the ground truth, and threshold is ignored. A category the
    verifier was not trained on raises KeyError."""
    if isinstance(verifier, AnnotationOracleVerifier):
        return verifier.present(images, categories)
    cols = _columns(verifier.categories, categories)
    probs = presence_probabilities(verifier, images)
    return (probs[:, cols] >= threshold).numpy().reshape(len(probs), len(cols))


def presence_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Over all (image, category) cells: accuracy; balanced_accuracy = (TPR + TNR) / 2; precision; recall."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    tp = float((predicted & truth).sum())
    tn = float((~predicted & ~truth).sum())
    fp = float((predicted & ~truth).sum())
    fn = float((~predicted & truth).sum())
    recall = tp / max(tp + fn, 1.0)
    specificity = tn / max(tn + fp, 1.0)
    return {"accuracy": (tp + tn) / max(tp + tn + fp + fn, 1.0), "balanced_accuracy": (recall + specificity) / 2,
            "precision": tp / max(tp + fp, 1.0), "recall": recall}


def evaluate_verifier(verifier: Verifier, images_dir: str | os.PathLike, instances_json: str | os.PathLike,
                      threshold: float = 0.5) -> dict[str, float]:
    """presence_scores of a verifier on a labelled split (e.g. held-out images)."""
    data = load_labelled_split(images_dir, instances_json, verifier.image_size)
    predicted = predict_present(verifier, data["images"], data["categories"], threshold)
    return presence_scores(predicted, data["targets"].numpy().astype(bool))



# ---------------------------------------------------------------------------------------------------------------
# Two verifiers -> SENTINEL's decide_fn


def make_decide_fn(verifier_a, verifier_b, threshold_a: float = 0.5, threshold_b: float = 0.5,
                   image_key: str = "image_path"):
    """decide_fn for sentinel.sample_contexts: batch of (item, objects) -> per item {object: (A present,
    B present)}, each verifier asked once per batch about the union of the batch's objects, on the images at
    item[image_key]."""

    def decide(batch):
        if not batch:
            return []
        images = [item[image_key] for item, _ in batch]
        union = list(dict.fromkeys(o for _, objects in batch for o in objects))
        present_a = predict_present(verifier_a, images, union, threshold_a)
        present_b = predict_present(verifier_b, images, union, threshold_b)
        column = {o: j for j, o in enumerate(union)}
        return [{o: (bool(present_a[i, column[o]]), bool(present_b[i, column[o]])) for o in objects}
                for i, (_, objects) in enumerate(batch)]

    return decide


# ---------------------------------------------------------------------------------------------------------------
# Stage `verifiers` (rule train_verifiers)
#
#     python -m halludpo.verifiers        # trains cfg.verifier.kinds on the training split, once per data set


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to n (None or 0: unchanged) inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(n or before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_and_save(verifier_cfg: dict, out_dir: str | os.PathLike) -> dict:
    """Train both kinds of a verifier config (plain dict: kind, kinds, train{seed, image_size, instances,
    images_dir, threads, hyper{kind}, arch{kind}}, evaluate_on, evaluate_images), save each under out_dir/<kind>/,
    score them on the held-out split and write out_dir/verifiers.json LAST (the rule's marker). Returns it."""
    v, train = verifier_cfg, verifier_cfg["train"]
    if v.get("kind", "toy") != "toy":
        raise ValueError(f"verifier.kind={v.get('kind')!r}: this stage trains the learned toy verifiers only "
                         "(verifier=detector: the zero-shot detectors are pretrained and need no training)")
    kinds = list(v["kinds"])
    if len(kinds) != 2:
        raise ValueError(f"verifier.kinds={kinds}: SENTINEL cross-checks exactly two verifiers")
    out_dir = Path(out_dir)
    summary: dict = {"kinds": kinds, "train_instances": str(train["instances"]), "verifiers": {}}
    held_out = (load_labelled_split(v["evaluate_images"], v["evaluate_on"], train["image_size"])
                if v.get("evaluate_on") else None)
    predictions = {}
    with torch_threads(train.get("threads")):  # tiny models: one thread is faster here
        for kind in kinds:
            start = time.perf_counter()
            verifier = train_verifier(kind, train["images_dir"], train["instances"], seed=int(train["seed"]),
                                      image_size=train["image_size"], **(train.get("hyper") or {}).get(kind, {}),
                                      **(train.get("arch") or {}).get(kind, {}))
            save(verifier, out_dir / kind)
            entry = {"dir": str(out_dir / kind), "seconds": round(time.perf_counter() - start, 1), **verifier.info}
            if held_out is not None:
                predictions[kind] = predict_present(verifier, held_out["images"], held_out["categories"])
                entry["held_out"] = presence_scores(predictions[kind], held_out["targets"].numpy().astype(bool))
            summary["verifiers"][kind] = entry
            log.info("verifier %s trained in %.1fs: %s", kind, entry["seconds"], entry.get("held_out"))
    if held_out is not None:
        a, b = (predictions[k] for k in kinds)
        summary["held_out_images"] = len(held_out["image_ids"])
        summary["held_out_agreement"] = float((a == b).mean())  # cells where A and B agree
    write_json(out_dir / MARKER_FILE, summary)
    return summary


def load_trained(out_dir: str | os.PathLike, kinds: Sequence[str]) -> list[Verifier]:
    """The trained verifiers of rule train_verifiers, in the order of `kinds` (A, B)."""
    out_dir = Path(out_dir)
    if not (out_dir / MARKER_FILE).is_file():
        raise FileNotFoundError(f"{out_dir / MARKER_FILE}: verifiers not trained (rule train_verifiers)")
    return [load(out_dir / kind) for kind in kinds]


def run(cfg) -> None:
    from halludpo import paths
    from halludpo.config import to_plain

    summary = train_and_save(to_plain(cfg.verifier), paths.verifiers_dir(cfg))
    log.info("verifiers %s (held-out agreement %s) -> %s", summary["kinds"], summary.get("held_out_agreement"),
             paths.verifiers_marker(cfg))


main = stage_main(run)

if __name__ == "__main__":
    main()
