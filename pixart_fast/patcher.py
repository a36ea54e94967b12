"""Put the fused kernels into a DiT you already have: `patch(model)` swaps them in, `unpatch(model)` takes them out.

One mechanism serves every model family. patch() walks the model, recognises modules by their structure (attribute
names, module types, forward signatures; never by class), and replaces ONE callable attribute of each recognised
module: its `forward`, by a bound method that calls the kernels, or, for diffusers' cross-attention, its attention
`processor`. No parameter or buffer is added, renamed or touched, so state dicts load unchanged. The value each
swap replaced is kept in the returned PatchReport, which stays on the model as `model.pixart_fast_patch` until
unpatch() puts every original back.

What is recognised ([flag of patch()]):
  [modulate]         diffusers BasicTransformerBlock with norm_type "ada_norm_single" (PixArt-alpha and -Sigma's
                     PixArtTransformer2DModel) or "ada_norm_zero" (DiTTransformer2DModel), and facebookresearch/DiT-
                     style blocks and final layers: LayerNorm + adaLN modulation and the gated residuals (the
                     attention residual fused with the MLP's LayerNorm + modulation where nothing lies in between).
  [cross_attention]  diffusers Attention modules doing cross-attention: a processor that runs the Triton kernel.
  [patchify]         a Conv2d named `proj` with kernel_size == stride (the patch embedding of diffusers, timm and
                     DiT): patchify + one matmul.
Each replacement falls back to the original for calls it cannot serve (see each one's docstring).
"""
import functools
import inspect
import math
import types
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixart_fast.kernels.backend import BACKENDS
from pixart_fast.kernels.cross_attn import MAX_HEAD_DIM, MAX_KV_LEN, cross_attention
from pixart_fast.kernels.modulation import MAX_D, gated_residual, gated_residual_modulate, modulate
from pixart_fast.kernels.patch_copy import patchify
from pixart_fast.model import CrossAttention, PatchEmbed, PixArt, PixArtBlock, linear_dtype

# pixart_fast's own modules, which call the kernels themselves by their `kernels` setting: patch() leaves them, and
# what is inside them, alone. The stage-1 DiT is not among them: its blocks are facebookresearch/DiT's PyTorch code.
CHOOSE_THEIR_KERNELS = (PixArt, PixArtBlock, CrossAttention, PatchEmbed)

ATTR = "pixart_fast_patch"  # the one attribute patch() sets on the model: its PatchReport; unpatch() removes it


@dataclass
class PatchReport:
    """What patch() did. swapped: (module path, what runs there now); skipped: (module path, why it was recognised
    but left as it is). originals: (module, attribute, the module's own value before the swap, or None where it
    used its class's) -- what unpatch() restores. `print(report)` lists swapped and skipped modules."""

    backend: str
    swapped: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    originals: list[tuple[nn.Module, str, object]] = field(default_factory=list, repr=False)

    def __str__(self):
        lines = [f"pixart_fast.patch(backend={self.backend!r}): {len(self.swapped)} swapped, "
                 f"{len(self.skipped)} left as they are"]
        lines += [f"  swapped  {path or '<model>'}: {what}" for path, what in self.swapped]
        lines += [f"  skipped  {path or '<model>'}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The replacements. Each runs the original module's computation through the kernels, reading the module's own
# submodules and parameters; `backend` is bound by patch().
# ----------------------------------------------------------------------------------------------------------


def _diffusers_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                             encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                             class_labels=None, added_cond_kwargs=None, *, backend):
    """diffusers' BasicTransformerBlock.forward for norm_type "ada_norm_single" and "ada_norm_zero": same arguments,
    same result. hidden_states (B, T, D). timestep: ada_norm_single: t0 (B, 6D) from the model's adaln_single;
    ada_norm_zero: diffusion timesteps (B,) embedded with class_labels (B,) by norm1. attn1, attn2 and ff run as
    they are (attn2 through whatever processor it has). Calls with cross_attention_kwargs (GLIGEN, processor
    arguments), a chunked feed-forward (set_chunk_feed_forward) or 4-D hidden states run diffusers' own forward."""
    if cross_attention_kwargs or self._chunk_size is not None or hidden_states.dim() != 3:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    B = hidden_states.shape[0]
    if self.norm_type == "ada_norm_single":  # PixArt: the block's (6, D) table plus the t0 all blocks share
        mod = (self.scale_shift_table[None] + timestep.reshape(B, 6, -1)).unbind(1)
        norm_msa, norm_mlp = self.norm1, self.norm2
    else:  # ada_norm_zero (DiT): the block's own adaLN of the timestep + class embedding
        ada = self.norm1
        mod = ada.linear(ada.silu(ada.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype))).chunk(6, dim=1)
        norm_msa, norm_mlp = ada.norm, self.norm3
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod  # (B, D) each
    low = linear_dtype(hidden_states)  # under autocast the modulated copies feed Linears in its dtype: no cast pass
    x = modulate(hidden_states, shift_msa, scale_msa, eps=norm_msa.eps, backend=backend, out_dtype=low)  # (B, T, D)
    attn = self.attn1(x, attention_mask=attention_mask)
    if self.attn2 is None:  # nothing between the two branches: fuse the residual add with the next LN + modulation
        hidden_states, x = gated_residual_modulate(hidden_states, gate_msa, attn, shift_mlp, scale_mlp,
                                                   eps=norm_mlp.eps, backend=backend, out_dtype=low)
    else:  # PixArt: cross-attention on the raw stream in between, no norm, no gate
        hidden_states = gated_residual(hidden_states, gate_msa, attn, backend=backend)
        hidden_states = hidden_states + self.attn2(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                                   attention_mask=encoder_attention_mask)
        x = modulate(hidden_states, shift_mlp, scale_mlp, eps=norm_mlp.eps, backend=backend, out_dtype=low)
    return gated_residual(hidden_states, gate_mlp, self.ff(x), backend=backend)  # (B, T, D)


def _dit_block_forward(self, x, c, *, backend):
    """facebookresearch/DiT's DiTBlock.forward: x (B, T, D), c (B, D) -> (B, T, D). adaLN_modulation(c) gives
    shift, scale, gate of the attention branch, then of the MLP branch, in DiT's order."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    low = linear_dtype(x)
    m = modulate(x, shift_msa, scale_msa, eps=self.norm1.eps, backend=backend, out_dtype=low)
    x, m = gated_residual_modulate(x, gate_msa, self.attn(m), shift_mlp, scale_mlp, eps=self.norm2.eps,
                                   backend=backend, out_dtype=low)
    return gated_residual(x, gate_mlp, self.mlp(m), backend=backend)


def _dit_final_layer_forward(self, x, c, *, backend):
    """facebookresearch/DiT's FinalLayer.forward: x (B, T, D), c (B, D) -> linear(modulate(LN(x))) (B, T, out)."""
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(x, shift, scale, eps=self.norm_final.eps, backend=backend, out_dtype=linear_dtype(x)))


def _patch_conv_forward(self, x, *, backend):
    """Conv2d with kernel_size == stride == p as patchify + matmul: x (B, C, H, W) -> (B, D, H/p, W/p).

    The result is a view of (B, H/p, W/p, D) tokens (channels-last strides), so the `.flatten(2).transpose(1, 2)`
    that patch embeddings apply next gives contiguous (B, T, D) tokens without a copy. Unbatched inputs and
    sizes that are not multiples of p (the convolution drops the border) run the convolution itself."""
    p = self.kernel_size[0]
    if x.dim() != 4 or x.shape[2] % p or x.shape[3] % p:
        return type(self).forward(self, x)
    tokens = F.linear(patchify(x, p, backend=backend), self.weight.flatten(1), self.bias)  # (B, T, D)
    return tokens.unflatten(1, (x.shape[2] // p, x.shape[3] // p)).permute(0, 3, 1, 2)  # (B, D, H/p, W/p)


def _keep_mask(attention_mask):
    """diffusers' cross-attention mask (B, 1, L) -> (B, L) bool, True = attend. A float mask is the additive bias
    diffusers builds (0 keep, -10000 drop), kept where > -1; a bool mask is used as it is. A caption whose keys are
    all dropped attends to every key, as under the bias, which then shifts all its scores alike (softmax ignores
    that), rather than giving the kernel's zeros."""
    keep = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] > -1
    return keep | ~keep.any(dim=1, keepdim=True)


class CrossAttnProcessor:
    """A diffusers attention processor that runs cross-attention through pixart_fast's Triton kernel.

    Calls it cannot serve go to `original`, the processor it replaced: self-attention (no encoder_hidden_states),
    4-D hidden states, a mask that is not (B, 1, L), more than MAX_KV_LEN keys, extra processor arguments.
    """

    def __init__(self, original, backend: str):
        self.original, self.backend = original, backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        """hidden_states (B, N, D) image tokens; encoder_hidden_states (B, L, D_text); attention_mask (B, 1, L)
        bias or None. Returns (B, N, D): to_out(softmax(q k^T / sqrt(Dh)) v) over attn.heads heads."""
        B = hidden_states.shape[0]
        if (encoder_hidden_states is None or hidden_states.dim() != 3 or args or kwargs
                or encoder_hidden_states.shape[1] > MAX_KV_LEN
                or (attention_mask is not None and attention_mask.shape != (B, 1, encoder_hidden_states.shape[1]))):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        H = attn.heads
        q = attn.to_q(hidden_states).unflatten(-1, (H, -1))  # (B, N, H, Dh)
        k = attn.to_k(encoder_hidden_states).unflatten(-1, (H, -1))  # (B, L, H, Dh)
        v = attn.to_v(encoder_hidden_states).unflatten(-1, (H, -1))  # (B, L, H, Dh)
        keep = None if attention_mask is None else _keep_mask(attention_mask)
        out = cross_attention(q, k, v, keep, backend=self.backend).flatten(2)  # (B, N, H * Dh)
        return attn.to_out[1](attn.to_out[0](out))  # output projection, dropout


# ----------------------------------------------------------------------------------------------------------
# Recognising modules. Each rule takes (path, module) and returns None (not this kind of module), a string (this
# kind, but it cannot be patched: why), or a _Swap (which attribute gets which replacement).
# ----------------------------------------------------------------------------------------------------------


class _Swap(NamedTuple):
    attr: str  # "forward" or "processor"
    make: object  # make(module, backend) -> the new value of module.<attr>
    what: str  # for the report


def _method(fn):
    """make(module, backend) binding fn(module, ..., backend=backend) as the module's method."""
    return lambda module, backend: types.MethodType(functools.partial(fn, backend=backend), module)


def _forward_args(m: nn.Module) -> list[str]:
    """Parameter names of the module's class forward, without self."""
    return list(inspect.signature(type(m).forward).parameters)[1:]


def _why_not_plain_layer_norm(norm) -> str | None:
    """Why `norm` is not the LayerNorm the modulate kernel computes (one dim, no affine weights); None if it is."""
    if not isinstance(norm, nn.LayerNorm) or type(norm).forward is not nn.LayerNorm.forward:
        return f"its norm {type(norm).__name__} is not a plain nn.LayerNorm"
    if norm.weight is not None or norm.bias is not None:
        return "its LayerNorm has affine weights; the modulate kernel normalises without them"
    if len(norm.normalized_shape) != 1 or norm.normalized_shape[0] > MAX_D:
        return f"its LayerNorm is over {tuple(norm.normalized_shape)}; the kernel takes one dim of at most {MAX_D}"
    return None


def _why_not_adaln(adaln, n: int, D: int) -> str | None:
    """Why adaLN_modulation (ending in a Linear) does not give n vectors of width D; None if it does."""
    last = adaln[-1] if isinstance(adaln, nn.Sequential) else adaln
    if getattr(last, "out_features", None) != n * D:
        return f"adaLN_modulation gives {getattr(last, 'out_features', '?')} features, not {n} * D = {n * D}"
    return None


_DIFFUSERS_BLOCK_ARGS = ["hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                         "timestep", "cross_attention_kwargs", "class_labels", "added_cond_kwargs"]


def _diffusers_block(path, m):
    # Submodules first: diffusers models answer hasattr for their config keys (norm_type) with a warning.
    if not all(hasattr(m, a) for a in ("norm1", "attn1", "attn2", "ff", "pos_embed", "_chunk_size", "norm_type")) or \
            _forward_args(m) != _DIFFUSERS_BLOCK_ARGS:
        return None
    if m.norm_type == "ada_norm_single":
        norms = (m.norm1, m.norm2)
    elif m.norm_type == "ada_norm_zero":
        if m.attn2 is not None:
            return "an ada_norm_zero block with cross-attention (norm2 before attn2) is not handled"
        if getattr(m.norm1, "emb", None) is None:
            return "its AdaLayerNormZero has no timestep/class embedder (emb)"
        norms = (m.norm1.norm, m.norm3)
    else:
        return f"norm_type {m.norm_type!r} has no adaLN modulation (patched: 'ada_norm_single', 'ada_norm_zero')"
    if m.pos_embed is not None:
        return "it adds a positional embedding inside the block"
    if m.only_cross_attention or m.double_self_attention:
        return "only_cross_attention / double_self_attention blocks are not handled"
    why = _why_not_plain_layer_norm(norms[0]) or _why_not_plain_layer_norm(norms[1])
    return why or _Swap("forward", _method(_diffusers_block_forward),
                        f"{type(m).__name__}.forward ({m.norm_type}) -> modulate / gated-residual kernels")


def _dit_block(path, m):
    if not all(hasattr(m, a) for a in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation")) or \
            len(_forward_args(m)) != 2:
        return None
    why = _why_not_plain_layer_norm(m.norm1) or _why_not_plain_layer_norm(m.norm2)
    why = why or _why_not_adaln(m.adaLN_modulation, 6, m.norm1.normalized_shape[0])
    return why or _Swap("forward", _method(_dit_block_forward),
                        f"{type(m).__name__}.forward (adaLN-Zero) -> modulate / gated-residual kernels")


def _dit_final_layer(path, m):
    if not all(hasattr(m, a) for a in ("norm_final", "linear", "adaLN_modulation")) or len(_forward_args(m)) != 2:
        return None
    why = _why_not_plain_layer_norm(m.norm_final)
    why = why or _why_not_adaln(m.adaLN_modulation, 2, m.norm_final.normalized_shape[0])
    return why or _Swap("forward", _method(_dit_final_layer_forward),
                        f"{type(m).__name__}.forward (adaLN-Zero) -> modulate kernel")


def _diffusers_cross_attention(path, m):
    if not (getattr(m, "is_cross_attention", False) is True and hasattr(m, "processor") and hasattr(m, "to_q")):
        return None
    name = type(m.processor).__name__
    if name not in ("AttnProcessor2_0", "AttnProcessor"):
        return f"its processor {name} is not diffusers' default AttnProcessor2_0 / AttnProcessor; left in place"
    extras = [a for a in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross", "added_kv_proj_dim")
              if getattr(m, a, None) is not None]
    if extras or m.residual_connection or m.rescale_output_factor != 1.0:
        return f"it uses {extras or 'a residual connection / output rescaling'}, which the kernel path does not"
    head_dim = m.to_q.out_features // m.heads
    if m.to_k.out_features != m.to_q.out_features or not math.isclose(m.scale, head_dim**-0.5):
        return "its keys have other heads than its queries, or its softmax scale is not 1/sqrt(head dim)"
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim}: the kernel takes multiples of 8 up to {MAX_HEAD_DIM}"
    return _Swap("processor", lambda module, backend: CrossAttnProcessor(module.processor, backend),
                 f"{name} -> cross-attention kernel (processor)")


def _patch_embedding(path, m):
    if not (isinstance(m, nn.Conv2d) and path.rpartition(".")[2] == "proj"):
        return None
    if type(m).forward is not nn.Conv2d.forward:
        return f"{type(m).__name__} overrides Conv2d.forward"
    p = m.kernel_size[0]
    if m.kernel_size != (p, p) or m.stride != m.kernel_size or m.padding not in ((0, 0), "valid") or \
            m.dilation != (1, 1) or m.groups != 1:
        return (f"Conv2d(kernel_size={m.kernel_size}, stride={m.stride}, padding={m.padding}, dilation={m.dilation}, "
                f"groups={m.groups}) is not a patch embedding (square kernel == stride, no padding)")
    return _Swap("forward", _method(_patch_conv_forward), f"Conv2d.forward (patch {p}) -> patchify kernel + matmul")


# (flag of patch(), what is looked for, rule), in the order they are tried on each module.
RULES = (
    ("modulate", "diffusers BasicTransformerBlock (norm1, attn1, attn2, ff, norm_type, ...; its forward "
                 "signature) with norm_type 'ada_norm_single' (PixArt) or 'ada_norm_zero' (DiT)", _diffusers_block),
    ("modulate", "DiT block (norm1, attn, norm2, mlp, adaLN_modulation -> 6 * D; forward(x, c))", _dit_block),
    ("modulate", "DiT final layer (norm_final, linear, adaLN_modulation -> 2 * D; forward(x, c))", _dit_final_layer),
    ("cross_attention", "diffusers Attention doing cross-attention (is_cross_attention, to_q/to_k/to_v/to_out, "
                        "processor)", _diffusers_cross_attention),
    ("patchify", "patch embedding: a Conv2d named proj with kernel_size == stride", _patch_embedding),
)


# ----------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return root == "" or path.startswith(root + ".")


def patch(model: nn.Module, modulate: bool = True, cross_attention: bool = True, patchify: bool = True,
          backend: str = "auto") -> PatchReport:
    """Swap the fused kernels into `model` in place and return what was swapped (see the module docstring).

    modulate / cross_attention / patchify: which kinds of module to look for. backend: "auto" (Triton on CUDA
    tensors, the PyTorch reference on CPU), "triton" or "torch", passed to every kernel call. Parameters, buffers
    and their names are unchanged. pixart_fast's own modules (CHOOSE_THEIR_KERNELS) choose their kernels
    themselves and are left alone. Raises ValueError when nothing can be swapped, listing what was
    looked for and what was recognised but left alone, and when the model is already patched.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if ATTR in model.__dict__:
        raise ValueError(f"{type(model).__name__} is already patched (model.{ATTR}); call unpatch(model) first")
    wanted = {"modulate": modulate, "cross_attention": cross_attention, "patchify": patchify}
    if not any(wanted.values()):
        raise ValueError("modulate, cross_attention and patchify are all False: there is nothing to look for")
    report, swaps, own = PatchReport(backend), [], []
    for path, m in model.named_modules():
        if any(_inside(path, root) for root in own):
            continue
        if isinstance(m, CHOOSE_THEIR_KERNELS):
            own.append(path)
            report.skipped.append((path, f"pixart_fast's {type(m).__name__} chooses its kernels itself "
                                         f"(kernels={m.kernels!r})"))
            continue
        for flag, _, rule in RULES:
            found = rule(path, m) if wanted[flag] else None
            if found is None:
                continue
            if isinstance(found, _Swap) and found.attr == "forward" and "forward" in m.__dict__:
                found = "its forward is already replaced on the instance (another patch or a hook)"
            if isinstance(found, str):
                report.skipped.append((path, found))
            else:
                swaps.append((path, m, found))
            break  # one rule per module
    if not swaps:
        looked_for = "\n".join(f"  [{flag}] {what}" for flag, what, _ in RULES if wanted[flag])
        left = "".join(f"\n  {path or '<model>'}: {why}" for path, why in report.skipped)
        raise ValueError(f"found nothing to patch in {type(model).__name__}. Looked for, by structure:\n{looked_for}"
                         + (f"\nRecognised but left as they are:{left}" if left else "")
                         + "\nCall the functions of pixart_fast.kernels directly where your model computes these "
                           "inline.")
    for path, m, swap in swaps:
        report.originals.append((m, swap.attr, m.__dict__.get(swap.attr)))  # None: the class's own (forward)
        setattr(m, swap.attr, swap.make(m, backend))
        report.swapped.append((path, swap.what))
    setattr(model, ATTR, report)
    return report


def unpatch(model: nn.Module) -> None:
    """Undo patch(model) exactly: every swapped forward / processor back to what it was, model.pixart_fast_patch
    removed. Raises ValueError if the model is not patched."""
    report = model.__dict__.get(ATTR)
    if report is None:
        raise ValueError(f"{type(model).__name__} is not patched (it has no {ATTR}); there is nothing to undo")
    for module, attr, original in reversed(report.originals):
        if original is None:
            delattr(module, attr)  # the instance attribute goes; the class's method shows through again
        else:
            setattr(module, attr, original)
    delattr(model, ATTR)
