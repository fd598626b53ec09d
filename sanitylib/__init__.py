"""sanitylib: sanity checks for saliency maps (Adebayo et al., NeurIPS 2018), in PyTorch.

The public API works on any ``torch.nn.Module`` returning logits::

    import sanitylib as sl
    model = sl.load_model("efficientnet_lite0")           # or "inception_v3", "mnist_cnn", ...
    batch = sl.load_photos(model)                          # scikit-image photos, preprocessed
    maps = sl.explain(model, batch.x, "guided_backprop")   # (N, C, H, W)
    df = sl.cascading_randomization(model, batch.x, ["gradient", "guided_backprop"])
    sl.plots.similarity_curves(df)
"""

from .utils import __version__  # noqa: E402
from . import allocator, registry, replay, utils  # noqa: E402
from . import transformer  # noqa: E402  (registers the attention methods before plots picks colours)
from . import attribution, cache, data, engine, experiment, metrics, models, plots, postprocess, randomize, result, spec  # noqa: E402
from . import mnist, training  # noqa: E402
from .attribution import METHODS, GuidedBackpropError, check_guided_backprop, explain, predict  # noqa: E402
from .data import load_mnist, load_paper_imagenet, load_photos  # noqa: E402
from .experiment import (cascading_randomization, explain_methods, independent_randomization,  # noqa: E402
                         run_randomization, summarize)
from .result import ResultTable  # noqa: E402
from .spec import RunSettings, RunSpec  # noqa: E402
from .metrics import METRICS, noise_floor, similarity  # noqa: E402
from .registry import (Metric, MethodSpec, get_method, method_label, method_names,  # noqa: E402
                       metric_names, register_method, register_metric, unregister_method,
                       unregister_metric)
from .models import MODELS, WeightsUnavailableError, load_model  # noqa: E402
from .postprocess import abs_normalize, diverging_normalize, unit_normalize  # noqa: E402
from .randomize import Perturbation, randomized  # noqa: E402
from .allocator import keep_freed_memory  # noqa: E402
from . import followup  # noqa: E402
from . import vit  # noqa: E402
from .followup import (activation_scales, backward_convergence, emprt, input_invariance,  # noqa: E402
                       input_times_random, random_logit, smprt)

__all__ = [
    "METHODS", "METRICS", "MODELS", "GuidedBackpropError", "Perturbation",
    "WeightsUnavailableError", "abs_normalize", "attribution", "cascading_randomization",
    "check_guided_backprop", "data", "diverging_normalize", "experiment", "explain", "explain_methods",
    "independent_randomization", "load_mnist", "load_model", "load_paper_imagenet", "load_photos",
    "metrics", "mnist", "models", "noise_floor", "plots", "postprocess", "predict", "randomize",
    "randomized", "run_randomization", "similarity", "summarize", "training", "unit_normalize",
    "Metric", "MethodSpec", "get_method", "method_label", "method_names", "metric_names",
    "register_method", "register_metric", "unregister_method", "unregister_metric", "registry",
    "replay", "utils", "engine", "__version__", "keep_freed_memory", "allocator",
    "followup", "activation_scales", "backward_convergence", "emprt", "input_invariance",
    "input_times_random", "random_logit", "smprt", "ResultTable", "RunSettings", "RunSpec",
    "cache", "result", "spec", "transformer", "vit",
]
