"""The caption encoder: frozen T5 features and a padding mask, as PixArt feeds its cross-attention.

PixArt pads every caption to 120 tokens (PixArt-Sigma: 300, `max_length=300`); the mask marks the real ones, EOS
included. Two encoders:
    TextEncoder.from_pretrained(path)  a local T5 folder (T5 v1.1 XXL for the real model), offline
    TextEncoder.embedded(seed)         the embedded default (docs/ARCHITECTURE.md section 5): a tiny T5 encoder with fixed
                                       random weights and ByT5's byte tokenizer, which needs no vocabulary file
ByT5 spends one token per UTF-8 byte plus EOS. The longest caption `pixart_fast.data` can write has 119 bytes
(120 tokens) and a typical one about 65, so the embedded default never truncates its own captions.
"""
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from pixart_fast.data import COLOURS, REGIONS, SHAPES, SIZES
from pixart_fast.files import atomic_path

MAX_TOKENS = 120  # PixArt-alpha's caption length (the default): the null caption `y_embedding` has this many rows


def _length_tag(max_length: int) -> str:
    """What an encoder's name gains for a caption length other than the default: its cached features (save_cache,
    load_cache, keyed by the name) have max_length rows, so encoders of two lengths must not share a cache."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1 (120 for PixArt-alpha, 300 for PixArt-Sigma), got {max_length}")
    return "" if max_length == MAX_TOKENS else f"-max{max_length}"


def _distance_bias(model: T5EncoderModel, locality: float) -> None:
    """Set the T5 encoder's relative position bias (every head) to -locality x the distance its bucket starts at."""
    attention = model.encoder.block[0].layer[0].SelfAttention
    buckets = attention.relative_attention_num_buckets
    offsets = torch.arange(-attention.relative_attention_max_distance, attention.relative_attention_max_distance + 1)
    of_bucket = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=buckets,
                                                       max_distance=attention.relative_attention_max_distance)
    far = float(attention.relative_attention_max_distance)
    bias = torch.tensor([offsets[of_bucket == b].abs().min().item() if (of_bucket == b).any() else far
                         for b in range(buckets)], dtype=torch.float32)
    with torch.no_grad():
        attention.relative_attention_bias.weight.copy_(-locality * bias[:, None].expand(-1, attention.n_heads))


class TextEncoder:
    """A frozen T5 encoder and its tokenizer. encode(captions) -> (features (B, max_length, C) float32, mask
    (B, max_length) bool), on the encoder's device; C = `caption_channels`, max_length 120 (PixArt-alpha, the
    default) or 300 (PixArt-Sigma): the model's config.max_tokens.

    `encode_cached` keeps the features of every caption it has seen (on the CPU), for the fixed caption sets
    a trainer encodes again and again; `save_cache` / `load_cache` keep them in a safetensors file.
    `truncated` counts captions longer than max_length tokens that were cut (warned about once).
    """

    def __init__(self, model: T5EncoderModel, tokenizer, name: str, max_length: int = MAX_TOKENS):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.name, self.max_length = tokenizer, name, max_length
        self.caption_channels = model.config.d_model
        self.truncated = 0
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # caption -> ((L, C), (L,)) on the CPU

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu",
                        max_length: int = MAX_TOKENS) -> "TextEncoder":
        """Load T5EncoderModel and its tokenizer from a local folder (never the hub): one holding both, or a
        diffusers pipeline folder (text_encoder/ and tokenizer/ inside, as the released PixArt-alpha and -Sigma
        pipelines). T5-XXL's encoder is 4.8 B parameters: pass dtype=torch.bfloat16 to halve its 19 GB (fp16
        overflows in T5 v1.1). max_length: the caption length, 120 for PixArt-alpha, 300 for PixArt-Sigma."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"T5 folder {str(path)!r} does not exist; pass a local folder holding config.json, the weights "
                "and the tokenizer files, or a diffusers pipeline folder"
            )
        pipeline = (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir()
        encoder, tokenizer_dir = (path / "text_encoder", path / "tokenizer") if pipeline else (path, path)
        model = T5EncoderModel.from_pretrained(encoder, dtype=dtype, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, tokenizer, name=str(path.resolve()) + _length_tag(max_length), max_length=max_length)

    @classmethod
    def embedded(
        cls, seed: int = 0, d_model: int = 64, num_layers: int = 2, num_heads: int = 2, d_ff: int = 128, device="cpu",
        tokenizer: str = "byte", max_length: int = MAX_TOKENS, locality: float = 0.0,
    ) -> "TextEncoder":
        """The embedded default: a T5 v1.1-style encoder (gated-GELU MLP) with random weights fixed by seed,
        built without touching the global RNG, and ByT5's tokenizer (vocabulary 384: 3 specials, 256 bytes,
        125 sentinels). Its features carry the caption's bytes and their order; the diffusion model learns
        to read them through its caption projection. tokenizer "word": `word_tokenizer()` instead, one token per
        word of the captions' closed vocabulary (the cross-attention then reads words, not spellings).
        max_length: the caption length (default 120). locality > 0: the first layer's relative position bias (T5
        keeps it there, shared by all layers) falls by `locality` per token of distance instead of being random,
        so each token's features mix mostly its own phrase's words: a region word then carries its object's
        colour and shape, which a trained T5 binds and a random one mixes with the other objects' words."""
        if tokenizer not in ("byte", "word"):
            raise ValueError(f"tokenizer must be 'byte' or 'word', got {tokenizer!r}")
        tok = ByT5Tokenizer() if tokenizer == "byte" else cls.word_tokenizer()
        config = T5Config(
            vocab_size=384 if tokenizer == "byte" else len(tok), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
            num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        )
        with torch.random.fork_rng(devices=[]):  # the weights depend on seed alone, and callers' RNG is untouched
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        if locality:
            _distance_bias(model, locality)
        name = f"embedded-t5-d{d_model}-l{num_layers}-h{num_heads}-f{d_ff}-seed{seed}"
        name += ("" if tokenizer == "byte" else f"-{tokenizer}") + (f"-local{locality:g}" if locality else "")
        name += _length_tag(max_length)
        return cls(model.to(device), tok, name=name, max_length=max_length)

    @staticmethod
    def word_tokenizer() -> PreTrainedTokenizerFast:
        """A word-level tokenizer over the closed vocabulary of the embedded captions (pixart_fast.data): one token
        per word or comma, EOS appended, unknown words -> <unk>. Ids: 0 <pad>, 1 </s>, 2 <unk> (T5's), then the
        words. Built in code: no files, no hub."""
        words = ["a", "at", "and", ","] + list(SIZES) + list(COLOURS) + list(SHAPES)
        words += [w for r in REGIONS for w in r.split()]
        vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "</s>", "<unk>", *words]))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (token ids (B, max_length) int64, mask (B, max_length) bool), padded to max_length.
        Captions longer than max_length tokens (EOS included) are cut and counted in `truncated`."""
        if isinstance(captions, str):
            raise TypeError(f"pass a list of captions, not one string ({captions[:40]!r}...)")
        lengths = [len(ids) for ids in self.tokenizer(list(captions))["input_ids"]]  # untruncated, EOS included
        long = [c for c, n in zip(captions, lengths) if n > self.max_length]
        if long and not self.truncated:
            warnings.warn(
                f"{len(long)} of {len(captions)} captions exceed {self.max_length} tokens (longest {max(lengths)}; "
                f"first {long[0][:60]!r}...) and were truncated; later truncations are only counted in "
                "TextEncoder.truncated", stacklevel=3,
            )
        self.truncated += len(long)
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids, tokens.attention_mask.bool()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (B strings) -> (features (B, max_length, C) float32, mask (B, max_length) bool, True for the
        caption's tokens and its EOS), on the encoder's device. Padded positions hold T5's output there too, as
        in PixArt; the mask is what hides them."""
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)
        features = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, C)
        return features.float(), mask

    def encode_cached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like encode, but every distinct caption is encoded once per encoder (or taken from a loaded cache)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            features, mask = self.encode(missing)
            for caption, f, m in zip(missing, features.cpu(), mask.cpu()):
                self._cache[caption] = (f, m)
        features = torch.stack([self._cache[c][0] for c in captions]).to(self.device)
        mask = torch.stack([self._cache[c][1] for c in captions]).to(self.device)
        return features, mask

    def save_cache(self, path) -> None:
        """Write the cached features to a safetensors file, tagged with this encoder's name (atomically)."""
        if not self._cache:
            raise ValueError("the feature cache is empty; call encode_cached(captions) before save_cache")
        captions = list(self._cache)
        tensors = {
            "features": torch.stack([self._cache[c][0] for c in captions]).contiguous(),  # (N, L, C)
            "mask": torch.stack([self._cache[c][1] for c in captions]).contiguous(),  # (N, L)
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"encoder": self.name, "captions": json.dumps(captions)})

    def load_cache(self, path) -> None:
        """Add the features of a file written by save_cache. Refuses a file from another encoder: its features
        would be silently wrong for this one."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("encoder") != self.name:
                raise ValueError(
                    f"feature cache {str(path)!r} was written by encoder {meta.get('encoder')!r}, not {self.name!r}; "
                    "delete it or encode again"
                )
            features, mask = f.get_tensor("features"), f.get_tensor("mask")
        for caption, fi, mi in zip(json.loads(meta["captions"]), features, mask):
            self._cache[caption] = (fi, mi)
