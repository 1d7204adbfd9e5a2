"""taft: tangent fine-tuning of pretrained transformers.

The public API in one place (``__all__``; the docs' API reference lists exactly these names). Shard stores,
differential privacy and task arithmetic have their own: :mod:`taft.shards`, :mod:`taft.privacy`,
:mod:`taft.arithmetic`; the Δw algebra is :mod:`taft.delta`.

>>> import taft                                                        # doctest: +SKIP
>>> result = taft.train_run(taft.TrainConfig(data="trec", output_dir="runs/trec"))   # doctest: +SKIP
>>> taft.evaluate_run("runs/trec", split="test")["accuracy"]           # doctest: +SKIP
"""

from taft._version import __version__
from taft.checkpoint import load_delta, save_delta
from taft.config import TrainConfig
from taft.errors import TaftError, UnsupportedError
from taft.models.classifier import Classifier
from taft.privacy import fit as _private_training  # noqa: F401 (registers private training with the loop)
from taft.scope import Scope
from taft.tangent_model import TangentModel
from taft.train.evaluate import evaluate_run
from taft.train.loop import train as train_run
from taft.train.search import search
from taft.zoo import load_model

__all__ = ["Classifier", "Scope", "TaftError", "TangentModel", "TrainConfig", "UnsupportedError", "__version__",
           "evaluate_run", "load_delta", "load_model", "save_delta", "search", "train_run"]
