"""Frozen-feature evaluation protocols of the STELLAR paper (spec section 5): feature extraction, kNN, linear probe.

Imported by the examples and benchmarks, never by the model files.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

FEATURES = ("pooled", "cls", "dense-mean")


def select_feature(outputs, feature: str) -> torch.Tensor:
    """
    The probe feature of a [`StellarModelOutput`]: `(B, d)`.

    `pooled`: mean of the sparse tokens (the paper's choice); `cls`: the CLS token; `dense-mean`: mean patch token.
    """
    if feature == "pooled":
        return outputs.pooler_output
    if feature == "cls":
        return outputs.cls_embedding
    if feature == "dense-mean":
        return outputs.dense_features.mean(dim=1)
    raise ValueError(f"unknown feature {feature!r}; choose one of {FEATURES}")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[dict],
    feature: str = "pooled",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Run a frozen STELLAR encoder over `batches` of `{"pixel_values": (B, C, H, W), "labels": (B,)}`.

    Args:
        model: a `StellarModel` or any model with a `.stellar` encoder.
        feature: one of `FEATURES`.

    Returns:
        features `(num_images, d)` in float32 on the CPU, and labels `(num_images,)` (or `None` without labels).
    """
    encoder = getattr(model, "stellar", model)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"features ({feature})", leave=False)
    for batch in batches:
        pixel_values = batch["pixel_values"].to(device)
        if dtype is not None:
            pixel_values = pixel_values.to(dtype)
        features.append(select_feature(encoder(pixel_values, return_dict=True), feature).float().cpu())
        if batch.get("labels") is not None:
            labels.append(torch.as_tensor(batch["labels"]).cpu())
    encoder.train(was_training)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), torch.cat(labels) if labels else None


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == labels.unsqueeze(1)).any(dim=1).float().mean().item()


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    DINO's weighted kNN: cosine similarity, the k nearest training features vote with weight exp(sim / T).

    Args:
        train_features: `(n_train, d)`; train_labels: `(n_train,)`; test_features: `(n_test, d)`.

    Returns:
        class scores `(n_test, num_classes)`.
    """
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training feature")
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    train_features = F.normalize(train_features.float(), dim=1)
    test_features = F.normalize(test_features.float(), dim=1)
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        similarity = test_features[start : start + chunk_size] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(top_index.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in [0, 1]) of [`knn_classify`] on labelled test features."""
    num_classes = num_classes or int(torch.cat([train_labels, test_labels]).max()) + 1
    scores = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    return {"top1": _topk_accuracy(scores, test_labels, 1), "top5": _topk_accuracy(scores, test_labels, 5)}


class LinearProbe(nn.Module):
    """The paper's probe head: LayerNorm + Linear, `(B, d) -> (B, num_classes)`."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    epochs: int = 30,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """
    Train [`LinearProbe`] with AdamW on frozen features and report top-1 / top-5 test accuracy in [0, 1].

    Args:
        train_features: `(n_train, d)`; test_features: `(n_test, d)`; labels `(n,)` class indices.
    """
    num_classes = num_classes or int(torch.cat([train_labels, test_labels]).max()) + 1
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(train_features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-train_features.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    train_features, test_features = train_features.float(), test_features.float()
    for _ in range(epochs):
        order = torch.randperm(train_features.shape[0], generator=generator)
        for start in range(0, order.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(probe(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        scores = probe(test_features)
    return {"top1": _topk_accuracy(scores, test_labels, 1), "top5": _topk_accuracy(scores, test_labels, 5)}


__all__ = ["FEATURES", "LinearProbe", "extract_features", "knn_accuracy", "knn_classify", "linear_probe", "select_feature"]
