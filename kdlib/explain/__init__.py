"""Visual explanations: attention maps, Grad-CAM++ and metrics of where models look.

Three kinds of output, all computed for the same images so that models can be put side by side:

- :func:`attention_maps`  ``mean_c F²`` per stage (:func:`kdlib.attention.energy_map`), min–max
  scaled and upsampled to the image (:func:`kdlib.attention.to_image_size`);
- :func:`cam_maps`        Grad-CAM++ (or Grad-CAM) from the ``grad-cam`` package on a named layer,
  by default the last stage's output;
- metrics on ``B×H×W`` maps: :func:`energy_in_mask`, :func:`pointing_game`, :func:`chance_level`,
  :func:`map_agreement`, gathered over a whole test split by :func:`where_models_look` and printed
  by :func:`format_table`; the figure :func:`plot_explanations`.

Every map is min–max scaled to [0, 1] per image, so one colour scale serves every figure and the
metrics compare like with like. ``pytorch_grad_cam`` and ``matplotlib.pyplot`` are imported inside
the functions that need them: ``import pytorch_grad_cam`` alone takes 5–10 s.

The code lives in three modules, each importing only those before it:

- :mod:`kdlib.explain.cam`      Grad-CAM++, attention maps, layer resolution, predictions;
- :mod:`kdlib.explain.metrics`  energy in mask, pointing game, map agreement, chance level,
  :func:`where_models_look`;
- :mod:`kdlib.explain.figures`  overlays, de-normalisation, :func:`plot_explanations`,
  :func:`format_table`.

Everything public is re-exported here, so ``kdlib.explain.X`` is the name to use.
"""

from kdlib.explain.cam import (
    CAM_LABELS,
    CAM_METHODS,
    attention_maps,
    cam_maps,
    predictions,
    preserved_state,
    resolve_layer,
)
from kdlib.explain.figures import denormalizer, format_table, overlay, plot_explanations, to_rgb01
from kdlib.explain.metrics import chance_level, energy_in_mask, map_agreement, pointing_game, where_models_look

__all__ = [
    "CAM_LABELS",
    "CAM_METHODS",
    "attention_maps",
    "cam_maps",
    "chance_level",
    "denormalizer",
    "energy_in_mask",
    "format_table",
    "map_agreement",
    "overlay",
    "plot_explanations",
    "pointing_game",
    "predictions",
    "preserved_state",
    "resolve_layer",
    "to_rgb01",
    "where_models_look",
]
