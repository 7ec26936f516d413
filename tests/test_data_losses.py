"""Objective losses on plain arrays, against PyTorch's reference implementations."""

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from podformer import objective_losses as ol
from podformer.losses import LOSSES


def test_distillation_terms_match_the_hugging_face_distiller():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 11)).astype(np.float32), rng.normal(size=(2, 5, 11)).astype(np.float32)
    hs, ht = rng.normal(size=(2, 5, 7)).astype(np.float32), rng.normal(size=(2, 5, 7)).astype(np.float32)
    real = np.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    temperature = 2.0
    sel = real.astype(bool)
    # transformers/examples/research_projects/distillation/distiller.py: KLDiv(batchmean) * T^2 over the
    # selected positions; CosineEmbeddingLoss(mean) over the selected hidden states.
    ss, tt = torch.tensor(s[sel]), torch.tensor(t[sel])
    ref_ce = F.kl_div(F.log_softmax(ss / temperature, -1), F.softmax(tt / temperature, -1), reduction="batchmean")
    ref_ce = float(ref_ce) * temperature**2
    ref_cos = float(
        torch.nn.CosineEmbeddingLoss(reduction="mean")(
            torch.tensor(hs[sel]), torch.tensor(ht[sel]), torch.ones(int(real.sum()))
        )
    )
    n = real.sum()
    np.testing.assert_allclose(float(ol.soft_cross_entropy(s, t, real, temperature)) / n, ref_ce, rtol=1e-5)
    np.testing.assert_allclose(float(ol.cosine_embedding(hs, ht, real)) / n, ref_cos, rtol=1e-5)


def test_sentence_classification_loss_matches_torch_and_losses_are_registered():
    logits = np.asarray([[2.0, -1.0], [0.5, 0.7], [-3.0, 1.0]], np.float32)
    labels = np.asarray([0, 0, 1], np.int32)
    ce, correct = ol.sequence_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    ref = F.cross_entropy(torch.tensor(logits), torch.tensor(labels, dtype=torch.long), reduction="sum")
    np.testing.assert_allclose(float(ce), float(ref), rtol=1e-6)
    assert float(correct) == 2.0
    for name in ("mlm", "mlm_nsp", "mlm_sop", "roberta", "distill", "span_corruption", "prefix_lm", "bart"):
        assert name in LOSSES


def test_mlm_loss_adds_nsp_with_its_own_denominator():
    v = 9
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, v)).astype(np.float32)
    nsp = rng.normal(size=(2, 2)).astype(np.float32)
    batch = {
        "inputs": np.zeros((2, 4), np.int32),
        "segment_ids": np.ones((2, 4), np.int32),
        "positions": np.tile(np.arange(4, dtype=np.int32), (2, 1)),
        "token_types": np.zeros((2, 4), np.int32),
        "targets": rng.integers(0, v, (2, 4)).astype(np.int32),
        "loss_weights": np.asarray([[1, 0, 1, 0], [0, 0, 1, 0]], np.float32),
        "next_sentence_labels": np.asarray([1, 0], np.int32),
    }
    model = lambda *a, **k: {"logits": jnp.asarray(logits), "nsp_logits": jnp.asarray(nsp)}  # noqa: E731
    loss = LOSSES["mlm_nsp"]
    value, metrics = loss.fn(model, batch, None, loss.denominators(batch))
    w = batch["loss_weights"].astype(bool)
    ref_mlm = F.cross_entropy(torch.tensor(logits[w]), torch.tensor(batch["targets"][w], dtype=torch.long))
    ref_nsp = F.cross_entropy(torch.tensor(nsp), torch.tensor(batch["next_sentence_labels"], dtype=torch.long))
    np.testing.assert_allclose(float(metrics["mlm_loss"]), float(ref_mlm), rtol=1e-5)
    np.testing.assert_allclose(float(value), float(ref_mlm + ref_nsp), rtol=1e-5)
