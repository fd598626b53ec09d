"""Run profiles, defined once for every chapter.

* ``smoke``: seconds on a CPU; for the tests (papermill) and a quick look.
* ``book``: what the rendered book runs offline on a 2-core CPU (EfficientNet-Lite0 with its
  shipped weights, scikit-image photos); faithful to the paper's settings except where a
  chapter says otherwise.
* ``paper``: the full replication, for a GPU (InceptionV3 when its weights can be obtained,
  the paper's hyper-parameters everywhere, images from a folder when given).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

__all__ = ["Profile", "PROFILES", "get_profile"]

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
        n_images: number of images to use (``None``: all).
        methods: saliency methods to run.
        method_options: per-method overrides of the paper's settings (empty = paper settings).
        randomization_methods: methods of the model-randomization chapters (2 and 3; default:
            ``methods``).
        randomization_options: per-method overrides for those chapters, on top of
            ``method_options`` (they run every method at every stage, 20x the work of chapter 1).
        seed: seed of every random draw.
        note: what differs from the paper, shown by the chapters.
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
    randomization_methods: tuple[str, ...] | None = None
    randomization_options: dict = field(default_factory=dict)

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
        name="book", model="auto", photos=("chelsea", "coffee", "camera", "motorcycle"),
        image_folder=None, n_images=None, methods=ALL_METHODS,
        method_options={"ig_smoothgrad": {"n_samples": 10, "n_steps": 20}},
        note="book profile (offline CPU build): InceptionV3 if its weights can be obtained, "
             "otherwise EfficientNet-Lite0 (shipped weights); 4 scikit-image photos; paper "
             "settings for every method except IG-SmoothGrad (10 noise samples of 20-step IG "
             "instead of 25 of 50, which would cost 6x more).",
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
