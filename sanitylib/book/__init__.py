"""The chapter layer: what only the book's chapters need, on top of the core :mod:`sanitylib`.

* :mod:`~sanitylib.book.profiles`: the run profiles (``smoke``, ``book``, ``paper``) of every
  chapter: :func:`get_profile`, :func:`chapter_profile`.
* :mod:`~sanitylib.book.notebook`: :func:`glue`, myst-nb's glue in a book build and a plain display
  elsewhere (Colab, Jupyter, papermill), so the chapters run wherever the package is installed.
* :mod:`~sanitylib.book.chapters`: a chapter's set-up as one call
  (:func:`setup_imagenet_chapter`).
* :mod:`~sanitylib.book.claims`: every "paper vs this book" table: the authors' numbers, the
  :class:`Claim` s and :func:`evaluate_claims`; and the words of the chapters' sentences that
  state a direction or a verdict, computed from the numbers (:func:`relation`,
  :func:`floor_relation`, :func:`randomization_verdict`, ...).
* :mod:`~sanitylib.book.tables`: the MNIST chapters' tables and sentences.
* :mod:`~sanitylib.book.runinfo`: :func:`record_run`, what a chapter ran with (profile, models,
  device), for the book's execution-statistics page.

The core never imports this package (``import sanitylib`` does not load it); a chapter does::

    import sanitylib as sl
    from sanitylib import book
"""

from .chapters import (ImageNetChapter, markdown, model_sentence, options_sentence,
                       setup_imagenet_chapter)
from .claims import (CASCADING_CLAIMS, INDEPENDENT_CLAIMS, NOISE_CLAIMS, PAPER_CASCADE_ABS,
                     PAPER_CASCADE_NOABS, PAPER_DATA_RANDOMIZATION, Claim, evaluate_claims,
                     correlation_strength, floor_relation, largest, paper_vs_book_cascade,
                     paper_vs_book_data,
                     randomization_verdict, relation, sign_relation, stage_window, trend,
                     window_mean)
from .notebook import glue, have_myst_nb, styled
from .profiles import PROFILES, Profile, chapter_profile, get_profile
from .runinfo import record_run
from .tables import (accuracy_summary, cascade_summary, data_randomization_summary, data_sentence,
                     training_table)

__all__ = [
    "CASCADING_CLAIMS", "INDEPENDENT_CLAIMS", "NOISE_CLAIMS", "PAPER_CASCADE_ABS",
    "PAPER_CASCADE_NOABS", "PAPER_DATA_RANDOMIZATION", "PROFILES", "Claim", "ImageNetChapter",
    "Profile", "accuracy_summary", "cascade_summary", "chapter_profile",
    "data_randomization_summary", "data_sentence", "evaluate_claims", "get_profile", "glue", "have_myst_nb", "markdown",
    "model_sentence", "paper_vs_book_cascade", "paper_vs_book_data", "setup_imagenet_chapter",
    "stage_window", "training_table", "window_mean", "relation", "floor_relation",
    "sign_relation", "randomization_verdict", "trend", "largest", "options_sentence",
    "correlation_strength", "styled", "record_run",
]
