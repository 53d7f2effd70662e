"""Held-out metrics of a head's tasks and the linear-probe baseline, in numpy and torch (no scikit-learn).

Metrics (:func:`task_metrics`), by task kind:

- single_label: ``accuracy``; ``macro_f1`` over the classes that occur in the truth or the predictions
  (scikit-learn's default); ``auroc``: one-vs-rest, averaged over the classes that have positives and
  negatives in the truth (for two classes, the binary AUROC).
- multi_label: ``micro_f1`` and ``macro_f1`` at a 0.5 threshold (macro over every tag), ``auroc`` averaged
  over the tags that have positives and negatives.
- regression: ``r2`` and ``mae``.

A metric that is undefined on the rows given (an AUROC without both classes) is None.

The linear probe follows CLIP's recipe: a logistic regression (softmax for single_label, one sigmoid per tag
for multi_label) or a ridge regression on the concatenated embeddings, its inverse regularisation C (alpha
for ridge) chosen on the validation split over a log grid and refined around the best.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmfuse.workers.fusion.heads import MULTI_LABEL_THRESHOLD, HeadData, TaskSpec

Metrics = dict[str, float | None]

METRIC_NAMES = {
    "single_label": ("accuracy", "macro_f1", "auroc"),
    "multi_label": ("micro_f1", "macro_f1", "auroc"),
    "regression": ("r2", "mae"),
}
# The metric a table leads with and a baseline is compared on, per kind; higher is better for each.
PRIMARY_METRIC = {"single_label": "accuracy", "multi_label": "micro_f1", "regression": "r2"}


# --- metrics ----------------------------------------------------------------------------------------


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def binary_auroc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    """The area under the ROC curve (Mann-Whitney U over the ranks); None without both classes."""
    truth = np.asarray(truth, dtype=bool)
    positives, negatives = int(truth.sum()), int((~truth).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    true_positives = float(np.sum(truth & predicted))
    denominator = float(np.sum(truth) + np.sum(predicted))
    return 2 * true_positives / denominator if denominator else 0.0


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def single_label_metrics(truth: np.ndarray, probabilities: np.ndarray) -> Metrics:
    truth = np.asarray(truth, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    classes = np.union1d(truth, predicted)
    n_classes = probabilities.shape[1]
    if n_classes == 2:
        auroc = binary_auroc(truth == 1, probabilities[:, 1])
    else:
        auroc = _mean_or_none([binary_auroc(truth == c, probabilities[:, c]) for c in range(n_classes)])
    return {
        "accuracy": float(np.mean(truth == predicted)),
        "macro_f1": float(np.mean([_f1(truth == c, predicted == c) for c in classes])),
        "auroc": auroc,
    }


def multi_label_metrics(truth: np.ndarray, probabilities: np.ndarray) -> Metrics:
    truth = np.asarray(truth) >= 0.5
    predicted = probabilities >= MULTI_LABEL_THRESHOLD
    tags = range(truth.shape[1])
    return {
        "micro_f1": _f1(truth.ravel(), predicted.ravel()),
        "macro_f1": float(np.mean([_f1(truth[:, t], predicted[:, t]) for t in tags])),
        "auroc": _mean_or_none([binary_auroc(truth[:, t], probabilities[:, t]) for t in tags]),
    }


def regression_metrics(truth: np.ndarray, values: np.ndarray) -> Metrics:
    truth = np.asarray(truth, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    total = float(np.sum((truth - truth.mean()) ** 2))
    residual = float(np.sum((truth - values) ** 2))
    return {"r2": 1 - residual / total if total > 0 else None, "mae": float(np.mean(np.abs(truth - values)))}


def task_metrics(task: TaskSpec, truth: np.ndarray, outputs: np.ndarray) -> Metrics:
    """The task's metrics of ``outputs`` (what ``heads.head_outputs`` gives) against ``truth`` (the targets)."""
    if task.kind == "single_label":
        return single_label_metrics(truth, outputs)
    if task.kind == "multi_label":
        return multi_label_metrics(truth, outputs)
    return regression_metrics(truth, outputs)


def all_metrics(tasks: Sequence[TaskSpec], data: HeadData, outputs: Mapping[str, np.ndarray]) -> dict[str, Metrics]:
    return {task.name: task_metrics(task, data.targets[task.name], outputs[task.name]) for task in tasks}


# --- the linear probe -------------------------------------------------------------------------------


def concatenated(data: HeadData, modalities: Sequence[str]) -> np.ndarray:
    """The rows' vectors side by side in ``modalities`` order, zeros where a modality is missing."""
    return np.concatenate(
        [np.where(data.present[name][:, None], data.vectors[name], 0.0) for name in modalities], axis=1
    ).astype(np.float64)


COARSE_GRID = tuple(10.0**k for k in range(-6, 7))  # CLIP's search starts from a log grid of C


@dataclass(frozen=True)
class LinearProbe:
    task: TaskSpec
    weight: np.ndarray  # (features, outputs)
    bias: np.ndarray  # (outputs,)
    strength: float  # C (logistic) or alpha (ridge) as chosen on the validation split

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """As ``heads.head_outputs`` gives them: probabilities, or values in the targets' unit."""
        logits = x @ self.weight + self.bias
        if self.task.kind == "single_label":
            logits = logits - logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            return exp / exp.sum(axis=1, keepdims=True)
        if self.task.kind == "multi_label":
            return 1 / (1 + np.exp(-logits))
        return logits[:, 0]


def _fit_logistic(
    task: TaskSpec, x: np.ndarray, y: np.ndarray, c: float, start: LinearProbe | None
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise mean loss + ||W||^2 / (2 C n) (scikit-learn's C * sum(loss) + ||W||^2 / 2, scaled by 1 / (C n))
    with L-BFGS, in float64, from ``start``'s solution (a neighbouring C's) or zeros; the bias is not
    penalised. The objective is convex: the start changes the steps it takes, not where it ends."""
    features, outputs = x.shape[1], task.outputs
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64 if task.kind == "single_label" else np.float64))
    initial_weight = start.weight if start is not None else np.zeros((features, outputs))
    initial_bias = start.bias if start is not None else np.zeros(outputs)
    weight = torch.tensor(initial_weight, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(initial_bias, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=300, tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe"
    )
    penalty = 1.0 / (2 * c * len(x))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = xt @ weight + bias
        if task.kind == "single_label":
            loss = torch.nn.functional.cross_entropy(logits, yt)
        else:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="sum") / len(x)
        loss = loss + penalty * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().numpy(), bias.detach().numpy()


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimise ||y - X w - b||^2 + alpha ||w||^2: centred, closed form; the bias is not penalised."""
    x_mean, y_mean = x.mean(axis=0), float(np.mean(y))
    xc = x - x_mean
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (np.asarray(y, dtype=np.float64) - y_mean))
    return w[:, None], np.array([y_mean - x_mean @ w])


def _validation_score(probe: LinearProbe, x: np.ndarray, y: np.ndarray) -> float:
    """Higher is better: accuracy (single_label, as CLIP), minus the log loss (multi_label), minus the squared
    error (regression)."""
    out = probe.outputs(x)
    if probe.task.kind == "single_label":
        return float(np.mean(out.argmax(axis=1) == y))
    if probe.task.kind == "multi_label":
        p = np.clip(out, 1e-12, 1 - 1e-12)
        return float(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return -float(np.mean((out - y) ** 2))


def fit_linear_probe(
    task: TaskSpec, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
) -> LinearProbe:
    """The probe of ``task`` whose regularisation does best on the validation split: the coarse grid
    (10^-6 .. 10^6), then half a decade either side of the best; ties go to the stronger regularisation."""

    def fit(strength: float, start: LinearProbe | None) -> LinearProbe:
        if task.kind == "regression":
            # ridge's alpha regularises as 1/C does: the same grid, inverted
            weight, bias = _fit_ridge(x_train, y_train, 1.0 / strength)
        else:
            weight, bias = _fit_logistic(task, x_train, y_train, strength, start)
        return LinearProbe(task, weight, bias, strength)

    def search(grid: Sequence[float], best: tuple[float, LinearProbe] | None) -> tuple[float, LinearProbe]:
        previous = best[1] if best is not None else None
        for strength in grid:
            probe = previous = fit(strength, previous)
            score = _validation_score(probe, x_val, y_val)
            if best is None or score > best[0] + 1e-12:
                best = (score, probe)
        assert best is not None
        return best

    best = search(COARSE_GRID, None)
    centre = best[1].strength
    best = search((centre / math.sqrt(10), centre * math.sqrt(10)), best)
    probe = best[1]
    if task.kind == "regression":
        probe = LinearProbe(task, probe.weight, probe.bias, 1.0 / probe.strength)  # report alpha itself
    return probe
