"""The CIFAR model zoo: ``create_model(name, num_classes)`` builds any of :func:`list_models`.

Every model is a :class:`StagedNet` (stem -> stages -> head) whose ``forward`` returns logits
only; stage and block features are module outputs, read with forward hooks
(:mod:`kdlib.features`). Architectures, widths and initialisation follow RepDistiller so that
results compare with its tables.
"""

from kdlib.models import mobilenetv2, resnet, resnet_bottleneck, shufflenet, vgg, wrn  # noqa: F401  (registers)
from kdlib.models.base import ClassifierHead, StagedNet
from kdlib.models.registry import create_model, list_models, register_model

__all__ = ["ClassifierHead", "StagedNet", "create_model", "list_models", "register_model"]
