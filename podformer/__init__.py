"""podformer: pretrain and fine-tune BERT, GPT and T5 family transformers in JAX/Flax NNX."""

import os as _os

# A checkout keeps model/, data/, configs/, train.py and finetune.py at the repository's top level (the
# project's layout); an installed wheel has them inside this package (setup.py's package_dir). Searching
# the checkout's root as part of this package makes podformer.model, podformer.data, podformer.configs,
# podformer.train and podformer.finetune the same modules either way, and never the top-level names
# `model` or `data`, which a user's own folders may hold.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isdir(_os.path.join(_root, "model")):
    __path__.append(_root)

# Before anything imports JAX: on a host without TPUs, JAX is not to try libtpu (podformer/core/platforms.py).
from podformer.core import platforms as _platforms  # noqa: E402

_platforms.choose()
