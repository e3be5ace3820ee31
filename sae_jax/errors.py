"""The errors that mean "bad input", which the CLI reports in one line with a non-zero exit."""

from sae_jax.data.contexts import EmptyCorpusError
from sae_jax.data.store import StoreError
from sae_jax.data.text import TextSourceError
from sae_jax.eval.errors import EvalError
from sae_jax.export import ExportError
from sae_jax.harvest import HarvestError
from sae_jax.model.hooks import HookError
from sae_jax.model.loading import ModelLoadError
from sae_jax.model.tokenizer import TokenizerError
from sae_jax.parallel import DistributedError, MeshError
from sae_jax.runs import RunError
from sae_jax.train.compile_check import CompileCheckError
from sae_jax.train.loop import TrainError

USER_ERRORS = (
    EmptyCorpusError,
    StoreError,
    TextSourceError,
    HarvestError,
    HookError,
    ModelLoadError,
    TokenizerError,
    MeshError,
    DistributedError,
    TrainError,
    CompileCheckError,
    RunError,
    ExportError,
    EvalError,
)
