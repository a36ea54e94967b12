"""The three training stages of PixArt-alpha as typed configs (paper section 2.1, docs/ARCHITECTURE.md section 2).

Stage 1 learns pixel dependency (a class-conditional DiT), stage 2 text-image alignment (captions), stage 3
aesthetics (cleaner, larger, multi-aspect images with micro-conditions). The defaults are sized for the embedded
dataset on a 2-core CPU (about 5 minutes a stage); the paper's schedule (Table 4: steps, batch, resolution per stage)
is `pixart_fast.plan.PAPER_SCHEDULE`, and its optimizer settings are in the fields' help ("paper: ..."). Every
field can be overridden from the command line.
"""
import math
import os
from dataclasses import dataclass, field, fields

from pixart_fast.cli import UserError
from pixart_fast.data import MAX_OBJECTS, OBJECTS
from pixart_fast.lora import DEFAULT_ALPHA, DEFAULT_TARGETS
from pixart_fast.memory import OPTIMIZERS
from pixart_fast.model import CONFIGS

INF = math.inf


def _field(default, help: str, choices: tuple | None = None, low: float | None = None, high: float = INF,
           open_low: bool = False):
    """A config field: the help text the command line shows, and what values it takes (one of `choices`, or a
    number in [low, high]; (low, high] with open_low), checked by TrainConfig.__post_init__."""
    return field(default=default, metadata={"help": help, "choices": choices, "range": (low, high, open_low)})


@dataclass(frozen=True)
class TrainConfig:
    stage: int = _field(2, "1 pixel dependency (class-conditional DiT), 2 text-image alignment, 3 aesthetics",
                        choices=(1, 2, 3))
    model: str = _field("PixArt-pixel-32", "a model config name from pixart_fast.model.CONFIGS",
                        choices=tuple(CONFIGS))
    steps: int = _field(1200, "total optimizer steps of the run (a resumed run continues up to this total)", low=1)
    batch_size: int = _field(24, "images per optimizer step (under torchrun: a multiple of the processes)", low=1)
    lr: float = _field(1e-3, "peak AdamW learning rate, reached after --warmup steps, then held (paper: 2e-5)",
                       low=0, open_low=True)
    weight_decay: float = _field(0.03, "AdamW weight decay", low=0)
    adam_eps: float = _field(1e-10, "AdamW epsilon", low=0, open_low=True)
    warmup: int = _field(20, "linear learning-rate warm-up, in steps (paper: 1000)", low=0)
    lr_decay: float = _field(0.0, "the last this fraction of the run's steps (--steps) take the learning rate "
                                  "linearly down to 0 (warm-up, hold, decay); 0: held to the end (paper)",
                             low=0, high=1)
    grad_clip: float = _field(1.0, "max global gradient norm (paper: 0.01 at lr 2e-5)", low=0, open_low=True)
    ema_decay: float = _field(0.9999, "EMA decay of the weights; step s uses min(decay, (1 + s) / (10 + s))",
                              low=0, high=1)
    caption_dropout: float = _field(0.1, "probability that a caption (stage 1: a class) is replaced by the null one",
                                    low=0, high=1)
    precision: str = _field("auto", "auto (bf16 on CUDA, fp32 on a CPU), fp32, bf16 or fp16 autocast (fp16 adds a "
                                     "gradient scaler); on CUDA, fp32 matmuls use TF32",
                            choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = _field(False, "torch.compile the model (one graph, the Triton kernels included)")
    recompute: str = _field("none", "what the backward pass recomputes to save activation memory: none, selective "
                                    "(each block's pointwise work; its matmul and attention outputs are kept) or "
                                    "full (whole blocks; paper: full)", choices=("none", "selective", "full"))
    fsdp: bool = _field(False, "under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP")
    kernels: str = _field("auto", "auto (Triton on CUDA, PyTorch on CPU), triton or torch; stage 1's DiT runs its patchify "
                                  "/ unpatchify on them, its blocks stay PyTorch", choices=("auto", "triton", "torch"))
    scene_objects: str = _field(",".join(map(str, OBJECTS)),
                                "embedded stages 2 and 3: the object counts of the training scenes, one drawn "
                                "uniformly per scene from this comma-separated list (repeat a count to draw it more "
                                "often: 1,3,4,4 draws half the scenes with 4 objects); the held-out scenes, which are "
                                "scored, hold 1-3. Counts over 3 need --tokenizer word (a 4-object caption is up to "
                                "32 word tokens)")
    stage1_scenes: bool = _field(False, "stage 1 on the embedded data: stage 2's scenes (1-3 objects of stage-2 sizes, "
                                        "each in a cell of a 3x3 grid), the class naming the first and the others "
                                        "distractors; off: one large object anywhere (the paper's ImageNet stage in "
                                        "miniature)")
    seed: int = _field(0, "seed of the initial weights, the data order, noise, timesteps and caption dropout", low=0)
    out: str = _field("runs", "output root; this stage writes <out>/stage<N>/")
    resume: str | None = _field(None, "'latest' or a checkpoint folder of this run to continue from")
    init: str | None = _field(None, "weights to start from: a DiT or PixArt checkpoint (official .pth, diffusers "
                                    "folder, ours); default: the previous stage's newest EMA weights under --out")
    data: str | None = _field(None, "extracted features: a folder (feature chunks or WebDataset shards) or the URL of "
                                    "shards (http(s)://, gs://, or pipe:COMMAND with {name}; docs/shards.md); "
                                    "default: the embedded procedural dataset")
    data_cache: str | None = _field(None, "where shards of a remote --data are downloaded; default: "
                                          "~/.cache/pixart_fast/shards/<hash of --data>")
    t5: str | None = _field(None, "a local T5 encoder folder; default: the embedded tiny T5")
    log_every: int = _field(10, "steps between metrics.jsonl lines", low=1)
    report_to: str = _field("none", "where else the metrics, validation scores and sample grids go (rank 0): "
                                    "tensorboard (<out>/stage<N>/tensorboard/) or wandb (Weights & Biases: online "
                                    "when WANDB_MODE says so or wandb finds a login and its server answers, else "
                                    "offline in <out>/stage<N>/wandb/, for `wandb sync`); a resumed run continues "
                                    "the same curves. Needs pip install 'pixart_fast[track]'",
                            choices=("none", "tensorboard", "wandb"))
    save_every: int = _field(100, "steps between checkpoints (one is always written at the end)", low=1)
    keep: int = _field(0, "checkpoints to keep, the newest; older ones are deleted (0: keep all)", low=0)
    max_bad_steps: int = _field(10, "consecutive steps with a non-finite loss or gradient norm (each skipped: no "
                                    "optimizer or EMA update) after which the run stops; 0: never stop", low=0)
    sample_every: int = _field(0, "steps between validation sample grids (0: only at the end)", low=0)
    sample_steps: int = _field(20, "sampler steps for validation samples (DPM-Solver++; --prediction flow: Euler)",
                               low=1)
    cfg_scale: float = _field(4.5, "classifier-free guidance scale for validation samples", low=0)
    guide_step: int = _field(0, "validation samples after this step are autoguided (Karras et al. 2024): moved away "
                                "from what this run's EMA checkpoint of this step predicts, by --guide-weight x "
                                "(model - that checkpoint), on top of classifier-free guidance; a --save-every step "
                                "(the checkpoint is kept past --keep); embedded stages 2 and 3 (docs/experiments.md: "
                                "measured with --cfg-scale 2.5, the first checkpoint as the guide); 0: off", low=0)
    guide_weight: float = _field(1.0, "with --guide-step: autoguidance's weight", low=0)
    num_val: int = _field(56, "held-out captions (stage 1: class samples) to sample and score; 56 captions hold "
                              "about 110 objects, so one object is under 1 % of a score", low=1)
    prediction: str = _field("eps", "what the model predicts: eps (PixArt), v (v-prediction; the samplers convert) "
                                    "or flow (rectified flow, SD3's objective: x_s = (1 - s) x0 + s noise for s in "
                                    "[0, 1], the model predicts the velocity noise - x0 at timestep s * 1000; MSE "
                                    "loss, a learned variance is ignored; sampled with Euler)",
                             choices=("eps", "v", "flow"))
    timestep_sampling: str = _field("uniform", "the density of the training noise level s = timestep / 1000: uniform "
                                               "on [0, 1) or logit-normal (s = sigmoid(n), n ~ N(--logit-mean, "
                                               "--logit-std^2); SD3's), which draws the middle noise levels more often",
                                    choices=("uniform", "logit-normal"))
    logit_mean: float = _field(0.0, "mean of the logit-normal timestep density, in logit units (SD3: 0)", low=-INF)
    logit_std: float = _field(1.0, "standard deviation of the logit-normal timestep density, in logit units (SD3: 1)",
                              low=0, open_low=True)
    min_snr_gamma: float = _field(0.0, "min-SNR-gamma loss weighting (Hang et al. 2023; 5 is theirs); 0: unweighted",
                                  low=0)
    min_snr_plus_one: bool = _field(False, "with --prediction v: weight min(SNR + 1, gamma) / (SNR + 1) (diffusers' "
                                           "form), which keeps the noisiest steps' weight at 1")
    input_perturbation: float = _field(0.0, "input perturbation (Ning et al. 2023; diffusers' --input_perturbation): "
                                            "the noisy input is made with the noise plus this times a second draw, "
                                            "the target from the noise alone, so training meets inputs a little off "
                                            "what the forward process gives, as sampling does (paper: 0.1); 0: off",
                                       low=0)
    tokenizer: str = _field("byte", "the embedded T5's tokenizer: byte (ByT5's) or word (the captions' closed "
                                    "vocabulary, one token a word)", choices=("byte", "word"))
    t5_locality: float = _field(0.0, "the embedded T5's attention bias: 0 random (as its other weights); > 0 falls by "
                                     "this much per token of distance, so a word's features carry its own phrase "
                                     "(binds a colour to its region)", low=0)
    t5_train_steps: int = _field(0, "the embedded T5 is first trained on caption text alone for this many steps (word "
                                    "tokens): each word learns its phrase's size, colour, shape and cell, as a T5 "
                                    "trained on language binds modifiers to their noun; no image is seen. 0: left "
                                    "untrained", low=0)
    optimizer: str = _field("adamw", "adamw (torch's, fused) or came (PixArt-Sigma's CAME: factored second moments, "
                                     "about half AdamW's optimizer-state memory; its betas and eps as Sigma's configs)",
                             choices=OPTIMIZERS)
    lora_rank: int = _field(0, "LoRA rank: PEFT adapters on the frozen base weights, and only the adapters are "
                               "trained, averaged and saved; 0: train every weight (official PixArt LoRA guide: 16)",
                           low=0)
    lora_alpha: float = _field(DEFAULT_ALPHA, "LoRA alpha: the adapters' output is scaled by alpha / rank; 8 is "
                                              "PEFT's and the official PixArt LoRA script's", low=0, open_low=True)
    lora_targets: str = _field(DEFAULT_TARGETS, "the Linear layers LoRA adapts: groups attn (self-attention), cross "
                                                "(cross-attention), mlp, embed (timestep, caption and size embedders, "
                                                "t_block, final layer), or module-name suffixes such as attn.qkv, "
                                                "comma-separated")
    mask_ratio: float = _field(0.0, "token masking (MaskDiT, MicroDiT; stages 2 and 3): this fraction of each image's "
                                    "patch tokens, drawn anew every step, is dropped after the patch embedding; the "
                                    "network runs on the rest and the loss reads only their patches; 0: off",
                               low=0, high=0.95)
    unmasked_steps: int = _field(0, "with --mask-ratio: the run's last this many steps train unmasked, so the model "
                                    "ends on what sampling runs (all tokens)", low=0)
    route_ratio: float = _field(0.0, "token routing (TREAD; stages 2 and 3): this fraction of the tokens, drawn anew "
                                     "every step, skips blocks --route-start to --route-end - 1 and rejoins unchanged "
                                     "after them; sampling runs every token through every block; 0: off",
                                low=0, high=0.95)
    route_start: int = _field(1, "with --route-ratio: the first block the skipping tokens skip (0-based)", low=0)
    route_end: int = _field(0, "with --route-ratio: the block after the last one skipped (0-based); 0: depth - 1, "
                               "so the last block sees every token (and, with --route-start 1, the first)", low=0)
    early_route_steps: int = _field(0, "a routing schedule: the run's first this many steps route "
                                       "--early-route-ratio of the tokens past blocks --early-route-start to "
                                       "--route-end - 1, the rest as --route-ratio and --route-start say (heavy "
                                       "routing while placement is learned, light once shapes are); 0: off", low=0)
    early_route_ratio: float = _field(0.9, "with --early-route-steps: the fraction of the tokens routed in those "
                                           "steps", low=0, high=0.95)
    early_route_start: int = _field(0, "with --early-route-steps: the first block skipped in those steps (0-based)",
                                    low=0)
    repa_depth: int = _field(0, "representation alignment (stages 2 and 3): the hidden states after this many blocks "
                                "(REPA's encoder depth: 8 of SiT-XL's 28) pass through a projector (REPA's MLP) and "
                                "are pulled toward --repa-target-depth's or --repa-encoder's by negative cosine "
                                "similarity, token by token (after a block that only the routed tokens ran, only "
                                "those); 0: off", low=0)
    repa_second_depth: int = _field(0, "with --repa-depth: also align the hidden states after this many blocks, "
                                       "through a second projector, to the same target (each alignment weighs "
                                       "--repa-weight); after a block that only the routed tokens ran, only those "
                                       "are aligned; 0: one depth", low=0)
    repa_target_depth: int = _field(0, "with --repa-depth, self-alignment (SRA; no encoder): the target is the EMA "
                                       "model's hidden states after this many blocks (deeper than --repa-depth), on "
                                       "the same noisy input, without gradients", low=0)
    repa_target_offset: int = _field(0, "with --repa-target-depth: the teacher sees the same image and noise draw "
                                        "at up to this many timesteps less noise (SRA: a fifth of the schedule), "
                                        "drawn uniformly per image, floored at timestep 0; 0: the student's own "
                                        "input", low=0, high=999)
    repa_encoder: str | None = _field(None, "with --repa-depth, REPA: a local DINOv2 folder (transformers) whose "
                                            "patch features of the clean image are the target (embedded data only: "
                                            "feature shards hold no images); `python -m pixart_fast.train.encoder` "
                                            "trains one on the embedded scenes")
    repa_truth: bool = _field(False, "with --repa-depth, alignment to the truth (embedded data only): the target "
                                     "is, per token, the one-hot shape, size and colour of each of its pixels as "
                                     "the renderer drew them (REPA against an encoder that knows every pixel; "
                                     "no encoder to train or run; real images carry no such truth)")
    repa_weight: float = _field(0.5, "with --repa-depth: the alignment loss's weight in the training loss (REPA: "
                                     "0.5)", low=0)
    repa_projector_dim: int = _field(0, "with --repa-depth: the projector's hidden width; 0: 2 x the model's hidden "
                                        "size (REPA's proportion: 2048 at SiT-XL's 1152)", low=0)
    repa_steps: int = _field(0, "with --repa-depth: align in the run's first this many steps only, then train on "
                                "the diffusion loss alone, without the target's forward (HASTE's termination, arXiv "
                                "2505.16792); 0: every step", low=0)
    disperse_weight: float = _field(0.0, "the dispersive loss's weight (arXiv 2506.09027: 0.5; no encoder, no target): "
                                         "it pushes the batch's images' hidden states after --disperse-depth blocks "
                                         "apart (under torchrun, each process's share of the batch); 0: off", low=0)
    disperse_depth: int = _field(0, "with --disperse-weight: the depth whose hidden states it disperses (every "
                                    "token's; inside a routed run, the skipping ones as they entered it)", low=0)
    disperse_distance: str = _field("l2", "with --disperse-weight: l2 (the paper's squared distance; the states' "
                                          "scale is free) or cosine (scale-free)", choices=("l2", "cosine"))

    def __post_init__(self):
        """Every rule a config must keep, checked here once, before a run writes anything: each field's choices
        and range, the combinations that cannot work, and (under torchrun, WORLD_SIZE set) a batch that splits
        evenly over the processes. UserError names the flag, the value and what it takes."""
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            flag = "--" + f.name.replace("_", "-")
            if value is None:
                continue
            if meta["choices"] is not None and value not in meta["choices"]:
                raise UserError(f"{flag} {value}: unknown {f.name.replace('_', ' ')}; choose one of "
                                f"{', '.join(map(str, meta['choices']))}")
            low, high, open_low = meta["range"]
            if low is None:
                continue
            if not math.isfinite(value):
                raise UserError(f"{flag} {value}: must be a finite number")
            if not (value > low if open_low else value >= low) or value > high:
                bound = f"> {low}" if open_low else f">= {low}"
                raise UserError(f"{flag} {value}: must be {bound}" + (f" and <= {high}" if high < INF else ""))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; a single process: 1
        if self.batch_size % world_size:
            raise UserError(f"--batch-size {self.batch_size} does not split over {world_size} processes: pass a "
                            f"multiple of {world_size}")
        if self.fsdp and self.precision == "fp16":
            raise UserError("--fsdp true with --precision fp16 is not supported (its gradient scaler does not "
                            "shard): use bf16")
        if self.fsdp and (self.lora_rank or self.optimizer == "came"):
            raise UserError("--fsdp true shards full training with AdamW; LoRA and CAME state are small or factored "
                            "per whole weight: run them without --fsdp (DDP)")
        if self.prediction == "flow" and self.min_snr_gamma > 0:
            raise UserError(f"--min-snr-gamma {self.min_snr_gamma} with --prediction flow: min-SNR weighting is for "
                            "eps and v; flow's loss is unweighted: pass --min-snr-gamma 0")
        if self.mask_ratio and self.model in CONFIGS and CONFIGS[self.model].pixel_decoder:
            raise UserError(f"--mask-ratio {self.mask_ratio} with --model {self.model}: its pixel decoder convolves "
                            "the whole image, which masking leaves out; route the tokens instead (--route-ratio)")
        if self.t5_train_steps and self.tokenizer != "word":
            raise UserError(f"--t5-train-steps {self.t5_train_steps} with --tokenizer {self.tokenizer}: the embedded "
                            "T5 learns its phrases from word tokens; pass --tokenizer word")
        self._check_scene_objects()
        if self.lora_rank and self.stage == 1:
            raise UserError("--lora-rank adapts a text-conditioned PixArt (stages 2 and 3); stage 1 trains a DiT "
                            "from scratch")
        self._check_alignment()
        self._check_dispersion()
        self._check_guide()

    @property
    def objects(self) -> tuple[int, ...]:
        """--scene-objects as the counts it lists (checked by __post_init__)."""
        return tuple(int(n) for n in self.scene_objects.split(","))

    def _check_scene_objects(self):
        """--scene-objects: counts of 1 to MAX_OBJECTS, on the embedded caption scenes, over 3 with word tokens."""
        words = self.scene_objects.split(",")
        if not all(w.strip().isdecimal() and 1 <= int(w) <= MAX_OBJECTS for w in words):
            raise UserError(f"--scene-objects {self.scene_objects}: pass object counts from 1 to {MAX_OBJECTS}, "
                            "comma-separated, e.g. 1,3,4,4")
        if self.objects == OBJECTS:
            return
        if self.stage == 1 or self.data is not None:
            raise UserError(f"--scene-objects {self.scene_objects}: it sets the embedded caption scenes of stages 2 "
                            "and 3 (no --data); stage 1 and extracted features have their own")
        if max(self.objects) > 3 and self.tokenizer != "word":
            raise UserError(f"--scene-objects {self.scene_objects} with --tokenizer {self.tokenizer}: captions of "
                            "more than 3 objects overflow 120 byte tokens; pass --tokenizer word")

    def aligns(self, step: int) -> bool:
        """Whether step `step` (0-based) trains with representation alignment: --repa-depth, within --repa-steps."""
        return bool(self.repa_depth) and (not self.repa_steps or step < self.repa_steps)

    def routing(self, step: int, depth: int) -> tuple[float, tuple[int, int]] | None:
        """Step `step`'s token routing on a model of `depth` blocks, (ratio, (start, end)): that fraction of the
        tokens skips blocks start .. end - 1. The first --early-route-steps steps take --early-route-ratio and
        --early-route-start, the others --route-ratio and --route-start; end is --route-end (0: depth - 1). None
        when no token is routed: ratio 0, or a model too shallow for the default end (fewer than start + 2 blocks:
        the stage-2 recipe's routing on a two-block model has no middle block)."""
        early = step < self.early_route_steps
        ratio, start = (self.early_route_ratio, self.early_route_start) if early else (self.route_ratio,
                                                                                      self.route_start)
        if not ratio:
            return None
        end = self.route_end or depth - 1
        if not self.route_end and end <= start:
            return None
        if not 0 <= start < end <= depth:
            flag = "--early-route-start" if early else "--route-start"
            raise UserError(f"{flag} {start} --route-end {self.route_end}: the routed blocks must be 0 <= start < "
                            f"end <= {depth} (the model's depth; --route-end 0 means {depth - 1}); pick this "
                            "model's blocks with --route-start and --route-end, or route none with --route-ratio 0")
        return ratio, (start, end)

    def _check_guide(self):
        """--guide-*: a checkpoint the run saves before its end, on the embedded text-to-image stages."""
        if not self.guide_step:
            if self.guide_weight != 1.0:
                raise UserError(f"--guide-weight {self.guide_weight}: it weighs validation's autoguidance; pass "
                                "--guide-step too")
            return
        if self.stage == 1 or self.data is not None or self.lora_rank:
            raise UserError(f"--guide-step {self.guide_step}: validation's autoguidance samples the embedded "
                            "text-to-image stages (2 and 3, no --data, no --lora-rank), whose samples are scored")
        if self.guide_step % self.save_every or self.guide_step >= self.steps:
            raise UserError(f"--guide-step {self.guide_step}: the guide is the run's checkpoint of that step, so it "
                            f"must be a multiple of --save-every {self.save_every} and below --steps {self.steps}")

    def _check_dispersion(self):
        """--disperse-*: a weight and a depth together, a depth the model has, stages 2 and 3, whole token grids
        and two images or more a process."""
        if bool(self.disperse_weight) != bool(self.disperse_depth):
            raise UserError(f"--disperse-weight {self.disperse_weight} --disperse-depth {self.disperse_depth}: the "
                            "dispersive loss takes both, a weight > 0 and the depth it disperses")
        if not self.disperse_depth:
            if self.disperse_distance != "l2":
                raise UserError(f"--disperse-distance {self.disperse_distance}: it shapes the dispersive loss; pass "
                                "--disperse-weight and --disperse-depth too")
            return
        per_process = self.batch_size // int(os.environ.get("WORLD_SIZE", "1"))
        if per_process < 2:
            raise UserError(f"--disperse-depth {self.disperse_depth} with {per_process} image a process: the "
                            "dispersive loss compares a process's images with each other; pass a larger "
                            "--batch-size")
        if self.mask_ratio:
            raise UserError(f"--disperse-depth {self.disperse_depth} with --mask-ratio {self.mask_ratio}: each image "
                            "keeps other tokens, so their states do not compare place by place; route the tokens "
                            "instead (--route-ratio)")
        if self.stage == 1:
            raise UserError(f"--disperse-depth {self.disperse_depth}: stage 1 trains a DiT from scratch; the "
                            "dispersive loss is for stages 2 and 3")
        if self.repa_depth:
            raise UserError(f"--disperse-depth {self.disperse_depth} with --repa-depth {self.repa_depth}: pass one "
                            "of the two")
        depth = CONFIGS[self.model].depth
        if self.disperse_depth > depth:
            raise UserError(f"--disperse-depth {self.disperse_depth}: {self.model} has {depth} blocks")

    def _check_alignment(self):
        """--repa-*: one target, blocks the model has, and the settings it works with."""
        targets = bool(self.repa_target_depth) + (self.repa_encoder is not None) + self.repa_truth
        if self.repa_target_offset and not self.repa_target_depth:
            raise UserError(f"--repa-target-offset {self.repa_target_offset}: it moves self-alignment's teacher; "
                            "pass --repa-target-depth too")
        if self.repa_second_depth and not self.repa_depth:
            raise UserError(f"--repa-second-depth {self.repa_second_depth}: a second aligned depth; pass --repa-depth "
                            "too")
        if self.repa_steps and not self.repa_depth:
            raise UserError(f"--repa-steps {self.repa_steps}: it ends representation alignment; pass --repa-depth too")
        if not self.repa_depth:
            if targets:
                raise UserError("--repa-target-depth, --repa-encoder and --repa-truth choose representation "
                                "alignment's target: pass --repa-depth too (the blocks whose hidden states are "
                                "aligned)")
            return
        if targets != 1:
            raise UserError(f"--repa-depth {self.repa_depth}: pass exactly one target, --repa-target-depth N "
                            "(self-alignment), --repa-encoder DINOV2_FOLDER (REPA) or --repa-truth true")
        depth = CONFIGS[self.model].depth
        if self.repa_target_depth and not self.repa_depth < self.repa_target_depth <= depth:
            raise UserError(f"--repa-depth {self.repa_depth} --repa-target-depth {self.repa_target_depth}: the target "
                            f"must be deeper, 1 <= depth < target depth <= {depth} ({self.model}'s blocks)")
        if self.repa_depth > depth:
            raise UserError(f"--repa-depth {self.repa_depth}: {self.model} has {depth} blocks")
        if self.repa_second_depth and self.repa_second_depth == self.repa_depth:
            raise UserError(f"--repa-second-depth {self.repa_second_depth}: --repa-depth aligns that depth already; "
                            "pass another")
        if self.repa_target_depth and self.repa_second_depth >= self.repa_target_depth:
            raise UserError(f"--repa-second-depth {self.repa_second_depth} --repa-target-depth "
                            f"{self.repa_target_depth}: the target must be deeper")
        if self.repa_second_depth > depth:
            raise UserError(f"--repa-second-depth {self.repa_second_depth}: {self.model} has {depth} blocks")
        if self.stage == 1:
            raise UserError("--repa-depth aligns PixArt's hidden states (stages 2 and 3), not stage 1's DiT")
        if self.lora_rank or self.fsdp:
            raise UserError("--repa-depth trains a projector beside the model: not supported with --lora-rank or "
                            "--fsdp true")
        if self.repa_encoder is not None and self.data is not None:
            raise UserError(f"--repa-encoder with --data {self.data}: the encoder needs the clean images, and feature "
                            "shards hold VAE latents; use --repa-target-depth (self-alignment) on --data")
        if self.repa_truth and self.data is not None:
            raise UserError(f"--repa-truth with --data {self.data}: the truth is the embedded scenes' (what the "
                            "renderer drew); feature shards have none; use --repa-target-depth (self-alignment)")


# Each stage is sized to about 5 minutes on 2 CPU cores (the time-to-quality bench measures the images/s). Stage 2:
# lr 2e-3 with a 50-step warm-up, 32-token captions (model.CONFIGS) and token routing, which pay for 3200 steps in
# that time (docs/time-to-quality-log.md has the runs behind each choice).
# The embedded stages predict v with min-SNR-5 weighting: the eps objective gives the noisy steps, where the
# caption decides the layout, almost no weight in image space, and the samples start from garbage. From stage 2
# on: diffusers' "+1" form (weight 1 at the noisiest steps), a word-level tokenizer for the embedded T5 (bytes make
# the cross-attention decode spelling before meaning) and a T5 attention bias that falls with distance
# (t5_locality 0.5: a random one leaves colour and region unbound in 2- and 3-object captions), then trained on
# caption text alone for 100 steps (t5_train_steps: each word learns its phrase's size, colour, shape and cell, as a
# trained T5 binds them; position 0.5 by step 800 instead of 1600, and more objects drawn right). Stage 2 routes
# 90 % of the tokens past blocks 1-3, so that only block 0 runs every token (TREAD; --route-ratio 0 turns it off),
# on the network with a pixel decoder (PixArt-pixel-32-pd): routing alone stalls shapes, since the routed blocks
# seldom see a token's neighbours, and the decoder's convolutions relate them again; and it takes the learning rate
# down to 0 over the second half of the steps. In five minutes this draws all four checks right for 15.9-19.5 % of
# the objects against 11.5-13.3 % for the same routing past blocks 0-2 with the rate held (three seeds). The
# routed blocks are sized for the embedded network (4 blocks), not measured on PixArt-XL/2.
_EMBEDDED = dict(prediction="v", min_snr_gamma=5.0)
_EMBEDDED_TEXT = dict(_EMBEDDED, min_snr_plus_one=True, tokenizer="word", t5_locality=0.5,
                      t5_train_steps=100)
RECIPES = {
    1: TrainConfig(stage=1, steps=2000, batch_size=24, save_every=500, sample_every=500, num_val=100, **_EMBEDDED),
    2: TrainConfig(stage=2, model="PixArt-pixel-32-pd", steps=3200, batch_size=24, lr=2e-3, warmup=50,
                   save_every=800, sample_every=800, route_ratio=0.9, route_start=1, route_end=4, lr_decay=0.5,
                   **_EMBEDDED_TEXT),
    3: TrainConfig(stage=3, model="PixArtMS-pixel-64", steps=1000, batch_size=8, lr=5e-4, save_every=250,
                   sample_every=250, **_EMBEDDED_TEXT),
}
