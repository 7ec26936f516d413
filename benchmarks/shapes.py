"""The benchmark shapes: encoder, decoder and encoder-decoder, tiny (CPU) and realistic (accelerators).

A shape is a run config (``configs/<family>.py:<variant>``) plus overrides, so the benchmark times
exactly what ``train.py`` would run. Families that ``model/families.py`` does not have yet are skipped.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # decoder | encoder | encoder-decoder
    config: str  # configs/<family>.py:<variant>
    overrides: tuple[str, ...]
    accelerator: bool = False  # realistic sizes: only on a GPU/TPU (or --shapes naming it)
    torch_reference: bool = False  # benchmarks/torch_reference.py implements this shape


def _o(**kw) -> tuple[str, ...]:
    return tuple(f"--config.{k.replace('__', '.')}={v}" for k, v in kw.items())


# The CPU shape: d_model 256, 4 layers, 4 heads, MLP 1024, vocab 32000, sequence 256, batch 8,
# float32. The encoder and encoder-decoder use the same widths (2 + 2 layers for the encoder-decoder).
_CPU_TRAIN = _o(train__seq_len=256, train__batch_size=8, data__prefetch=4)
_CPU_MODEL = _o(
    model__vocab_size=32000, model__d_model=256, model__num_heads=4, model__d_ff=1024, model__dtype="float32"
)

SHAPES = [
    Shape(
        "decoder-cpu",
        "decoder",
        "configs/gpt.py:tiny",
        # Unrolled layers: with 4 of them XLA:CPU runs ~10% faster than a scan (tested in tests/test_perf_*).
        _CPU_MODEL + _o(model__num_layers=4, model__max_len=256, model__scan_layers="false") + _CPU_TRAIN,
        torch_reference=True,
    ),
    Shape(
        "encoder-cpu",
        "encoder",
        "configs/bert.py:tiny",
        _CPU_MODEL
        + _o(model__num_layers=4, model__max_len=256, model__dropout=0.0, model__attention_dropout=0.0)
        + _o(model__scan_layers="false")
        + _CPU_TRAIN,
    ),
    Shape(
        "encoder-decoder-cpu",
        "encoder-decoder",
        "configs/t5.py:tiny",
        _CPU_MODEL
        + _o(model__num_layers=2, model__num_decoder_layers=2, model__head_dim=64, model__dropout=0.0)
        + _o(model__scan_layers="false")
        + _CPU_TRAIN,
    ),
    # Mixture of experts at decoder-cpu's active size: 8 experts of 512, top-2 (= one MLP of 1024) in every
    # layer, dropless (ragged_dot) and capacity-based (factor 1.25; the batch one routing group, or one group
    # per sequence); decoder-cpu is the dense model beside them.
    *[
        Shape(
            f"moe-decoder-cpu-{name}",
            "decoder",
            "configs/gpt.py:moe_tiny",
            _CPU_MODEL
            + _o(model__num_layers=4, model__max_len=256, model__scan_layers="false", model__expert_d_ff=512)
            + _o(model__moe_dispatch=dispatch, model__moe_group_size=group)
            + _CPU_TRAIN,
        )
        for name, dispatch, group in (
            ("dropless", "dropless", 0),
            ("capacity", "capacity", 0),
            ("capacity-grouped", "capacity", -1),
        )
    ],
    # Realistic shapes (bf16 compute, float32 master weights), per-device batch 8 x 1024 / 32 x 512.
    Shape(
        "decoder-gpt2-small",
        "decoder",
        "configs/gpt.py:gpt2_small",
        _o(train__seq_len=1024, train__batch_size=8, model__dtype="bfloat16", model__remat="none"),
        accelerator=True,
    ),
    Shape(
        "encoder-bert-base",
        "encoder",
        "configs/bert.py:base_uncased",  # the embedded corpus, not the config's Wikipedia: runs offline
        _o(train__seq_len=512, train__batch_size=32, model__dtype="bfloat16", data__source="embedded"),
        accelerator=True,
    ),
    Shape(
        "encoder-decoder-t5-base",
        "encoder-decoder",
        "configs/t5.py:v1_1_base",  # the embedded corpus, not the config's C4: runs offline
        _o(train__seq_len=512, train__batch_size=32, model__dtype="bfloat16", data__source="embedded"),
        accelerator=True,
    ),
]

BY_NAME = {s.name: s for s in SHAPES}
