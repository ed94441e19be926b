"""Where the registered-model class lived before it moved to `deepspark.serving` (the model package
is a contract of training and inference alike). Models registered before the move pickled their
class as `inference.serving.ModalityClassifier`; this name keeps them loading."""

from deepspark.serving import ModalityClassifier

__all__ = ["ModalityClassifier"]
