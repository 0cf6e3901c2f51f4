"""alignlab.text against sentence-transformers' own pipeline for the same shipped model."""
import pytest
import torch

from alignlab import text

SENTS = ["A dog is eating an apple.", "The canine consumes fruit.", "Stock markets fell sharply.",
         "def add(a, b): return a + b"]


def test_encode_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(text.model_path(), device="cpu").encode(
        SENTS, normalize_embeddings=True, convert_to_tensor=True)
    ours = text.encode(SENTS, use_cache=False)
    assert ours.shape == (4, text.DIM)
    assert torch.allclose(ours, ref.cpu(), atol=1e-5)


def test_encode_is_semantic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path))
    e = text.encode(SENTS)
    assert torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2]
    assert len(list(tmp_path.glob("minilm-*.pt"))) == 1
    assert torch.equal(text.encode(SENTS), e)


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(text.mean_pool(h, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_vocabulary_is_whole_words():
    words = text.vocabulary()
    assert len(words) > 15000 and "apple" in words
    assert all(w.isalpha() and not w.startswith("##") and len(w) >= 3 for w in words)


def test_encode_rejects_a_bare_string():
    with pytest.raises(TypeError):
        text.encode("one sentence")
