"""The three training stages of PixArt-alpha as typed configs (paper section 2.1, docs/ARCHITECTURE.md section 2).

Stage 1 learns pixel dependency (a class-conditional DiT), stage 2 text-image alignment (captions), stage 3
aesthetics (cleaner, larger, multi-aspect images with micro-conditions). The defaults are sized for the embedded
dataset on a 2-core CPU (about 5 minutes a stage); the paper's schedule (Table 4: steps, batch, resolution per stage)
is `pixart_fast.plan.PAPER_SCHEDULE`, and its optimizer settings are in the fields' help ("paper: ..."). Every
field can be overridden from the command line.
"""
from dataclasses import dataclass, field

from pixart_fast.lora import DEFAULT_ALPHA, DEFAULT_TARGETS


def _field(default, help: str):
    """A config field whose help text the command line shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    stage: int = _field(2, "1 pixel dependency (class-conditional DiT), 2 text-image alignment, 3 aesthetics")
    model: str = _field("PixArt-pixel-32", "a model config name from pixart_fast.model.CONFIGS")
    steps: int = _field(1200, "total optimizer steps of the run (a resumed run continues up to this total)")
    batch_size: int = _field(24, "images per optimizer step")
    lr: float = _field(1e-3, "peak AdamW learning rate, reached after --warmup steps, then held (paper: 2e-5)")
    weight_decay: float = _field(0.03, "AdamW weight decay")
    adam_eps: float = _field(1e-10, "AdamW epsilon")
    warmup: int = _field(20, "linear learning-rate warm-up, in steps (paper: 1000)")
    grad_clip: float = _field(1.0, "max global gradient norm (paper: 0.01 at lr 2e-5)")
    ema_decay: float = _field(0.9999, "EMA decay of the weights; step s uses min(decay, (1 + s) / (10 + s))")
    caption_dropout: float = _field(0.1, "probability that a caption (stage 1: a class) is replaced by the null one")
    precision: str = _field("auto", "auto (bf16 on CUDA, fp32 on a CPU), fp32, bf16 or fp16 autocast (fp16 adds a "
                                     "gradient scaler); on CUDA, fp32 matmuls use TF32")
    compile: bool = _field(False, "torch.compile the model (one graph, the Triton kernels included)")
    recompute: str = _field("none", "what the backward pass recomputes to save activation memory: none, selective "
                                    "(each block's pointwise work; its matmul and attention outputs are kept) or "
                                    "full (whole blocks; paper: full)")
    fsdp: bool = _field(False, "under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP")
    kernels: str = _field("auto", "auto (Triton on CUDA, PyTorch on CPU), triton or torch; stage 1's DiT runs its patchify "
                                  "/ unpatchify on them, its blocks stay PyTorch")
    seed: int = _field(0, "seed of the initial weights, the data order, noise, timesteps and caption dropout")
    out: str = _field("runs", "output root; this stage writes <out>/stage<N>/")
    resume: str | None = _field(None, "'latest' or a checkpoint folder of this run to continue from")
    init: str | None = _field(None, "weights to start from: a DiT or PixArt checkpoint (official .pth, diffusers "
                                    "folder, ours); default: the previous stage's newest EMA weights under --out")
    data: str | None = _field(None, "a folder of extracted features; default: the embedded procedural dataset")
    t5: str | None = _field(None, "a local T5 encoder folder; default: the embedded tiny T5 with a byte tokenizer")
    log_every: int = _field(10, "steps between metrics.jsonl lines")
    save_every: int = _field(100, "steps between checkpoints (one is always written at the end)")
    keep: int = _field(0, "checkpoints to keep, the newest; older ones are deleted (0: keep all)")
    max_bad_steps: int = _field(10, "consecutive steps with a non-finite loss or gradient norm (each skipped: no "
                                    "optimizer or EMA update) after which the run stops; 0: never stop")
    sample_every: int = _field(0, "steps between validation sample grids (0: only at the end)")
    sample_steps: int = _field(20, "DPM-Solver++ steps for validation samples")
    cfg_scale: float = _field(4.5, "classifier-free guidance scale for validation samples")
    num_val: int = _field(56, "held-out captions (stage 1: class samples) to sample and score; 56 captions hold "
                              "about 110 objects, so one object is under 1 % of a score")
    prediction: str = _field("eps", "what the model predicts: eps (PixArt) or v (v-prediction; the samplers convert)")
    min_snr_gamma: float = _field(0.0, "min-SNR-gamma loss weighting (Hang et al. 2023; 5 is theirs); 0: unweighted")
    min_snr_plus_one: bool = _field(False, "with --prediction v: weight min(SNR + 1, gamma) / (SNR + 1) (diffusers' "
                                           "form), which keeps the noisiest steps' weight at 1")
    tokenizer: str = _field("byte", "the embedded T5's tokenizer: byte (ByT5's) or word (the captions' closed "
                                    "vocabulary, one token a word)")
    t5_locality: float = _field(0.0, "the embedded T5's attention bias: 0 random (as its other weights); > 0 falls by "
                                     "this much per token of distance, so a word's features carry its own phrase "
                                     "(binds a colour to its region)")
    optimizer: str = _field("adamw", "adamw (torch's, fused) or came (PixArt-Sigma's CAME: factored second moments, "
                                     "about half AdamW's optimizer-state memory; its betas and eps as Sigma's configs)")
    lora_rank: int = _field(0, "LoRA rank: PEFT adapters on the frozen base weights, and only the adapters are "
                               "trained, averaged and saved; 0: train every weight (official PixArt LoRA guide: 16)")
    lora_alpha: float = _field(DEFAULT_ALPHA, "LoRA alpha: the adapters' output is scaled by alpha / rank; 8 is "
                                              "PEFT's and the official PixArt LoRA script's")
    lora_targets: str = _field(DEFAULT_TARGETS, "the Linear layers LoRA adapts: groups attn (self-attention), cross "
                                                "(cross-attention), mlp, embed (timestep, caption and size embedders, "
                                                "t_block, final layer), or module-name suffixes such as attn.qkv, "
                                                "comma-separated")


# About 5 minutes each on 2 CPU cores: stage 1 180-230 images/s, stage 2 141-152 with 32-token captions (2026-12-02,
# Intel Xeon, 2 threads; the time-to-quality bench), stage 3 about 35 (2026-11-22; four times the tokens and
# 120-token captions then). Stage 2: lr 2e-3 (warm-up 50)
# learned placement faster than 1e-3 and 4e-3 at the same steps, and 32-token captions (model.CONFIGS) pay for
# 1600 steps in the same time (docs/time-to-quality-log.md).
# The embedded stages predict v with min-SNR-5 weighting: the eps objective gives the noisy steps, where the
# caption decides the layout, almost no weight in image space, and the samples start from garbage (README,
# "Time to quality"). From stage 2 on, diffusers' "+1" form (weight 1 at the noisiest steps), a word-level
# tokenizer for the embedded T5 (bytes make the cross-attention decode spelling before meaning) and a T5 attention
# bias that falls with distance (t5_locality 0.5: a random one leaves colour and region unbound in 2- and
# 3-object captions; position 0.39 -> 0.50 at step 800 from scratch, docs/time-to-quality-log.md).
_EMBEDDED = dict(prediction="v", min_snr_gamma=5.0)
_EMBEDDED_TEXT = dict(_EMBEDDED, min_snr_plus_one=True, tokenizer="word", t5_locality=0.5)
RECIPES = {
    1: TrainConfig(stage=1, steps=2000, batch_size=24, save_every=500, sample_every=500, num_val=100, **_EMBEDDED),
    2: TrainConfig(stage=2, steps=1600, batch_size=24, lr=2e-3, warmup=50, save_every=400, sample_every=400,
                   **_EMBEDDED_TEXT),
    3: TrainConfig(stage=3, model="PixArtMS-pixel-64", steps=1000, batch_size=8, lr=5e-4, save_every=250,
                   sample_every=250, **_EMBEDDED_TEXT),
}
