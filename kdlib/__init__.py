"""kdlib: attention-based knowledge distillation for image classification.

The library behind the attention-KD book. Import what you need from the submodules:

- :mod:`kdlib.models`   CIFAR model zoo, ``create_model(name, num_classes)``
- :mod:`kdlib.features` forward-hook feature taps
- :mod:`kdlib.data`     CIFAR-10/100 and the embedded ``shapes`` dataset
- :mod:`kdlib.distill`  distillers (vanilla, KD, FitNets, AT, AFD, SAKD, AFT-KD, SAM-KD, LAKD)
- :mod:`kdlib.train`    the training engine
- :mod:`kdlib.explain`  attention maps, Grad-CAM++ and localisation metrics
- :mod:`kdlib.style`    the book's figure style: sizes, colour maps, mask contours, legends, labels
"""

__version__ = "0.2.0"


class KDLibError(Exception):
    """Base class of every error kdlib raises on purpose (bad input, not a bug).

    The CLI prints these as one line and exits with status 2.
    """
