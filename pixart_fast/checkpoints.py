"""Checkpoint formats: ours (safetensors), the official PixArt `.pth`, facebookresearch/DiT `.pt`, and
diffusers' `PixArtTransformer2DModel` (state dict, `.safetensors` file or folder).

Inside the project every state dict uses the official repo's names (docs/ARCHITECTURE.md section 1). diffusers names map
one-to-one, except that diffusers splits `qkv` / `kv_linear` into to_q, to_k, to_v and keeps neither
`pos_embed` (recomputed) nor `y_embedding` (its pipeline encodes an empty prompt instead).

Weights are written through `pixart_fast.files.atomic_path`: a crash leaves the old file or the whole new one,
never a torn one. A file that was damaged afterwards (cut short, a flipped bit) is refused with its path and the
problem (CheckpointDamaged), never with a library traceback.
"""
import json
import pickle
import pickletools
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pixart_fast.cli import UserError
from pixart_fast.files import atomic_path
from pixart_fast.model import CONFIGS, DiT, PixArt, PixArtConfig, reparameterize

# official name prefix  <->  diffusers name prefix, for parameters that map one-to-one.
_RENAMES = [
    ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "adaln_single.emb.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "adaln_single.emb.timestep_embedder.linear_2."),
    ("t_block.1.", "adaln_single.linear."),
    ("csize_embedder.mlp.0.", "adaln_single.emb.resolution_embedder.linear_1."),
    ("csize_embedder.mlp.2.", "adaln_single.emb.resolution_embedder.linear_2."),
    ("ar_embedder.mlp.0.", "adaln_single.emb.aspect_ratio_embedder.linear_1."),
    ("ar_embedder.mlp.2.", "adaln_single.emb.aspect_ratio_embedder.linear_2."),
    ("y_embedder.y_proj.fc1.", "caption_projection.linear_1."),
    ("y_embedder.y_proj.fc2.", "caption_projection.linear_2."),
    ("final_layer.scale_shift_table", "scale_shift_table"),
    ("final_layer.linear.", "proj_out."),
]
_BLOCK_RENAMES = [  # inside blocks.i / transformer_blocks.i
    ("scale_shift_table", "scale_shift_table"),
    ("attn.proj.", "attn1.to_out.0."),
    ("cross_attn.q_linear.", "attn2.to_q."),
    ("cross_attn.proj.", "attn2.to_out.0."),
    ("mlp.fc1.", "ff.net.0.proj."),
    ("mlp.fc2.", "ff.net.2."),
]
# official fused projections -> the diffusers parts they are concatenated from (along the output dim).
_FUSED = [("attn.qkv.", ("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")),
          ("cross_attn.kv_linear.", ("attn2.to_k.", "attn2.to_v."))]
# Official-only entries: recomputed (pos_embed) or absent from diffusers (y_embedding).
NOT_IN_DIFFUSERS = ("pos_embed", "y_embedder.y_embedding")
# In the checkpoint folders of a run whose embedded T5 was trained on caption text: that encoder's weights
TEXT_ENCODER_FILE = "text_encoder.safetensors"


def diffusers_config(config: PixArtConfig) -> dict:
    """PixArtTransformer2DModel's config.json for a PixArt config. Every field is written out, so loading does
    not depend on diffusers' defaults (it would guess interpolation_scale and micro-conditions from sample_size)."""
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,  # unused by the ada_norm_single blocks
        "cross_attention_dim": config.hidden_size,
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": config.pe_interpolation,
        "use_additional_conditions": config.micro_conditions,
        "caption_channels": config.caption_channels,
        "attention_type": "default",
    }


class CheckpointMismatch(UserError):
    """A state dict does not fit a model: lists missing, unexpected and shape-mismatched keys."""


def _rename(key: str, pairs, src: int) -> str | None:
    for pair in pairs:
        if key.startswith(pair[src]):
            return pair[1 - src] + key[len(pair[src]):]
    return None


def to_diffusers(sd: dict) -> dict:
    """Official-named PixArt state dict -> diffusers PixArtTransformer2DModel names. Drops pos_embed and
    y_embedding, which diffusers does not keep."""
    out = {}
    for key, value in sd.items():
        if key in NOT_IN_DIFFUSERS:
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m is None:
            new = _rename(key, _RENAMES, 0)
        else:
            i, rest = m.groups()
            fused = [parts for name, parts in _FUSED if rest.startswith(name)]
            if fused:
                suffix = rest.split(".")[-1]  # weight / bias
                for part, chunk in zip(fused[0], value.chunk(len(fused[0]), dim=0)):
                    out[f"transformer_blocks.{i}.{part}{suffix}"] = chunk.clone()
                continue
            new = _rename(rest, _BLOCK_RENAMES, 0)
            new = None if new is None else f"transformer_blocks.{i}.{new}"
        if new is None:
            raise KeyError(f"no diffusers name for {key!r}: not a PixArt state dict?")
        out[new] = value
    return out


def diffusers_module(name: str) -> tuple[str, ...]:
    """An official-named module (`blocks.3.attn.qkv`, `t_block.1`) -> the diffusers module(s) holding its weight,
    in the order they are concatenated along the output dimension (three for qkv, two for kv_linear)."""
    m = re.match(r"blocks\.(\d+)\.(.*)", name)
    if m is None:
        new = _rename(name + ".", _RENAMES, 0)
        parts = None if new is None else (new[:-1],)
    else:
        i, rest = m.groups()
        fused = [parts for fused_name, parts in _FUSED if rest + "." == fused_name]
        new = _rename(rest + ".", _BLOCK_RENAMES, 0)
        parts = (tuple(f"transformer_blocks.{i}.{p[:-1]}" for p in fused[0]) if fused else
                 None if new is None else (f"transformer_blocks.{i}.{new[:-1]}",))
    if parts is None:
        raise KeyError(f"no diffusers module for {name!r}")
    return parts


def from_diffusers(sd: dict) -> dict:
    """diffusers PixArtTransformer2DModel state dict -> official names (no y_embedding: diffusers has none;
    load with `load_state_dict_strict(model, sd, allow_missing=("y_embedder.y_embedding",))`)."""
    out, pending = {}, {}
    for key, value in sd.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.*)", key)
        if m is None:
            new = _rename(key, _RENAMES, 1)
            if new is None:
                raise KeyError(f"no official name for diffusers key {key!r}: not a PixArtTransformer2DModel?")
            out[new] = value
            continue
        i, rest = m.groups()
        fused = [(name, parts) for name, parts in _FUSED if rest.startswith(parts)]
        if fused:
            pending[(i, rest)] = value
            continue
        new = _rename(rest, _BLOCK_RENAMES, 1)
        if new is None:
            raise KeyError(f"no official name for diffusers key {key!r}")
        out[f"blocks.{i}.{new}"] = value
    blocks = sorted({i for i, _ in pending}, key=int)
    for i in blocks:
        for name, parts in _FUSED:
            for suffix in ("weight", "bias"):
                keys = [(i, part + suffix) for part in parts]
                missing = [f"transformer_blocks.{i}.{r}" for _, r in keys if (i, r) not in pending]
                if missing:
                    raise KeyError(f"diffusers state dict lacks {missing} to build blocks.{i}.{name}{suffix}")
                out[f"blocks.{i}.{name}{suffix}"] = torch.cat([pending[k] for k in keys], dim=0)
    return out


def load_state_dict_strict(model: torch.nn.Module, sd: dict, allow_missing=(), source: str = "checkpoint") -> None:
    """Load sd into model, refusing any mismatch: raises CheckpointMismatch listing every missing, unexpected
    and shape-mismatched key (allow_missing: keys that may be absent and keep the model's values). source names
    where sd came from in the message (a path, a flag)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in allow_missing]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit {type(model).__name__} (config {getattr(model, 'config', '?')}):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointMismatch("\n".join(lines))
    model.load_state_dict(sd, strict=False)


def save_safetensors(sd: dict, path, metadata: dict | None = None) -> None:
    """Write a state dict as safetensors, atomically (see atomic_path); tensors made contiguous, metadata
    values JSON-encoded."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def nonfinite_keys(sd: dict) -> list[str]:
    """The keys of sd's floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]


class CheckpointDamaged(UserError):
    """A weight file exists but cannot be read: cut short, or its bytes damaged. The message names the file."""


def _damaged(path, error: Exception) -> CheckpointDamaged:
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointDamaged(f"{path}: damaged or cut short ({size:,} bytes; reading it failed: {first}); use "
                             "another copy or an older checkpoint")


def load_safetensors(path) -> dict:
    """A safetensors file's tensors; CheckpointDamaged (naming the file) if it is truncated or corrupt."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist") from e
        raise _damaged(path, e) from e


def _calls_code(path) -> bool:
    """Whether a file is a whole pickle stream that imports or calls something (read by pickletools, never run):
    tells pickled code from damaged bytes where torch.load's refusal does not."""
    try:
        with open(path, "rb") as f:
            return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE")
                       for op, _, _ in pickletools.genops(f))
    except Exception:  # noqa: BLE001 - not a pickle stream to its end: damaged, not code
        return False


def _torch_load_weights(path) -> dict:
    """torch.load with weights_only=True: a file that carries pickled code is refused, never run; a truncated or
    corrupt file raises CheckpointDamaged."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only's refusal: pickled code, or bytes that are no pickle at all
        why = (" ".join(str(e).split()).partition("WeightsUnpickler error: ")[2].split(". ")[0]
               .split(" Check the documentation")[0] or "not a pickle")
        if "Unsupported global" not in why:
            if not _calls_code(path):
                raise _damaged(path, ValueError(why)) from e
            why = "the pickle imports or calls code"
        raise UserError(f"{path}: refused to load: it holds pickled code, and only plain weight files are accepted "
                        f"(torch.load with weights_only=True: {why})") from e
    except (RuntimeError, EOFError, OSError, UnicodeDecodeError) as e:  # torch's zip reader: truncated or corrupt
        raise _damaged(path, e) from e
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def load_official(path) -> dict:
    """Official PixArt `.pth`: the dict under 'state_dict' (or the file itself), pos_embed dropped."""
    obj = _torch_load_weights(path)
    sd = obj.get("state_dict", obj)
    return {k: v for k, v in sd.items() if k != "pos_embed"}


def load_diffusers(path) -> dict:
    """A diffusers transformer folder (its `transformer/` subfolder also accepted, sharded or not) or a single
    `.safetensors` file with diffusers names -> official names."""
    path = Path(path)
    if path.is_dir():
        if (path / "transformer").is_dir():
            path = path / "transformer"
        index = path / "diffusion_pytorch_model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd = {k: v for f in files for k, v in load_safetensors(path / f).items()}
        elif (path / "diffusion_pytorch_model.safetensors").exists():
            sd = load_safetensors(path / "diffusion_pytorch_model.safetensors")
        else:
            raise FileNotFoundError(f"{path}: no diffusion_pytorch_model.safetensors (or its index) in this folder")
    else:
        sd = load_safetensors(path)
    return from_diffusers(sd)


def load_any(path) -> tuple[str, dict]:
    """Load a checkpoint of any supported format -> (format, state dict in official names).

    format: "pixart_fast" (our safetensors), "diffusers" (folder, or safetensors with diffusers names),
    "official" (.pth) or "dit" (.pt, class-conditional: contains adaLN_modulation keys)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return "diffusers", load_diffusers(path)
    if path.suffix == ".safetensors":
        sd = load_safetensors(path)
        if any(k.startswith("transformer_blocks.") for k in sd):
            return "diffusers", from_diffusers(sd)
        return ("dit" if any("adaLN_modulation" in k for k in sd) else "pixart_fast"), sd
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        sd = load_official(path)
        return ("dit" if any("adaLN_modulation" in k for k in sd) else "official"), sd
    raise UserError(f"{path}: unknown checkpoint format {path.suffix!r} (expected a folder, .safetensors, .pth or .pt)")



# ----------------------------------------------------------------------------------------------------------
# A model from any checkpoint: the one way the trainer, sampling and export load weights
# ----------------------------------------------------------------------------------------------------------

MICRO_KEYS = ("csize_embedder.", "ar_embedder.")  # PixArtMS's size embedders: new when a PixArt seeds a PixArtMS
DECODER_KEYS = ("pixel_decoder.",)  # a pixel decoder: new when a model without one seeds one (it starts as no change)


def load_into(model, path, seed: int = 0, source: str | None = None, from_dit: bool = True) -> str:
    """Load the checkpoint at `path` (any format of `load_any`) into a PixArt or DiT `model`, strictly, converting
    where the paper does: a class-conditional DiT into a PixArt through re-parameterization (section 2.3, `seed`
    for its draws), a PixArt without micro-conditions into a PixArtMS (the size embedders keep their fresh
    weights), weights without a pixel decoder into a model with one (its fresh decoder starts as no change),
    diffusers' weights without `y_embedding` (the model's stays). Refuses NaN or inf weights and a
    PixArt into a DiT, and (from_dit False) a DiT into a PixArt. source: how messages name the checkpoint (default:
    its path). Returns what was done."""
    source = source or str(path)
    kind, sd = load_any(path)
    bad = nonfinite_keys(sd)
    if bad:
        raise UserError(f"{source}: NaN or inf in {len(bad)} tensors ({', '.join(bad[:3])}); pick another checkpoint")
    if isinstance(model, DiT):
        if kind != "dit":
            raise ValueError(f"stage 1 trains a class-conditional DiT; {source} is a {kind} checkpoint")
        load_state_dict_strict(model, sd, source=source)
        return f"initialised from DiT checkpoint {path}"
    if kind == "dit" and not from_dit:
        raise ValueError(f"{source} is a class-conditional DiT (stage 1): it takes class labels, not prompts; "
                         "train stage 2 from it")
    if kind == "dit":
        pixart_sd = reparameterize(sd, model.config, seed=seed)
        new = tuple(k for k in model.state_dict() if k.startswith(DECODER_KEYS))
        load_state_dict_strict(model, pixart_sd, allow_missing=new, source=source)
        fresh = " (pixel decoder new)" if new else ""
        return f"initialised from DiT checkpoint {path} through re-parameterization (paper section 2.3){fresh}"
    new = tuple(k for k in model.state_dict() if k.startswith(MICRO_KEYS + DECODER_KEYS) and k not in sd)
    allow = new + (("y_embedder.y_embedding",) if kind == "diffusers" else ())
    load_state_dict_strict(model, sd, allow_missing=allow, source=source)
    parts = ((MICRO_KEYS, "micro-condition embedders"), (DECODER_KEYS, "pixel decoder"))
    fresh = "".join(f" ({what} new)" for keys, what in parts if any(k.startswith(keys) for k in new))
    fits = matching_configs(path)
    same_size = [n for n in fits if (CONFIGS[n].input_size, CONFIGS[n].pe_interpolation) ==
                 (model.config.input_size, model.config.pe_interpolation)]
    if fits and not same_size:  # e.g. 512-px weights into a 1024-px model
        fresh += (f"; note: made for {' / '.join(fits)}, now at input size {model.config.input_size} and position "
                  f"scale {model.config.pe_interpolation:g}: a change of resolution, as PixArt's own 512 -> 1024 step")
    return f"initialised from {kind} PixArt checkpoint {path}{fresh}"


def checkpoint_file(ckpt: Path, weights: str = "ema") -> Path:
    """Our trainer's checkpoint folder (step-XXXXXXX/) -> its {weights}.safetensors; anything else unchanged."""
    if ckpt.is_dir() and (ckpt / f"{weights}.safetensors").exists():
        return ckpt / f"{weights}.safetensors"
    return ckpt


def stored_text_encoder(ckpt: Path) -> dict | None:
    """The trained embedded T5's weights that our checkpoint folder `ckpt` (or its weights file) keeps, or None
    (no such file: a T5 random or pretrained, or a checkpoint written before the weights were kept)."""
    ckpt = Path(ckpt)
    path = (ckpt if ckpt.is_dir() else ckpt.parent) / TEXT_ENCODER_FILE
    return load_safetensors(path) if path.is_file() else None


def training_metadata(path) -> dict:
    """What our trainer records in a checkpoint's safetensors metadata ({} for other files): "model" (the config
    name), "step", "stage", "prediction" ("eps", "v" or "flow"), "tokenizer", "t5_locality" and "t5_train_steps"
    (the embedded T5's); a LoRA run's "lora_rank", "lora_alpha", "lora_targets" and "base"."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except SafetensorError as e:
        raise _damaged(path, e) from e
    recorded = {}
    for key, value in raw.items():  # ours are JSON; another writer's ("format": "pt") stay strings
        try:
            recorded[key] = json.loads(value)
        except ValueError:
            recorded[key] = value
    return recorded


def _released_shapes(path: Path) -> tuple[str, dict]:
    """(kind, what a released checkpoint says about its model without loading its weights): a diffusers folder's
    config.json, an official .pth's tensor shapes (memory-mapped: nothing is read but the header)."""
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        if (folder / "config.json").is_file():
            return "diffusers", json.loads((folder / "config.json").read_text())
        return "diffusers", {}
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old non-zip file, or damaged: load_into says what is wrong when it reads it
            return "official", {}
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
        return "official", {k: tuple(v.shape) for k, v in sd.items() if torch.is_tensor(v)}
    return "other", {}


def _official_shapes(config: PixArtConfig) -> dict:
    with torch.device("meta"):
        model = PixArt(config, kernels="torch")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {**shapes, "pos_embed": tuple(model.pos_embed.shape)}


_DIFFUSERS_FIELDS = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                     "patch_size", "sample_size", "caption_channels", "interpolation_scale", "use_additional_conditions")


def matching_configs(path) -> list[str]:
    """The CONFIGS names a checkpoint fits: the one our trainer recorded; for a diffusers folder, those whose
    config.json fields agree (interpolation_scale absent: diffusers' default, sample_size // 64, at least 1); for
    an official .pth, those with its tensors' shapes, position embedding included (its token count is the
    resolution). Released PixArt-alpha 512 and PixArt-Sigma 512 folders differ only in caption length, which a
    diffusers config does not record: both match."""
    path = Path(path)
    recorded = training_metadata(path).get("model")
    if recorded:
        return [recorded]
    kind, known = _released_shapes(path)
    if not known:
        return []
    if kind == "diffusers":
        if known.get("interpolation_scale") is None:
            known = {**known, "interpolation_scale": max(known.get("sample_size", 64) // 64, 1)}
        return [n for n, c in CONFIGS.items()
                if all(known.get(f) == v for f, v in diffusers_config(c).items() if f in _DIFFUSERS_FIELDS)]
    fits = []
    for name, config in CONFIGS.items():
        shapes = _official_shapes(config)  # every tensor of the file in the model, every weight of the model in it
        if all(shapes.get(k) == v for k, v in known.items()) and set(shapes) - {"pos_embed"} <= set(known):
            fits.append(name)
    return fits


def config_name(path, name: str | None = None) -> str:
    """The model config a checkpoint is for: `name` if given, else the one our trainer records in its
    safetensors metadata, else the only one released weights fit (`matching_configs`). Raises ValueError naming
    the choices when none of these says, or the name is unknown."""
    fits = [name] if name else matching_configs(path)
    if len(fits) != 1:
        choices = fits or sorted(CONFIGS)
        raise ValueError(f"{path} does not say which model config it is for; pass --model, one of {choices}")
    name = fits[0]
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS)}")
    return name


def load_pixart(path, name: str | None = None, kernels: str = "auto"):
    """A text-conditioned PixArt built from config `name` (default: the one the checkpoint records) with the
    checkpoint's weights. A class-conditional DiT (stage 1) is refused: it takes class labels, not captions."""
    model = PixArt(CONFIGS[config_name(path, name)], kernels=kernels)
    load_into(model, path, from_dit=False)
    return model
