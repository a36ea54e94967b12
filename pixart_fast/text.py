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
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from pixart_fast.data import COLOURS, REGIONS, SHAPES, SIZES, random_scene
from pixart_fast.files import atomic_path

MAX_TOKENS = 120  # PixArt-alpha's caption length (the default): the null caption `y_embedding` has this many rows
# What training on caption text teaches each word of a phrase about that phrase: its size ("medium" where none is
# named), colour, shape and cell. Captions a step and the learning rate of that training:
BINDING_CLASSES = (tuple(SIZES), tuple(COLOURS), SHAPES, REGIONS)
BINDING_BATCH, BINDING_LR = 64, 3e-3
SEPARATORS = (",", "and")


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


def phrase_labels(tokens: list[str]) -> torch.Tensor:
    """The classes training on caption text teaches a word-level caption's tokens: (len(tokens), 4) int64. Every
    word of a phrase ('a small red circle at top left') gets that phrase's size, colour, shape and cell as indices
    into BINDING_CLASSES (size "medium" where none is named); separators (',', 'and'), specials and what a phrase
    does not say get -100, which is not taught. The labels come from the caption's own words."""
    labels = torch.full((len(tokens), len(BINDING_CLASSES)), -100, dtype=torch.long)
    start = 0
    for end in range(len(tokens) + 1):
        if end < len(tokens) and tokens[end] not in SEPARATORS and not tokens[end].startswith("<"):
            continue
        words = tokens[start:end]
        if words:
            size = next((w for w in words if w in SIZES), "medium")
            region = " ".join(words[words.index("at") + 1:]) if "at" in words else None
            found = (size, next((w for w in words if w in COLOURS), None), next((w for w in words if w in SHAPES),
                     None), region)
            for column, (classes, value) in enumerate(zip(BINDING_CLASSES, found)):
                if value in classes:
                    labels[start:end, column] = classes.index(value)
        start = end + 1
    return labels


def binding_flops(config: T5Config, steps: int, max_length: int) -> int:
    """Training FLOPs of `steps` steps of training on caption text (forward + backward = 3 x forward, every padded
    token counted): per token and layer the attention projections, the gated MLP and the attention over the
    caption, then the classes' linear head."""
    d, inner = config.d_model, config.num_heads * config.d_kv
    per_token = config.num_layers * (4 * d * inner + 3 * d * config.d_ff + 2 * max_length * inner)
    per_token += d * sum(len(c) for c in BINDING_CLASSES)
    return 3 * 2 * per_token * steps * BINDING_BATCH * max_length


def _teach_binding(model: T5EncoderModel, tokenizer, steps: int, seed: int, max_length: int) -> None:
    """Train `model` in place on caption text alone (captions `random_scene` writes, from their own stream seeded
    by `seed`): every word learns its phrase's size, colour, shape and cell (`phrase_labels`) through a linear head
    that is then dropped. One thread, so that every call on a machine gives the same weights; the global RNG is
    untouched."""
    sizes = [len(c) for c in BINDING_CLASSES]
    rng, threads = np.random.default_rng([seed, 1]), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(model.config.d_model, sum(sizes))
        model.train().requires_grad_(True)
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=BINDING_LR, weight_decay=0.0)
        torch.set_num_threads(1)
        try:
            for _ in range(steps):
                captions = [random_scene(rng, 32, 32).caption for _ in range(BINDING_BATCH)]
                tokens = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                                   return_tensors="pt")
                labels = torch.stack([phrase_labels(tokenizer.convert_ids_to_tokens(ids)) for ids in tokens.input_ids])
                hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
                loss = sum(F.cross_entropy(logits.flatten(0, 1), labels[..., column].flatten(), ignore_index=-100)
                           for column, logits in enumerate(head(hidden).split(sizes, dim=-1)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
    model.eval().requires_grad_(False)


class TextEncoder:
    """A frozen T5 encoder and its tokenizer. encode(captions) -> (features (B, max_length, C) float32, mask
    (B, max_length) bool), on the encoder's device; C = `caption_channels`, max_length 120 (PixArt-alpha, the
    default) or 300 (PixArt-Sigma): the model's config.max_tokens.

    `encode_cached` keeps the features of every caption it has seen (on the CPU), for the fixed caption sets
    a trainer encodes again and again; `save_cache` / `load_cache` keep them in a safetensors file.
    `truncated` counts captions longer than max_length tokens that were cut (warned about once). `training_flops`:
    what training the embedded T5 on caption text cost (0 for a random or a pretrained one; given its trained
    weights, what they cost); `training_seconds`: the seconds that training took here (0 when given its weights).
    """

    def __init__(self, model: T5EncoderModel, tokenizer, name: str, max_length: int = MAX_TOKENS):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.name, self.max_length = tokenizer, name, max_length
        self.caption_channels = model.config.d_model
        self.truncated, self.training_flops, self.training_seconds = 0, 0, 0.0
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
        tokenizer: str = "byte", max_length: int = MAX_TOKENS, locality: float = 0.0, train_steps: int = 0,
        weights: dict | None = None,
    ) -> "TextEncoder":
        """The embedded default: a T5 v1.1-style encoder (gated-GELU MLP) with random weights fixed by seed,
        built without touching the global RNG, and ByT5's tokenizer (vocabulary 384: 3 specials, 256 bytes,
        125 sentinels). Its features carry the caption's bytes and their order; the diffusion model learns
        to read them through its caption projection. tokenizer "word": `word_tokenizer()` instead, one token per
        word of the captions' closed vocabulary (the cross-attention then reads words, not spellings).
        max_length: the caption length (default 120). locality > 0: the first layer's relative position bias (T5
        keeps it there, shared by all layers) falls by `locality` per token of distance instead of being random,
        so each token's features mix mostly its own phrase's words: a region word then carries its object's
        colour and shape, which a trained T5 binds and a random one mixes with the other objects' words.
        train_steps > 0 (word tokens only): the encoder is then trained on caption text alone for that many steps of
        BINDING_BATCH captions (`_teach_binding`): every word learns its phrase's size, colour, shape and cell, as a
        T5 trained on language binds modifiers to their noun, with no image seen. weights: that training's result
        (the state dict a run's checkpoints keep, `TEXT_ENCODER_FILE`), loaded instead of training again: the same
        encoder on any machine, where training again is exact only on the machine that trained it."""
        if tokenizer not in ("byte", "word"):
            raise ValueError(f"tokenizer must be 'byte' or 'word', got {tokenizer!r}")
        if train_steps < 0 or (train_steps and tokenizer != "word"):
            raise ValueError(f"train_steps {train_steps}: the embedded T5 is trained on word tokens only (tokenizer "
                             f"'word'), for >= 0 steps; got tokenizer {tokenizer!r}")
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
        start = time.perf_counter()
        if weights is not None:
            if not train_steps:
                raise ValueError("weights are those of an encoder trained on caption text: pass its train_steps")
            model.load_state_dict(weights)  # strict: the architecture above must be the one that was trained
        elif train_steps:
            _teach_binding(model, tok, train_steps, seed, max_length)
        name = f"embedded-t5-d{d_model}-l{num_layers}-h{num_heads}-f{d_ff}-seed{seed}"
        name += ("" if tokenizer == "byte" else f"-{tokenizer}") + (f"-local{locality:g}" if locality else "")
        name += (f"-trained{train_steps}" if train_steps else "") + _length_tag(max_length)
        encoder = cls(model.to(device), tok, name=name, max_length=max_length)
        encoder.training_flops = binding_flops(config, train_steps, max_length)
        encoder.training_seconds = time.perf_counter() - start if train_steps and weights is None else 0.0
        return encoder

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
