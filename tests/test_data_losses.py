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


def _eval_sums(loss, model_for, batch, rows):
    """What train.py's evaluation does: per batch, the metrics with every denominator 1 and the true
    denominators, added over batches, then ``loss.reduce``."""
    sums, denoms = {}, {}
    for part in rows:
        b = {k: v[part] for k, v in batch.items()}
        d = loss.denominators(b)
        _, m = loss.fn(model_for(part), b, None, {k: jnp.ones_like(v) for k, v in d.items()})
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in d.items():
            denoms[k] = denoms.get(k, 0.0) + float(v)
    return loss.reduce(sums, denoms)


def test_evaluation_over_batches_equals_the_whole_batch_for_every_denominator():
    """MLM+NSP divides its two parts by different counts, distillation by masked and by real tokens: the
    metrics aggregated over uneven batches must equal those of one batch holding everything."""
    v, d = 9, 4
    rng = np.random.default_rng(2)
    n, L = 5, 6
    out = {
        "logits": rng.normal(size=(n, L, v)).astype(np.float32),
        "nsp_logits": rng.normal(size=(n, 2)).astype(np.float32),
        "hidden": rng.normal(size=(n, L, d)).astype(np.float32),
        "teacher_logits": rng.normal(size=(n, L, v)).astype(np.float32),
        "teacher_hidden": rng.normal(size=(n, L, d)).astype(np.float32),
    }
    batch = {
        "inputs": np.zeros((n, L), np.int32),
        "segment_ids": (rng.random((n, L)) < 0.8).astype(np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (n, 1)),
        "token_types": np.zeros((n, L), np.int32),
        "targets": rng.integers(0, v, (n, L)).astype(np.int32),
        "loss_weights": (rng.random((n, L)) < 0.3).astype(np.float32),
        "next_sentence_labels": rng.integers(0, 2, n).astype(np.int32),
    }
    model_for = lambda part: lambda *a, **k: {key: jnp.asarray(x[part]) for key, x in out.items()}  # noqa: E731
    uneven = [slice(0, 1), slice(1, 5)]  # one row, then four
    for name in ("mlm_nsp", "distill"):
        loss = LOSSES[name]
        b = batch if name == "mlm_nsp" else {k: v for k, v in batch.items() if k != "next_sentence_labels"}
        _, whole = loss.fn(model_for(slice(None)), b, None, loss.denominators(b))
        got = _eval_sums(loss, model_for, b, uneven)
        assert sorted(got) == sorted(whole), name
        for k in whole:
            np.testing.assert_allclose(got[k], float(whole[k]), rtol=1e-5, err_msg=f"{name}: {k}")


def test_distillation_step_trains_the_student_and_never_the_teacher():
    """One train step with weight decay: the student moves, the teacher (in the same state) stays bit for
    bit; and the student's layers come from DistilBERT's teacher layers."""
    import jax
    import optax
    from flax import nnx

    from podformer import distillation, trainer
    from podformer.configs import bert as bert_configs
    from podformer.mesh import make_mesh
    from podformer.model import bert

    assert distillation.layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert distillation.layer_map(4, 1) == [0]
    flat = {"blocks.0.a": 0, "blocks.1.a": 1, "blocks.2.a": 2, "embed": 3, "token_type_embed": 4}
    assert distillation.student_from_teacher(flat, 3, 2) == {"blocks.0.a": 0, "blocks.1.a": 2, "embed": 3,
                                                             "token_type_embed": 4}  # fmt: skip

    small = dict(vocab_size=64, max_len=16, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    student_cfg, teacher_cfg = bert.DistilBertConfig.tiny(**small), bert.BertConfig.tiny(**small)
    cfg = bert_configs.get_config("tiny")
    mesh = make_mesh(cfg.mesh)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    tx = optax.adamw(1e-2, weight_decay=0.5)
    graphdef, state, _ = trainer.create_state(
        lambda r: bert.Bert(student_cfg, rngs=r), tx, mesh, rules, 0, lambda r: bert.Bert(teacher_cfg, rngs=r)
    )
    rng = np.random.default_rng(0)
    B, L = 4, 16
    batch = {
        "inputs": rng.integers(8, 64, (B, L)).astype(np.int32),
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
        "token_types": np.zeros((B, L), np.int32),
        "targets": rng.integers(8, 64, (B, L)).astype(np.int32),
        "loss_weights": (rng.random((B, L)) < 0.3).astype(np.float32),
    }
    before = jax.device_get(nnx.to_pure_dict(state))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step = jax.jit(
            lambda s, b: trainer.train_step(
                s, b, graphdef=graphdef, loss=LOSSES["distill"], accum=1, seed=0, mesh=mesh,
                rules=rules, global_batch=B, schedule=lambda _: 0.0,
            )
        )  # fmt: skip
        new_state, metrics = step(state, batch)
    after = jax.device_get(nnx.to_pure_dict(new_state))
    teacher_before, teacher_after = jax.tree.leaves(before["teacher"]), jax.tree.leaves(after["teacher"])
    assert all(np.array_equal(a, b) for a, b in zip(teacher_before, teacher_after, strict=True))
    assert not np.array_equal(before["model"]["embed"], after["model"]["embed"])
    assert float(metrics["soft_loss"]) > 0 and float(metrics["cosine_loss"]) > 0


def test_mlm_nsp_on_a_real_bert_reads_its_next_sentence_head():
    """The loss asks a real Bert for its NSP logits (it once looked for a key the model never returned)."""
    from flax import nnx

    from podformer.model import bert

    cfg = bert.BertConfig.tiny(vocab_size=50, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=16)
    model = bert.Bert(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    batch = {
        "inputs": rng.integers(0, 50, (2, 8)).astype(np.int32),
        "segment_ids": np.ones((2, 8), np.int32),
        "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
        "token_types": np.asarray([[0] * 4 + [1] * 4] * 2, np.int32),
        "targets": rng.integers(0, 50, (2, 8)).astype(np.int32),
        "loss_weights": np.asarray([[1, 0, 1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0, 0, 1]], np.float32),
        "next_sentence_labels": np.asarray([1, 0], np.int32),
    }
    for name in ("mlm_nsp", "mlm_sop"):
        loss = LOSSES[name]
        value, metrics = loss.fn(model, batch, None, loss.denominators(batch))
        hidden = model.encode(batch["inputs"], token_type_ids=batch["token_types"])
        nsp = torch.tensor(np.asarray(model.nsp_logits(hidden)))
        mlm = torch.tensor(np.asarray(model.mlm_logits(hidden)))
        w = batch["loss_weights"].astype(bool)
        ref_mlm = F.cross_entropy(mlm[torch.tensor(w)], torch.tensor(batch["targets"][w], dtype=torch.long))
        ref_nsp = F.cross_entropy(nsp, torch.tensor(batch["next_sentence_labels"], dtype=torch.long))
        np.testing.assert_allclose(float(metrics["nsp_loss"]), float(ref_nsp), rtol=1e-5)
        np.testing.assert_allclose(float(value), float(ref_mlm + ref_nsp), rtol=1e-5)
