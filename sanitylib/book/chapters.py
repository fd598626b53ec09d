"""Chapter set-up: what the first code cell of a chapter does, as one call.

:func:`setup_imagenet_chapter` is the set-up of the two model-randomization chapters (2 and 3):
profile, model, photos, the methods and settings of those chapters, and the sentence that says
which model ran (and why, when InceptionV3 fell back), glued under the chapter's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import load_model, load_photos, plots
from .notebook import glue
from .profiles import Profile, chapter_profile

__all__ = ["ImageNetChapter", "setup_imagenet_chapter", "model_sentence", "markdown"]


def markdown(text: str) -> Any:
    """``IPython.display.Markdown(text)`` (what ``{glue:md}`` pastes), or ``text`` itself where
    IPython is not installed."""
    try:
        from IPython.display import Markdown
    except ImportError:
        return text
    return Markdown(text)


def model_sentence(info, n_images: int) -> str:
    """One Markdown sentence naming the model that ran, its source and the number of images,
    and saying when InceptionV3's weights could not be obtained (the ``"auto"`` fallback)."""
    return (f"This run used **{info.name}** ({info.source}) on {n_images} images"
            + (", because InceptionV3's ImageNet weights could not be obtained" if
               info.extra.get("fallback_from") else "") + ".")  # fmt: skip


@dataclass
class ImageNetChapter:
    """What :func:`setup_imagenet_chapter` gives a chapter.

    Attributes:
        cfg: the profile, with the parameters' overrides.
        model: the classifier (``model.sanity_info``: :attr:`info`).
        info: the model's :class:`sanitylib.models.ModelInfo` (name, source, blocks, ...).
        batch: the preprocessed photos (:func:`sanitylib.load_photos`).
        methods, options: the methods of the model-randomization chapters and their settings
            that differ from the paper's (``cfg.randomization``).
        label: the model's name for titles (``" (fallback)"`` added after a fallback).
        sentence: :func:`model_sentence` (Markdown).
    """

    cfg: Profile
    model: nn.Module
    info: Any
    batch: Any
    methods: tuple[str, ...]
    options: dict[str, dict]
    label: str
    sentence: str


def setup_imagenet_chapter(prefix: str, profile: str | Profile = "book", *,
                           model: str | None = None, photos=None, image_folder: str | None = None,
                           n_images: int | None = None,
                           seed: int | None = None) -> ImageNetChapter:  # fmt: skip
    """The set-up of a model-randomization chapter, from its ``parameters`` cell.

    Applies the book's plot style, builds the profile (parameters left at ``None`` keep the
    profile's value), prints its note, loads the model and the photos, prints which model ran
    on how many images, and glues ``{prefix}_model``, ``{prefix}_model_sentence``,
    ``{prefix}_n_images`` and ``{prefix}_n_blocks``.
    """
    plots.use_book_style()
    cfg = chapter_profile(profile, model=model, photos=photos, image_folder=image_folder,
                          n_images=n_images, seed=seed)  # fmt: skip
    print(cfg.note)
    net = load_model(cfg.model)
    info = net.sanity_info
    batch = load_photos(net, names=cfg.photos, folder=cfg.image_folder, n=cfg.n_images)
    methods, options = cfg.randomization
    label = info.name + (" (fallback)" if info.extra.get("fallback_from") else "")
    sentence = model_sentence(info, len(batch))
    print(sentence.replace("**", ""))
    glue(f"{prefix}_model", info.name, display=False)
    glue(f"{prefix}_model_sentence", markdown(sentence), display=False)
    glue(f"{prefix}_n_images", len(batch), display=False)
    glue(f"{prefix}_n_blocks", len(info.blocks), display=False)
    return ImageNetChapter(cfg, net, info, batch, methods, options, label, sentence)
