"""Raw conversation / caption / text / webdataset inputs -> an indexed multimodal dataset prefix."""

from megasail.data.preprocess.config import PreprocessConfig
from megasail.data.preprocess.rejects import REJECT_REASONS, RecordRejected
from megasail.data.preprocess.run import NoSamplesKept, PreprocessError, plan_run, run_preprocess

__all__ = [
    "NoSamplesKept",
    "PreprocessConfig",
    "PreprocessError",
    "REJECT_REASONS",
    "RecordRejected",
    "plan_run",
    "run_preprocess",
]
