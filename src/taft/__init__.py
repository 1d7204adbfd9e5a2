"""taft: tangent fine-tuning of pretrained transformers."""

from taft._version import __version__
from taft.checkpoint import load_delta, save_delta  # noqa: E402
from taft.config import TrainConfig  # noqa: E402
from taft.models.classifier import Classifier  # noqa: E402
from taft.scope import Scope  # noqa: E402
from taft.tangent_model import TangentModel  # noqa: E402

__all__ = ["Classifier", "Scope", "TangentModel", "TrainConfig", "__version__", "load_delta", "save_delta"]
