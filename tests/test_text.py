"""The caption encoder: PixArt's padding and mask, the fixed embedded default, the feature cache, truncation."""
import warnings

import pytest
import torch

from pixart_fast.data import ShapeScenes
from pixart_fast.text import BINDING_CLASSES, MAX_TOKENS, TextEncoder, binding_flops, phrase_labels


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.embedded()


def test_features_padding_and_mask(encoder):
    captions = ["a red circle at top left", "", "a small blue square at center and a large green diamond at right"]
    features, mask = encoder.encode(captions)
    assert features.shape == (3, MAX_TOKENS, encoder.caption_channels) and features.dtype == torch.float32
    assert mask.shape == (3, MAX_TOKENS) and mask.dtype == torch.bool
    # ByT5: one token per byte, then EOS; the mask marks exactly those, left-aligned
    for row, caption in zip(mask, captions):
        n = len(caption.encode()) + 1
        assert row[:n].all() and not row[n:].any()
    assert torch.isfinite(features).all()
    # padding to a fixed length makes a caption's features independent of its batch
    alone, _ = encoder.encode(captions[:1])
    torch.testing.assert_close(alone[0], features[0], rtol=1e-5, atol=1e-5)
    assert (features[0, :10] - features[2, :10]).abs().max() > 0.1  # different captions, different features


def test_embedded_default_is_fixed_frozen_and_leaves_global_rng_alone(encoder):
    assert encoder.caption_channels == 64
    state = torch.random.get_rng_state()
    again = TextEncoder.embedded()
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), b in zip(encoder.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    other = TextEncoder.embedded(seed=1).model.state_dict()
    assert not torch.equal(other["shared.weight"], encoder.model.state_dict()["shared.weight"])
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    features, _ = encoder.encode(["a red circle"])
    assert not features.requires_grad


def test_local_folder_round_trip(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path)
    captions = ["a purple triangle at bottom", "a cyan square at top right"]
    for got, want in zip(loaded.encode(captions), encoder.encode(captions)):
        assert torch.equal(got, want)
    assert loaded.caption_channels == encoder.caption_channels and loaded.name != encoder.name
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_pretrained(tmp_path / "missing")


def test_feature_cache(tmp_path):
    encoder = TextEncoder.embedded()
    captions = ["a red circle at top left", "a blue square at center", "a red circle at top left"]
    calls = []
    encoder.model.register_forward_hook(lambda module, args, out: calls.append(1))
    cached = encoder.encode_cached(captions)
    assert len(calls) == 1
    for got, want in zip(cached, encoder.encode(captions)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls.clear()
    encoder.encode_cached(captions[::-1])
    assert not calls  # every caption already cached

    encoder.save_cache(tmp_path / "cache.safetensors")
    fresh = TextEncoder.embedded()
    fresh.model.register_forward_hook(lambda module, args, out: calls.append(1))
    fresh.load_cache(tmp_path / "cache.safetensors")
    for got, want in zip(fresh.encode_cached(captions), cached):
        assert torch.equal(got, want)
    assert not calls
    with pytest.raises(ValueError, match="written by encoder"):
        TextEncoder.embedded(seed=1).load_cache(tmp_path / "cache.safetensors")


def test_truncation_is_counted_and_warned_once():
    encoder = TextEncoder.embedded()
    long = "a red circle at top left " * 8  # 200 bytes
    with pytest.warns(UserWarning, match="exceed 120 tokens"):
        _, mask = encoder.encode([long, "short"])
    assert mask[0].all() and mask[1].sum() == 6 and encoder.truncated == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode([long, long])  # counted, not warned again
    assert encoder.truncated == 3


def test_stage2_captions_are_never_truncated(encoder):
    captions = [ShapeScenes(length=300)[i]["caption"] for i in range(300)]
    _, mask = encoder.tokenize(captions)
    assert encoder.truncated == 0
    # bytes + EOS, which test_data bounds by 120 for the longest caption the grammar can write
    assert mask.sum(1).tolist() == [len(c.encode()) + 1 for c in captions]
    with pytest.raises(TypeError, match="list of captions"):
        encoder.encode("a red circle")


def test_word_tokenizer_gives_one_token_a_word_of_every_embedded_caption():
    encoder = TextEncoder.embedded(tokenizer="word")
    tok = encoder.tokenizer
    captions = [ShapeScenes(length=64, split=split)[i]["caption"] for split in ("train", "val") for i in range(32)]
    for caption in captions:
        ids = tok(caption)["input_ids"]
        words = caption.replace(",", " ,").split()
        assert len(ids) == len(words) + 1 and ids[-1] == tok.eos_token_id  # one token a word, then EOS
        assert tok.unk_token_id not in ids
    features, mask = encoder.encode(captions[:2])
    assert features.shape == (2, MAX_TOKENS, encoder.caption_channels) and mask.sum(1).tolist() == [
        len(tok(c)["input_ids"]) for c in captions[:2]]
    assert "word" in encoder.name and encoder.name != TextEncoder.embedded().name
    with pytest.raises(ValueError, match="tokenizer must be"):
        TextEncoder.embedded(tokenizer="bpe")


def test_local_attention_bias_falls_with_distance_and_names_the_encoder():
    """locality > 0: the embedded T5's relative position bias is -locality x distance (its buckets' nearest), the
    same in every head, so a token's features mix mostly its neighbours; the encoder's name (the feature cache's
    key) says so, and locality 0 leaves the seeded random bias."""
    plain = TextEncoder.embedded(tokenizer="word", max_length=32)
    local = TextEncoder.embedded(tokenizer="word", max_length=32, locality=0.5)
    bias = local.model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert torch.equal(bias[:, 0], bias[:, 1]) and bias[0, 0] == 0  # bucket 0: distance 0
    assert bias[1, 0] == -0.5 and (bias <= 0).all()
    assert "local0.5" in local.name and "local" not in plain.name
    for (name, a), b in zip(plain.model.named_parameters(), local.model.parameters()):
        assert torch.equal(a, b) == ("relative_attention_bias" not in name), name
    features, mask = local.encode(["a red circle at top left and a blue square at bottom right"])
    assert torch.isfinite(features).all() and mask.sum() == 14  # 13 words and EOS


def test_phrase_labels_are_each_objects_own_attributes():
    """Each word of a caption's phrase is labelled with what the renderer drew for that object (the Scene, which the
    labels never see: they come from the words), separators and specials with -100."""
    tok = TextEncoder.word_tokenizer()
    items = ShapeScenes(length=40, split="val")
    for i in range(40):
        scene = items[i]["truth"]
        tokens = tok.convert_ids_to_tokens(tok(scene.caption)["input_ids"])
        labels = phrase_labels(tokens)
        phrases = [[]]
        for position, token in enumerate(tokens[:-1]):
            if token in (",", "and"):
                phrases.append([])
            else:
                phrases[-1].append(position)
        assert len(phrases) == len(scene.objects)
        for positions, o in zip(phrases, scene.objects):
            want = [BINDING_CLASSES[0].index(o.size), BINDING_CLASSES[1].index(o.colour),
                    BINDING_CLASSES[2].index(o.shape), BINDING_CLASSES[3].index(o.region)]
            assert labels[positions].tolist() == [want] * len(positions), scene.caption
        separators = [p for p, t in enumerate(tokens) if t in (",", "and", "</s>")]
        assert (labels[separators] == -100).all()
    # a phrase without a cell (a stage-1 class name) teaches no cell
    labels = phrase_labels(["a", "red", "circle", "</s>"])
    assert labels[:3, 3].eq(-100).all() and labels[:3, :3].tolist() == [[1, 0, 0]] * 3


def _probe_accuracy(encoder, fit: int = 300, held_out: int = 150) -> list[float]:
    """Per attribute (BINDING_CLASSES), how well a least-squares linear probe on one caption token's features names
    its phrase's value, fit on `fit` held-out captions and scored on `held_out` others."""
    captions = [ShapeScenes(length=fit + held_out, split="val")[i]["caption"] for i in range(fit + held_out)]
    features, mask = encoder.encode(captions)
    labels = torch.stack([phrase_labels(encoder.tokenizer.convert_ids_to_tokens(ids))
                          for ids in encoder.tokenize(captions)[0]])
    scores = []
    for column, classes in enumerate(BINDING_CLASSES):
        def rows(part):
            x, y = features[part].flatten(0, 1), labels[part, :, column].flatten()
            return torch.cat([x, torch.ones(len(x), 1)], 1)[y >= 0], y[y >= 0]
        (x_fit, y_fit), (x_test, y_test) = rows(slice(0, fit)), rows(slice(fit, None))
        weights = torch.linalg.lstsq(x_fit, torch.nn.functional.one_hot(y_fit, len(classes)).float()).solution
        scores.append((x_test @ weights).argmax(1).eq(y_test).float().mean().item())
    return scores


def test_training_on_caption_text_binds_each_word_to_its_phrase():
    """train_steps: the embedded T5 learns from caption text alone to carry its phrase's size, colour, shape and cell
    in every word, so a linear probe reads them off any word of the phrase far better than from the untrained
    encoder (chance: 1/3, 1/6, 1/4, 1/9). The weights are the same on every call, the caller's RNG and thread count
    are untouched, the name (the feature cache's key) says so, and the cost is counted."""
    untrained = TextEncoder.embedded(tokenizer="word", max_length=32, locality=0.5)
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    trained = TextEncoder.embedded(tokenizer="word", max_length=32, locality=0.5, train_steps=60)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads
    before, after = _probe_accuracy(untrained), _probe_accuracy(trained)
    assert sum(before) / 4 < 0.85 and sum(after) / 4 > 0.9, (before, after)
    assert all(a > b for a, b in zip(after, before)), (before, after)
    short, again = (TextEncoder.embedded(tokenizer="word", max_length=32, locality=0.5, train_steps=3) for _ in "ab")
    for (name, a), b in zip(short.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert "trained60" in trained.name and "trained" not in untrained.name
    assert trained.training_flops == binding_flops(trained.model.config, 60, 32) > 0 == untrained.training_flops
    assert not any(p.requires_grad for p in trained.model.parameters()) and not trained.model.training
    with pytest.raises(ValueError, match="word tokens only"):
        TextEncoder.embedded(train_steps=5)
    # given the trained weights (as a checkpoint keeps them), the same encoder without training again
    given = TextEncoder.embedded(tokenizer="word", max_length=32, locality=0.5, train_steps=60,
                                 weights=trained.model.state_dict())
    caption = ["a small red circle at top left and a large blue square at center"]
    assert given.name == trained.name and torch.equal(given.encode(caption)[0], trained.encode(caption)[0])
    assert given.training_seconds == 0 < trained.training_seconds and given.training_flops == trained.training_flops
    with pytest.raises(ValueError, match="pass its train_steps"):
        TextEncoder.embedded(tokenizer="word", max_length=32, locality=0.5, weights=trained.model.state_dict())
