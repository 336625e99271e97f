"""USTAD with a tiny config-built BERT: the CE score is one joint pass, DE embeddings are independent of the
other side (both checked against direct Hugging Face calls), the joint loss, the separate baseline, full-corpus
evaluation against brute force, and the distilled students."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_cascades.functional.contrastive import info_nce
from lit_cascades.functional.retrieval import Qrels, dense_topk, retrieval_metrics
from lit_cascades.functional.score_distillation import listwise_softmax_loss
from lit_cascades.modules.ustad import USTAD, USTADStudent, describe_parameters, load_teacher_state

QUERIES = ["open a file for reading", "sort a list of numbers", "parse the header line", "compute a checksum"]
DOCS = ["def open_file(path):\n    return open(path)", "def sort_numbers(xs):\n    return sorted(xs)",
        "def parse_header(line):\n    return line.split(':')", "def checksum(data):\n    return sum(data) % 256"]
NEGS = [["def close(f):\n    f.close()"], ["def reverse(xs):\n    return xs[::-1]"],
        ["def join(parts):\n    return ':'.join(parts)"], ["def size(data):\n    return len(data)"]]


def tiny(**kw) -> USTAD:
    torch.manual_seed(0)
    args = dict(encoder="tiny-bert", encoder_kwargs={"hidden": 32, "layers": 2, "heads": 2}, max_query_length=16,
                max_doc_length=24, max_pair_length=40, rerank_depth=3, recall_ks=(1, 2, 3))
    return USTAD(**{**args, **kw})


def batch(n=4):
    return {"query": QUERIES[:n], "positive": DOCS[:n], "negatives": NEGS[:n],
            "positive_id": torch.arange(n), "negative_ids": torch.arange(n)[:, None] + 10, "index": torch.arange(n)}


def test_ce_score_is_one_joint_pass_through_the_head():
    m = tiny()
    tok, model = m.encoder.tokenizer, m.encoder.model
    enc = tok(QUERIES[:2], DOCS[:2], padding=True, truncation=True, max_length=40, return_tensors="pt")
    # a joint input: [CLS] q [SEP] d [SEP], segment 1 on the document
    ids = enc["input_ids"][0][enc["attention_mask"][0] > 0].tolist()
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == 2 and ids[-1] == tok.sep_token_id
    assert enc["token_type_ids"][0].max() == 1
    expected = m.ce_head(model(**enc).last_hidden_state[:, 0]).squeeze(-1)
    torch.testing.assert_close(m.ce_score(QUERIES[:2], DOCS[:2]), expected)
    # the CE score depends on the interaction: it is not a function of separately encoded q and d
    e_q, e_d = m.embed_queries(QUERIES[:1]), m.embed_docs(DOCS[:1])
    assert not torch.allclose(m.ce_score(QUERIES[:1], DOCS[:1]), m.de_score(e_q, e_d))


def test_dual_pool_ce_score_by_hand():
    m = tiny(ce_head="dual_pool")
    enc = m.encoder.tokenizer(QUERIES[:2], DOCS[:2], padding=True, truncation=True, max_length=40,
                              return_tensors="pt")
    h = m.encoder.model(**enc).last_hidden_state
    out = []
    for i in range(2):
        keep = enc["attention_mask"][i] > 0
        q = h[i][keep & (enc["token_type_ids"][i] == 0)].mean(0)
        d = h[i][keep & (enc["token_type_ids"][i] == 1)].mean(0)
        out.append(F.cosine_similarity(q, d, dim=0) / m.hparams.temperature)
    torch.testing.assert_close(m.ce_score(QUERIES[:2], DOCS[:2]), torch.stack(out), rtol=1e-5, atol=1e-5)


def test_de_embeddings_are_mean_pooled_and_independent_of_the_other_side():
    m = tiny()
    tok, model = m.encoder.tokenizer, m.encoder.model
    # one text alone, by hand: mean over its tokens, L2-normalised
    enc = tok([DOCS[0]], truncation=True, max_length=24, return_tensors="pt")
    by_hand = F.normalize(model(**enc).last_hidden_state.mean(1), dim=-1)
    torch.testing.assert_close(m.embed_docs(DOCS[:1]), by_hand, rtol=1e-5, atol=1e-6)
    # the same document embedded next to other documents (padding) or other queries gives the same vector
    torch.testing.assert_close(m.embed_docs([DOCS[0], *NEGS[1], DOCS[3]])[0], by_hand[0], rtol=1e-5, atol=1e-5)
    q_alone = m.embed_queries(QUERIES[1:2])
    torch.testing.assert_close(m.embed_queries(QUERIES)[1:2], q_alone, rtol=1e-5, atol=1e-5)
    assert m.de_score(q_alone, by_hand).item() == pytest.approx((q_alone @ by_hand.T).item() / 0.05, rel=1e-5)


def test_joint_loss_is_the_weighted_sum_of_de_infonce_and_ce_listwise():
    m = tiny(lambda_de=0.7, lambda_ce=1.3, ce_batch_negatives=1)
    b = batch()
    out = m.compute_losses(b)
    q = m.embed_queries(QUERIES)
    d = m.embed_docs(DOCS + [n[0] for n in NEGS])
    de = info_nce(q, d[:4], d[4:].view(4, 1, -1), temperature=0.05, key_ids=b["positive_id"],
                  hard_negative_ids=b["negative_ids"]).loss
    cands = [[DOCS[i], NEGS[i][0], DOCS[(i + 1) % 4]] for i in range(4)]
    ce_scores = torch.stack([m.ce_score([QUERIES[i]] * 3, cands[i]) for i in range(4)])
    ce = listwise_softmax_loss(ce_scores)
    torch.testing.assert_close(out["de"], de, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["ce"], ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], 0.7 * de + 1.3 * ce, rtol=1e-5, atol=1e-5)


def _grad_touched(module, loss):
    module.zero_grad()
    loss.backward(retain_graph=True)
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_one_encoder_gets_both_losses_separate_encoders_one_each():
    one = tiny()
    out = one.compute_losses(batch())
    assert one.ce_encoder is one.encoder
    assert _grad_touched(one.encoder, out["de"]) and _grad_touched(one.encoder, out["ce"])
    sep = tiny(model="separate")
    assert sep.ce_encoder is not sep.encoder
    for a, b in zip(sep.encoder.parameters(), sep.ce_encoder.parameters()):
        assert torch.equal(a, b)  # same starting weights
    out = sep.compute_losses(batch())
    assert _grad_touched(sep.encoder, out["de"]) and not _grad_touched(sep.ce_encoder, out["de"])
    assert _grad_touched(sep.ce_encoder, out["ce"]) and not _grad_touched(sep.encoder, out["ce"])
    n_one, n_sep = describe_parameters(one)["total"], describe_parameters(sep)["total"]
    head = sum(p.numel() for p in one.ce_head.parameters())
    assert n_sep == 2 * (n_one - head) + head


def test_evaluation_equals_brute_force_and_rerank_sorts_by_ce():
    m = tiny()
    corpus = DOCS + [n[0] for n in NEGS]
    qrels = Qrels.from_targets(torch.arange(4), num_docs=len(corpus))
    m.set_eval_corpus("test", corpus, qrels)
    with torch.no_grad():
        q = m.embed_queries(QUERIES)
        res = m.evaluate_retrieval(q, torch.arange(4), QUERIES, "test")
        _, ranked = dense_topk(q, m.embed_docs(corpus), 3)
        expected = retrieval_metrics(ranked, qrels, recall_ks=(1, 2, 3))
        for name in ("mrr@10", "recall@1", "recall@3", "ndcg@10"):
            assert res["de"][name].item() == pytest.approx(expected[name].item(), abs=1e-6)
        # rerank: the top-3 DE candidates ordered by the CE score (descending)
        reranked = m.rerank_ids(QUERIES, ranked, corpus)
        for i in range(4):
            s = m.ce_score([QUERIES[i]] * 3, [corpus[j] for j in ranked[i]])
            assert reranked[i].tolist() == ranked[i][s.argsort(descending=True, stable=True)].tolist()
        expected_rr = retrieval_metrics(reranked, qrels, recall_ks=(1, 2, 3))
        assert res["rerank"]["mrr@10"].item() == pytest.approx(expected_rr["mrr@10"].item(), abs=1e-6)


def test_truncation_is_counted_and_bad_input_raises():
    m = tiny()
    m.embed_docs(["word " * 100, "short"])
    assert m.encoder.truncated["doc"] == 1 and m.encoder.seen["doc"] == 2
    with pytest.raises(ValueError, match="empty"):
        m.embed_queries(["ok", "  "])
    with pytest.raises(TypeError, match="string"):
        m.embed_docs([3])
    with pytest.raises(ValueError, match="one document per query"):
        m.ce_score(["a"], ["b", "c"])
    with pytest.raises(ValueError, match="model"):
        tiny(model="both")
    with pytest.raises(ValueError, match="negatives"):
        tiny().compute_losses({**batch(), "negatives": [[] for _ in range(4)], "negative_ids": torch.zeros(4, 0)})


def test_asymmetric_student_uses_frozen_teacher_documents():
    teacher = tiny()
    st = USTADStudent(teacher, student="asymmetric", student_layers=1)
    assert len(st.query_encoder.model.encoder.layer) == 1
    torch.testing.assert_close(st.embed_docs(DOCS), teacher.embed_docs(DOCS))
    assert not any(p.requires_grad for p in st.doc_encoder.parameters())
    assert describe_parameters(st)["trainable"] < describe_parameters(teacher)["total"] / 4
    st._doc_cache = st.cache_doc_embeddings(DOCS + [f"def neg_{i}():\n    pass" for i in range(20)])
    b = batch()
    b["negative_ids"] = torch.arange(4)[:, None] + 4
    b["negatives"] = [[f"def neg_{i}():\n    pass"] for i in range(4)]
    out = st.compute_losses(b)
    assert set(out) == {"loss", "label", "score_de", "score_ce", "emb"}
    out["loss"].backward()
    assert all(p.grad is None for p in st.doc_encoder.parameters())
    assert any(p.grad is not None for p in st.query_encoder.parameters())
    # the teacher's CE scores of an item are cached: a second call does not run the teacher's joint passes
    calls = []
    orig = teacher.ce_score
    teacher.ce_score = lambda *a: (calls.append(1), orig(*a))[1]
    st.compute_losses(b)
    assert calls == []


def test_student_without_teacher_is_the_label_loss_and_dims_must_match():
    teacher = tiny()
    st = USTADStudent(teacher, student="symmetric", alpha_score=0.0, beta_emb=0.0)
    out = st.compute_losses(batch())
    torch.testing.assert_close(out["loss"], out["label"])
    assert st.doc_encoder is st.query_encoder
    with pytest.raises(ValueError, match="projection=True"):
        USTADStudent(teacher, student_encoder="tiny-bert", student_encoder_kwargs={"hidden": 16, "layers": 1,
                                                                                   "heads": 2})
    st = USTADStudent(teacher, student_encoder="tiny-bert", projection=True,
                      student_encoder_kwargs={"hidden": 16, "layers": 1, "heads": 2})
    assert st.embed_queries(QUERIES).shape == (4, 32)


@pytest.mark.slow
def test_minilm_from_the_package_embeds_like_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from lit_cascades.models.towers import minilm_path

    texts = ["Split a pathname into a directory and a file name.", "def f(x):\n    return x + 1", "short"]
    m = USTAD(encoder="minilm", max_query_length=256, rerank_depth=0)
    ref = st.SentenceTransformer(minilm_path(), device="cpu").encode(texts, convert_to_tensor=True,
                                                                      normalize_embeddings=True)
    with torch.no_grad():
        torch.testing.assert_close(m.embed_queries(texts), ref.float(), rtol=1e-4, atol=1e-5)


def test_teacher_state_loads_ignoring_an_old_pooler():
    a, b = tiny(), tiny(ce_head="cls_linear")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01)
    state = {**a.state_dict(), "encoder.model.pooler.dense.weight": torch.zeros(2, 2)}
    load_teacher_state(b, state)
    torch.testing.assert_close(b.embed_docs(DOCS), a.embed_docs(DOCS))
    with pytest.raises(RuntimeError):
        load_teacher_state(b, {k: v for k, v in a.state_dict().items() if "ce_head" not in k})
