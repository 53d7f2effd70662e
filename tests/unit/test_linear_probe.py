"""Held-out metrics and the linear-probe baseline (workers/fusion/evaluation.py), judged by scikit-learn
(installed with the test extras; mmfuse itself does not use it)."""

from __future__ import annotations

import numpy as np
import pytest

from mmfuse.workers.fusion.evaluation import (
    binary_auroc,
    fit_linear_probe,
    multi_label_metrics,
    regression_metrics,
    single_label_metrics,
)
from mmfuse.workers.fusion.heads import TaskSpec

sklearn_metrics = pytest.importorskip("sklearn.metrics")
linear_model = pytest.importorskip("sklearn.linear_model")


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_binary_auroc_with_ties_is_scikit_learns():
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.4
    scores = np.round(truth * 0.3 + rng.random(300), 1)  # rounded: many ties
    assert binary_auroc(truth, scores) == pytest.approx(sklearn_metrics.roc_auc_score(truth, scores), abs=1e-12)
    assert binary_auroc(np.ones(5, bool), np.arange(5)) is None  # one class: undefined


def test_single_label_metrics_are_scikit_learns():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, 400)
    probabilities = softmax(np.eye(4)[truth] * 1.5 + rng.normal(size=(400, 4)))
    metrics = single_label_metrics(truth, probabilities)
    predicted = probabilities.argmax(axis=1)
    assert metrics["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(truth, predicted))
    assert metrics["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(truth, predicted, average="macro"))
    expected = sklearn_metrics.roc_auc_score(truth, probabilities, multi_class="ovr", average="macro")
    assert metrics["auroc"] == pytest.approx(expected)
    binary = softmax(rng.normal(size=(50, 2)))
    labels = rng.integers(0, 2, 50)
    assert single_label_metrics(labels, binary)["auroc"] == pytest.approx(
        sklearn_metrics.roc_auc_score(labels, binary[:, 1])
    )


def test_multi_label_metrics_are_scikit_learns():
    rng = np.random.default_rng(2)
    truth = (rng.random((200, 3)) < [0.2, 0.5, 0.7]).astype(np.float32)
    probabilities = 1 / (1 + np.exp(-(truth * 2 - 1 + rng.normal(size=(200, 3)))))
    metrics = multi_label_metrics(truth, probabilities)
    predicted = probabilities >= 0.5
    assert metrics["micro_f1"] == pytest.approx(sklearn_metrics.f1_score(truth, predicted, average="micro"))
    assert metrics["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(truth, predicted, average="macro"))
    assert metrics["auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(truth, probabilities, average="macro"))


def test_regression_metrics_are_scikit_learns():
    rng = np.random.default_rng(3)
    truth = rng.normal(5, 2, 100)
    values = truth + rng.normal(0, 1, 100)
    metrics = regression_metrics(truth, values)
    assert metrics["r2"] == pytest.approx(sklearn_metrics.r2_score(truth, values))
    assert metrics["mae"] == pytest.approx(sklearn_metrics.mean_absolute_error(truth, values))


def classification_data(seed: int, n: int = 500, features: int = 20, classes: int = 3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    y = (x @ rng.normal(size=(features, classes)) + 2.5 * rng.normal(size=(n, classes))).argmax(axis=1)
    return x, y


def test_logistic_probe_is_scikit_learns_at_the_chosen_c_and_the_choice_is_the_best_on_validation():
    x, y = classification_data(0)
    task = TaskSpec("t", "single_label", ("a", "b", "c"))
    train, val, test = slice(0, 300), slice(300, 400), slice(400, 500)
    probe = fit_linear_probe(task, x[train], y[train], x[val], y[val])
    judge = linear_model.LogisticRegression(C=probe.strength, max_iter=10_000, tol=1e-10).fit(x[train], y[train])
    np.testing.assert_allclose(probe.outputs(x[test]), judge.predict_proba(x[test]), atol=1e-4)
    # No C of the coarse grid (fitted by scikit-learn) does better on the validation split.
    chosen = np.mean(probe.outputs(x[val]).argmax(axis=1) == y[val])
    for c in 10.0 ** np.arange(-6, 7):
        other = linear_model.LogisticRegression(C=c, max_iter=10_000).fit(x[train], y[train])
        assert other.score(x[val], y[val]) <= chosen + 1e-9, c


def test_multi_label_probe_is_one_logistic_regression_per_tag():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 10))
    truth = (x @ rng.normal(size=(10, 2)) + rng.normal(size=(400, 2)) > 0).astype(np.float32)
    task = TaskSpec("t", "multi_label", ("p", "q"))
    probe = fit_linear_probe(task, x[:250], truth[:250], x[250:325], truth[250:325])
    for tag in range(2):
        judge = linear_model.LogisticRegression(C=probe.strength, max_iter=10_000, tol=1e-10)
        judge.fit(x[:250], truth[:250, tag])
        np.testing.assert_allclose(probe.outputs(x[325:])[:, tag], judge.predict_proba(x[325:])[:, 1], atol=1e-4)


def test_ridge_probe_is_scikit_learns_at_the_chosen_alpha():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 15))
    y = x @ rng.normal(size=15) + 3 + rng.normal(0, 2, 300)
    task = TaskSpec("t", "regression")
    probe = fit_linear_probe(task, x[:200], y[:200], x[200:250], y[200:250])
    judge = linear_model.Ridge(alpha=probe.strength).fit(x[:200], y[:200])
    np.testing.assert_allclose(probe.outputs(x[250:]), judge.predict(x[250:]), atol=1e-8)
    assert 1e-7 <= probe.strength <= 1e7
