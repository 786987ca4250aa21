"""Configuration: one dataclass per component, presets, TOML files and `--section.key=value` overrides.

Each component receives only its own section (`LingModel(cfg.model)`, never the whole tree).
Resolution order: preset -> TOML file (`--config`) -> command-line overrides; then `validate()` checks
every section and raises `ConfigError` with one line naming the key and what is allowed.

    cfg = load_config(preset="tiny", overrides=["--model.hidden_size=256"])

Sections: [model], [data], [train], [fp8], [rl], [eval] and [parallel] (the ranks of a `torchrun` launch: `dp` and `ep`,
with dp * ep = the number of ranks, or pipeline parallel alone with `pp` ranks; see ParallelConfig).

Presets: `tiny` (the CPU default), `small` (hidden 512, for benchmarks), the exact released shapes
`ling-mini-2.0`, `ling-flash-2.0`, `ling-1t` (SPEC §1.1), and the Ring-linear hybrids (SPEC §8) `tiny-linear` (CPU),
`ring-mini-linear-2.0` and `ring-flash-linear-2.0`; the released shapes are built on the meta device.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from linglab.chat import MODES
from linglab.corpora import CORPORA
from linglab.datasets import FORMATS
from linglab.errors import LinglabError
from linglab.tasks import TIERS
from linglab.verify import VERIFIERS


class ConfigError(LinglabError):
    """A bad config key, type, range or combination."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key} {message}")


def _check_finite(name: str, section) -> None:
    """Every float of a section is finite: an inf or NaN learning rate (or any rate, scale or bound) passes the
    range checks below as often as not, then poisons the weights at the first step."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float):
            _check(math.isfinite(value), f"{name}.{f.name}", f"must be a finite number, got {value}")


def _index_runs(indices: list[int]) -> str:
    """[0, 1, 2, 3, 5, 9] -> "0-3, 5, 9": layer indices as a reader scans them."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


@dataclass
class ModelConfig:
    """BailingMoeV2 architecture (SPEC §1); field names are the HF config.json keys (SPEC §1.6)."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384  # dense SwiGLU FFN of the first_k_dense_replace layers
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    moe_intermediate_size: int = 64  # each routed expert, and the shared expert
    num_experts: int = 16
    num_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.5
    partial_rotary_factor: float = 0.5
    rope_theta: float = 600000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    use_qk_norm: bool = True
    num_nextn_predict_layers: int = 1  # MTP depth (SPEC §1.5): 0 or 1
    mtp_loss_scaling_factor: float = 0.1
    router_z_loss_coef: float = 0.0  # SPEC §1.4: optional, 3.5e-6 in the public CPT scripts
    initializer_range: float = 0.006
    pad_token_id: int = 1
    eos_token_id: int = 0
    # Ring-linear (SPEC §8): 0 = every layer softmax (BailingMoeV2); N = one softmax layer closing each group of N.
    # Last in the dataclass and written to config.json only for a hybrid, so BailingMoeV2 files stay as they were.
    layer_group_size: int = 0
    group_norm_size: int = 1  # groups of the linear layers' GroupRMSNorm over nh * head_dim
    linear_silu: bool = False  # SiLU on the linear layers' q, k, v before QK-norm

    @property
    def rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_linear(self) -> bool:
        """A Ring-linear hybrid (BailingMoeLinearV2, SPEC §8) rather than the all-softmax BailingMoeV2."""
        return self.layer_group_size > 0

    def layer_kind(self, i: int) -> str:
        """"softmax" or "linear" for layer i (SPEC §8): softmax closes each group of layer_group_size and fills a
        trailing partial group. Index num_hidden_layers (the MTP layer) always falls in that tail: softmax."""
        g = self.layer_group_size
        if g == 0 or (i + 1) % g == 0 or i >= (self.num_hidden_layers // g) * g:
            return "softmax"
        return "linear"

    def layer_name(self, i: int) -> str:
        """Layer i as a report names it: "layer 3", or in a hybrid with its attention kind, "linear layer 2"."""
        return f"{self.layer_kind(i)} layer {i}" if self.is_linear else f"layer {i}"

    def layer_layout(self) -> str:
        """The model in one line for reports: its family, which layers attend how and which FFN each has (SPEC §1, §8)."""
        layers = range(self.num_hidden_layers)
        if self.is_linear:
            family = f"BailingMoeLinearV2 (Ring-linear hybrid, one softmax layer per group of {self.layer_group_size})"
            attention = (f"linear attention at {_index_runs([i for i in layers if self.layer_kind(i) == 'linear'])}, "
                         f"softmax at {_index_runs([i for i in layers if self.layer_kind(i) == 'softmax'])}")
        else:
            family, attention = "BailingMoeV2", f"softmax attention at {_index_runs(list(layers))}"
        ffn = []
        if self.first_k_dense_replace:
            ffn.append(f"dense FFN at {_index_runs(list(layers)[:self.first_k_dense_replace])}")
        if self.first_k_dense_replace < self.num_hidden_layers:
            ffn.append(f"MoE at {_index_runs(list(layers)[self.first_k_dense_replace:])} ({self.num_experts} experts, "
                       f"{self.num_experts_per_tok} routed + {self.num_shared_experts} shared per token)")
        mtp = "; an MTP layer (softmax attention, MoE)" if self.num_nextn_predict_layers else ""
        return f"{family}: {self.num_hidden_layers} layers; {attention}; {', '.join(ffn)}{mtp}"

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "moe_intermediate_size",
                     "num_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
            _check(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.num_shared_experts >= 0, "model.num_shared_experts", "must be >= 0")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "model.num_attention_heads",
               f"({self.num_attention_heads}) must be divisible by num_key_value_heads ({self.num_key_value_heads})")
        _check(self.num_experts % self.n_group == 0, "model.num_experts",
               f"({self.num_experts}) must be divisible by n_group ({self.n_group})")
        per_group = self.num_experts // self.n_group
        _check(per_group >= 2, "model.n_group",
               f"({self.n_group}) leaves {per_group} expert(s) per group; group scores need >= 2")
        _check(self.topk_group <= self.n_group, "model.topk_group",
               f"({self.topk_group}) must be <= n_group ({self.n_group})")
        _check(self.num_experts_per_tok <= self.topk_group * per_group, "model.num_experts_per_tok",
               f"({self.num_experts_per_tok}) must be <= topk_group * experts per group ({self.topk_group * per_group})")
        _check(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "model.first_k_dense_replace",
               f"must be in [0, num_hidden_layers={self.num_hidden_layers}], got {self.first_k_dense_replace}")
        _check(0.0 < self.partial_rotary_factor <= 1.0, "model.partial_rotary_factor", "must be in (0, 1]")
        _check(self.rope_dim % 2 == 0 and self.rope_dim >= 2, "model.partial_rotary_factor",
               f"gives rope_dim={self.rope_dim}; it must be even and >= 2")
        _check(self.num_nextn_predict_layers in (0, 1), "model.num_nextn_predict_layers", "must be 0 or 1")
        _check(self.rms_norm_eps > 0, "model.rms_norm_eps", "must be > 0")
        _check(self.rope_theta > 0, "model.rope_theta", "must be > 0")
        _check(self.routed_scaling_factor > 0, "model.routed_scaling_factor", "must be > 0")
        _check(self.initializer_range > 0, "model.initializer_range", "must be > 0")
        _check(self.mtp_loss_scaling_factor >= 0, "model.mtp_loss_scaling_factor", "must be >= 0")
        _check(self.router_z_loss_coef >= 0, "model.router_z_loss_coef", "must be >= 0")
        for name in ("pad_token_id", "eos_token_id"):
            _check(0 <= getattr(self, name) < self.vocab_size, f"model.{name}", f"must be in [0, vocab_size={self.vocab_size})")
        _check(self.layer_group_size >= 0, "model.layer_group_size",
               f"must be >= 0 (0 = all softmax attention), got {self.layer_group_size}")
        _check(self.group_norm_size >= 1, "model.group_norm_size", f"must be >= 1, got {self.group_norm_size}")
        if self.is_linear:
            # SPEC §8: linear layers use head_dim = hidden / nh; one head width for both kinds keeps one RoPE table.
            _check(self.num_attention_heads * self.head_dim == self.hidden_size, "model.head_dim",
                   f"({self.head_dim}) x num_attention_heads ({self.num_attention_heads}) must equal hidden_size "
                   f"({self.hidden_size}) in a hybrid (layer_group_size > 0): linear layers use hidden / heads")
            width = self.num_attention_heads * self.head_dim
            _check(width % self.group_norm_size == 0, "model.group_norm_size",
                   f"({self.group_norm_size}) must divide num_attention_heads * head_dim ({width})")


MIN_SEQ_LEN = 8  # the shortest row of data.seq_len and rl.sft_seq_len, and of eval / scaling suggest --seq-len


@dataclass
class DataConfig:
    """Training data and tokenizer (issue: training). Empty `path` = the embedded arithmetic corpus."""

    path: str = ""  # .txt / .jsonl / .parquet file or directory of them; "" = linglab.tasks corpus
    corpus: str = ""  # a named real-text corpus instead (linglab.corpora: "stdlib" = the Python standard library)
    heldout_tokens: int = 65536  # corpus: held-out tokens scored at each evaluation (the first of its held-out files)
    tokenizer: str = ""  # tokenizer.json to load; "" = train a byte-level BPE on the training data
    vocab_size: int = 512  # for a trained tokenizer
    seq_len: int = 128
    num_documents: int = 40000  # size of the embedded corpus
    tiers: list[int] = field(default_factory=lambda: [0, 1, 1, 2, 2, 2])  # repeats weight a tier
    loss_on_prompt: bool = False  # embedded corpus: train on prompts too (default: answers only)
    seed: int = 0  # corpus generation

    def validate(self) -> None:
        _check(self.seq_len >= MIN_SEQ_LEN, "data.seq_len", f"must be >= {MIN_SEQ_LEN}, got {self.seq_len}")
        _check(self.vocab_size >= 258, "data.vocab_size", "must be >= 258 (256 bytes + eos + pad)")
        _check(self.num_documents >= 1, "data.num_documents", "must be >= 1")
        _check(self.corpus in ("", *CORPORA), "data.corpus", f"must be one of {', '.join(CORPORA)} (or empty), got "
               f"{self.corpus!r}")
        _check(not (self.corpus and self.path), "data.corpus", "and data.path are exclusive: give one")
        _check(self.heldout_tokens >= self.seq_len, "data.heldout_tokens", f"must be >= data.seq_len ({self.seq_len})")
        _check(len(self.tiers) >= 1 and all(t in range(len(TIERS)) for t in self.tiers), "data.tiers",
               f"must be a non-empty list of tiers 0..{len(TIERS) - 1}, got {self.tiers}")


@dataclass
class TrainConfig:
    """The pretraining loop (SPEC §2): AdamW, warmup then WSD or WSM, checkpoints, balancing."""

    max_steps: int = 600
    batch_size: int = 32  # sequences per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 50
    schedule: str = "wsd"  # "wsd": decay at the end; "wsm": constant LR, decay by merging checkpoints
    decay_frac: float = 0.3  # wsd: fraction of steps in the final linear decay to 0
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_update_rate: float = 1e-3  # u of the aux-loss-free balancing (SPEC §1.4)
    seed: int = 0
    ckpt_every: int = 100  # steps between checkpoints
    keep_last: int = 3  # checkpoints kept (the final one is always kept)
    eval_every: int = 200  # steps between held-out evaluations (0 = only at the end)
    eval_problems: int = 100  # held-out problems per tier for accuracy
    log_every: int = 10  # steps between progress-bar refreshes
    load_every: int = 50  # steps between expert-load snapshots in metrics.jsonl
    max_bad_steps: int = 5  # consecutive non-finite steps that stop the run
    num_samples: int = 12  # generated samples written at the end
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (cuda when one is visible): pretraining, SFT and RL
    precision: str = "fp32"  # pretraining compute: "fp32" | "bf16" (bf16 autocast on fp32 master weights, SPEC §3)
    recompute: str = "none"  # pretraining activation recompute (SPEC §7): "none" | "mtp" | "experts" | "full"
    compile: bool = False  # pretraining: torch.compile each decoder layer (inductor); same loss, checkpoints, resume

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "ckpt_every", "keep_last", "log_every",
                     "load_every", "max_bad_steps", "eval_problems"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.batch_size % self.grad_accum == 0, "train.batch_size",
               f"({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.schedule in ("wsd", "wsm"), "train.schedule", f"must be 'wsd' or 'wsm', got {self.schedule!r}")
        _check(0.0 <= self.decay_frac <= 1.0, "train.decay_frac", "must be in [0, 1]")
        _check(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "train.beta1/beta2", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.grad_clip > 0, "train.grad_clip", "must be > 0")
        _check(self.bias_update_rate >= 0, "train.bias_update_rate", "must be >= 0")
        _check(self.eval_every >= 0 and self.num_samples >= 0, "train.eval_every/num_samples", "must be >= 0")
        _check(self.device in ("cpu", "cuda", "auto") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
               "train.device", f"must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")
        _check(self.precision in ("fp32", "bf16"), "train.precision", f"must be 'fp32' or 'bf16', got {self.precision!r}")
        _check(self.recompute in ("none", "mtp", "experts", "full"), "train.recompute",
               f"must be 'none', 'mtp', 'experts' or 'full', got {self.recompute!r}")
        # torch 2.13's dynamo cannot trace the non-reentrant checkpoint recompute wraps a layer in.
        _check(not (self.compile and self.recompute != "none"), "train.compile",
               f"cannot be combined with train.recompute={self.recompute} yet (torch.compile does not trace the "
               "recomputed layers); choose one")


@dataclass
class FP8Config:
    """FP8 training (SPEC §3; issue: FP8). Off by default; the model's weights stay fp32 either way."""

    enabled: bool = False
    backend: str = "auto"  # "auto" | "emulate" (quantise -> dequantise -> fp32 GEMM) | "scaled_mm"
    recipe: str = "tilewise"  # "tilewise": Ling's 1x128 tiles / 128x128 weight blocks; "tensorwise": one scale each
    grad_blocks: bool = False  # activation gradients in 128x128 blocks instead of 1x128 tiles (SPEC §3 warning)
    pow2_scales: bool = False  # round every scale up to a power of two
    monitor_every: int = 50  # steps between safeguard-monitor samples (0 = off)
    underflow_warn: float = 0.01  # warn when a tensor's underflow fraction exceeds this
    distortion_warn: float = 0.99  # warn when a tensor's cosine similarity after quantisation falls below this

    def validate(self) -> None:
        _check(self.backend in ("auto", "emulate", "scaled_mm"), "fp8.backend",
               f"must be 'auto', 'emulate' or 'scaled_mm', got {self.backend!r}")
        _check(self.recipe in ("tilewise", "tensorwise"), "fp8.recipe",
               f"must be 'tilewise' or 'tensorwise', got {self.recipe!r}")
        _check(not (self.grad_blocks and self.recipe != "tilewise"), "fp8.grad_blocks", "needs fp8.recipe=tilewise")
        _check(self.monitor_every >= 0, "fp8.monitor_every", "must be >= 0")
        _check(0.0 <= self.underflow_warn <= 1.0, "fp8.underflow_warn", "must be in [0, 1]")
        _check(-1.0 <= self.distortion_warn <= 1.0, "fp8.distortion_warn", "must be in [-1, 1]")


@dataclass
class ParallelConfig:
    """How the ranks of a `torchrun` launch split the work (SPEC §7; issue 7); ignored by a single process.

    dp * ep must equal the number of ranks (torchrun's WORLD_SIZE). Every rank reads its own
    batch_size / (dp * ep) rows of each global batch: expert parallelism is carved out of data parallelism,
    so the ep ranks of a group route distinct tokens and trade them by all-to-all. The routed experts are
    sliced over the ep ranks of a group and FSDP2-sharded over the dp groups; everything else is FSDP2-sharded
    over all ranks. A single process (no torchrun) is dp = ep = 1.

    Pipeline parallel (pp > 1) runs alone for now: dp = ep = 1 and pp = the number of ranks. Every rank reads
    the whole global batch; the first stage consumes the inputs, the last the targets and loss mask. The
    pipeline splits the batch into `pp_microbatches` micro-batches (0 = train.grad_accum), so a run equals the
    single process with grad_accum = that number.
    """

    dp: int = 0  # data-parallel groups; 0 = all the ranks ep and pp leave (WORLD_SIZE / (ep * pp))
    ep: int = 1  # expert-parallel ranks per group; must divide model.num_experts
    pp: int = 1  # pipeline ranks (SPEC §7); > 1 needs dp = ep = 1 (dp x pp is not built yet)
    pp_virtual: int = 1  # virtual stages per pipeline rank: 1 -> 1F1B, > 1 -> interleaved 1F1B
    pp_microbatches: int = 0  # micro-batches per step in the pipeline; 0 = train.grad_accum; must divide batch_size
    pp_plan: str = "balanced"  # stage layout from analytic unit costs: "balanced" (planner) | "uniform" (layers by count)

    def validate(self) -> None:
        _check(self.dp >= 0, "parallel.dp", f"must be >= 0 (0 = WORLD_SIZE / (ep * pp)), got {self.dp}")
        _check(self.ep >= 1, "parallel.ep", f"must be >= 1, got {self.ep}")
        _check(self.pp >= 1, "parallel.pp", f"must be >= 1, got {self.pp}")
        _check(self.pp_virtual >= 1, "parallel.pp_virtual", f"must be >= 1, got {self.pp_virtual}")
        _check(self.pp_microbatches >= 0, "parallel.pp_microbatches",
               f"must be >= 0 (0 = train.grad_accum), got {self.pp_microbatches}")
        _check(self.pp_plan in ("balanced", "uniform"), "parallel.pp_plan",
               f"must be 'balanced' or 'uniform', got {self.pp_plan!r}")
        _check(self.pp == 1 or (self.dp <= 1 and self.ep == 1), "parallel.pp",
               f"({self.pp}) with dp={self.dp} x ep={self.ep}: pipeline parallel combined with data or expert "
               "parallel is not built yet; use pp alone (dp = ep = 1)")


DATA_FORMATS = FORMATS  # SPEC §10 row shapes
VERIFIER_KINDS = ("auto", *VERIFIERS)  # auto = math for MATH rows, else numeric (verify.default_verifier)
CHAT_MODES = MODES  # passed to the chat template; the Evo-CoT format term reads it (SPEC §5)


@dataclass
class PromptDataConfig:
    """A prompt set from files (SPEC §10), shared by [rl] and [eval]: where it is, its shape, how answers are checked
    and how prompts are rendered. `data = ""` is the embedded arithmetic tiers."""

    data: str = ""  # JSONL/Parquet file or directory of them ("" = the embedded tiers)
    data_format: str = "auto"  # auto | gsm8k | math | generic | chat (auto guesses from the first row's fields)
    prompt_field: str = ""  # field names overriding the shape's own ("" = the shape's)
    answer_field: str = ""
    solution_field: str = ""
    skip_bad_rows: bool = False  # skip malformed rows (counted in the report) instead of stopping at the first
    verifier: str = "auto"  # auto | numeric | math | choice | exact | code (Python answer + reference tests, sandboxed)
    mode: str = "instant"  # instant | thinking, for chat templates with a thinking switch
    system_prompt: str = ""  # a system message put before every prompt ("" = none)
    variants: str = ""  # ApexEval prompt variants, a JSONL file ("" = the defaults, see linglab.evals)

    def fields(self) -> dict[str, str]:
        """The field-name overrides given, for `datasets.read_examples(fields=...)`."""
        given = {"prompt": self.prompt_field, "answer": self.answer_field, "solution": self.solution_field}
        return {k: v for k, v in given.items() if v}

    def validate_data(self, section: str) -> None:
        _check(self.data_format in DATA_FORMATS, f"{section}.data_format",
               f"must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        _check(self.verifier in VERIFIER_KINDS, f"{section}.verifier",
               f"must be one of {', '.join(VERIFIER_KINDS)}, got {self.verifier!r}")
        _check(self.mode in CHAT_MODES, f"{section}.mode", f"must be one of {', '.join(CHAT_MODES)}, got {self.mode!r}")


RL_ALGOS = ("grpo", "dapo", "drgrpo", "gspo", "lpo")
RL_CORRECTIONS = ("none", "tis", "icepop")


@dataclass
class RLConfig(PromptDataConfig):
    """RL post-training (SPEC §5; issue 5): prompts (`PromptDataConfig`), rollouts, rewards, the policy loss and its
    mismatch correction."""

    eval_data: str = ""  # held-out prompt file ("" = a stable-hash split of rl.data, or the embedded held-out problems)
    heldout_percent: int = 10  # share of rl.data held out for evaluation when no rl.eval_data is given
    train_problems: int = 4096  # size of the embedded train prompt set (with rl.data = "")
    algo: str = "grpo"  # policy loss: "grpo" | "dapo" | "drgrpo" | "gspo" | "lpo"
    correction: str = "icepop"  # train-inference mismatch correction: "none" | "tis" | "icepop"
    icepop_alpha: float = 0.5  # IcePop keeps a token when alpha <= pi_train / pi_infer <= beta
    icepop_beta: float = 5.0
    tis_cap: float = 2.0  # TIS weight min(pi_train / pi_infer, C)
    rollout_engine: str = "static"  # static (generate's left-padded batch) | continuous (slots refilled as responses end)
    rollout_slots: int = 64  # the continuous engine's slots (sequences decoded side by side)
    rollout_precision: str = "fp8"  # rollout GEMMs: "fp32" (= trainer's) | "fp8" (E4M3 128x128-block weights, 1x128 activations)
    c3po: bool = False  # C3PO++ budget-controlled partial rollouts; false = generate every group to the end
    c3po_capacity: int = 128  # C3PO++ Omega: rollouts in flight in the pool (whole groups)
    c3po_budget: int = 2560  # C3PO++ Phi: response tokens of completed groups that end a step (~8 groups of 8)
    c3po_max_retention: int = 2  # C3PO++ sigma: carry-overs a rollout survives; one more purges its group
    group_size: int = 8  # G responses per prompt
    prompts_per_step: int = 8  # groups per step without C3PO++
    max_new_tokens: int = 64  # response length limit (the longest worked solution is ~55 tokens)
    temperature: float = 1.0  # rollout sampling temperature (SPEC §5 Ring-1T: 1.0)
    top_p: float = 1.0  # rollout nucleus sampling
    lr: float = 1e-4  # AdamW, constant; the rate of every experiment in docs/rl.md
    beta1: float = 0.9  # SPEC §5 Ring-1T: (0.9, 0.999)
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    steps: int = 40  # RL steps (one rollout batch each); the measured hard-tier gain of docs/rl.md
    ppo_epochs: int = 1  # gradient steps per rollout batch; 1 makes pi_old the rollout policy
    kl_coef: float = 0.0  # k3 KL to the policy at the start of RL (SPEC §5 Ring-1T: 0)
    grpo_eps: float = 0.2
    dapo_eps_low: float = 0.2
    dapo_eps_high: float = 0.28  # DAPO clip-higher
    dapo_overlong_cache: int = 0  # DAPO soft overlong penalty over the last this-many tokens (0 = off)
    drgrpo_eps: float = 0.2
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    lpo_eps: float = 0.03
    length_alpha: float = 0.0  # Evo-CoT length term weight (0 = off)
    format_reward: bool = False  # add the Evo-CoT format term (-0.5 unless one final `answer:` line)
    sft_steps: int = 0  # supervised steps on worked train-split solutions before RL (0 = none)
    sft_lr: float = 1e-4
    sft_batch_size: int = 16  # packed rows of sft_seq_len tokens
    sft_seq_len: int = 128
    tiers: list[int] = field(default_factory=lambda: [1, 2])  # embedded tiers to train on (rl.data = ""; repeats weight a tier)
    ckpt_every: int = 10  # steps between checkpoints
    keep_last: int = 3  # checkpoints kept
    seed: int = 0  # prompts, sampling and evaluation
    eval_problems: int = 32  # held-out problems per subset (tier) for the before/after evaluation (0 = skip it)
    eval_samples: int = 8  # samples per problem (n) for pass@k and ApexEval
    eval_ks: list[int] = field(default_factory=lambda: [1, 4, 8])  # k of pass@k; ApexEval uses the largest
    # DAPO dynamic sampling: rounds of new prompts that may replace the groups whose responses are all right or all
    # wrong (0 = drop them and train on fewer groups); synchronous rollouts only (C3PO++'s budget sizes its batch)
    dapo_max_rounds: int = 3
    reward_workers: int = 1  # verifier processes scoring a step's rollouts side by side (SPEC §9 parallel rewards)
    rollout_ranks: int = 0  # ranks that only generate, the last ones under torchrun (0 = every rank trains: colocated)
    max_staleness: int = 0  # with rollout_ranks: versions a trained token's policy may lag (0 = synchronous)

    def validate(self) -> None:
        self.validate_data("rl")
        _check(1 <= self.heldout_percent <= 99, "rl.heldout_percent", f"must be in [1, 99], got {self.heldout_percent}")
        _check(self.train_problems >= 1, "rl.train_problems", f"must be >= 1, got {self.train_problems}")
        _check(self.algo in RL_ALGOS, "rl.algo", f"must be one of {', '.join(RL_ALGOS)}, got {self.algo!r}")
        _check(self.correction in RL_CORRECTIONS, "rl.correction",
               f"must be one of {', '.join(RL_CORRECTIONS)}, got {self.correction!r}")
        _check(0 < self.icepop_alpha <= 1 <= self.icepop_beta, "rl.icepop_alpha/icepop_beta",
               "must satisfy 0 < alpha <= 1 <= beta")
        _check(self.tis_cap > 0, "rl.tis_cap", "must be > 0")
        _check(self.rollout_engine in ("static", "continuous"), "rl.rollout_engine",
               f"must be 'static' or 'continuous', got {self.rollout_engine!r}")
        _check(self.rollout_precision in ("fp32", "fp8"), "rl.rollout_precision",
               f"must be 'fp32' or 'fp8', got {self.rollout_precision!r}")
        for name in ("c3po_budget", "group_size", "prompts_per_step", "max_new_tokens", "steps",
                     "ppo_epochs", "sft_batch_size", "ckpt_every", "keep_last", "eval_samples", "reward_workers",
                     "rollout_slots"):
            _check(getattr(self, name) >= 1, f"rl.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.c3po_capacity >= self.group_size, "rl.c3po_capacity",
               f"({self.c3po_capacity}) must hold at least one group of group_size={self.group_size}")
        for name in ("c3po_max_retention", "dapo_overlong_cache", "sft_steps", "eval_problems", "rollout_ranks",
                     "max_staleness"):
            _check(getattr(self, name) >= 0, f"rl.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.dapo_overlong_cache <= self.max_new_tokens, "rl.dapo_overlong_cache", "must be <= max_new_tokens")
        _check(self.dapo_max_rounds >= 0, "rl.dapo_max_rounds", f"must be >= 0, got {self.dapo_max_rounds}")
        _check(self.max_staleness == 0 or self.rollout_ranks > 0, "rl.max_staleness",
               f"({self.max_staleness}) needs rl.rollout_ranks > 0: only rollout ranks generate ahead of the trainer")
        _check(not (self.c3po and self.algo == "dapo" and self.dapo_max_rounds > 0), "rl.dapo_max_rounds",
               f"({self.dapo_max_rounds}) must be 0 with rl.c3po: C3PO++'s token budget, not refill rounds, sizes its "
               "batch (DAPO then drops uniform groups without refilling)")
        _check(self.temperature > 0, "rl.temperature", "must be > 0 (RL needs sampled rollouts)")
        _check(0.0 < self.top_p <= 1.0, "rl.top_p", "must be in (0, 1]")
        _check(self.lr > 0 and self.sft_lr > 0, "rl.lr/sft_lr", "must be > 0")
        _check(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "rl.beta1/beta2", "must be in [0, 1)")
        _check(self.weight_decay >= 0 and self.kl_coef >= 0 and self.length_alpha >= 0,
               "rl.weight_decay/kl_coef/length_alpha", "must be >= 0")
        _check(self.grad_clip > 0, "rl.grad_clip", "must be > 0")
        for name in ("grpo_eps", "dapo_eps_low", "dapo_eps_high", "drgrpo_eps", "gspo_eps_low", "gspo_eps_high",
                     "lpo_eps"):
            _check(0 < getattr(self, name) < 1, f"rl.{name}", f"must be in (0, 1), got {getattr(self, name)}")
        _check(self.sft_seq_len >= MIN_SEQ_LEN, "rl.sft_seq_len", f"must be >= {MIN_SEQ_LEN}, got {self.sft_seq_len}")
        _check(len(self.tiers) >= 1 and all(t in range(len(TIERS)) for t in self.tiers), "rl.tiers",
               f"must be a non-empty list of tiers 0..{len(TIERS) - 1}, got {self.tiers}")
        _check(len(self.eval_ks) >= 1 and all(1 <= k <= self.eval_samples for k in self.eval_ks), "rl.eval_ks",
               f"must be a non-empty list of k in [1, eval_samples={self.eval_samples}], got {self.eval_ks}")


@dataclass
class EvalConfig(PromptDataConfig):
    """`linglab eval --data FILE` (SPEC §6): greedy accuracy, unbiased pass@k and ApexEval of checkpoints on a prompt
    file, every row of which is a test question (no split)."""

    problems: int = 0  # questions per subset, the first ones in file order (0 = all)
    samples: int = 8  # samples per question (n) for pass@k and ApexEval
    ks: list[int] = field(default_factory=lambda: [1, 4, 8])  # k of pass@k; ApexEval uses the largest
    temperature: float = 1.0  # sampling temperature of pass@k and ApexEval (greedy accuracy uses 0)
    max_new_tokens: int = 256  # completion length limit
    seed: int = 0

    def validate(self) -> None:
        self.validate_data("eval")
        for name in ("samples", "max_new_tokens"):
            _check(getattr(self, name) >= 1, f"eval.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.problems >= 0, "eval.problems", f"must be >= 0, got {self.problems}")
        _check(self.temperature > 0, "eval.temperature", "must be > 0 (pass@k needs sampled completions)")
        _check(len(self.ks) >= 1 and all(1 <= k <= self.samples for k in self.ks), "eval.ks",
               f"must be a non-empty list of k in [1, samples={self.samples}], got {self.ks}")


@dataclass
class Config:
    """The whole tree; every component gets only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            _check_finite(f.name, getattr(self, f.name))
            getattr(self, f.name).validate()
        max_pos = self.model.max_position_embeddings
        for key, length in (("data.seq_len", self.data.seq_len), ("rl.sft_seq_len", self.rl.sft_seq_len)):
            _check(length <= max_pos, key, f"({length}) must be <= model.max_position_embeddings ({max_pos})")
        _check(self.rl.max_new_tokens < max_pos, "rl.max_new_tokens",
               f"({self.rl.max_new_tokens}) leaves no room for a prompt within model.max_position_embeddings ({max_pos})")
        _check(self.model.num_experts % self.parallel.ep == 0, "parallel.ep",
               f"({self.parallel.ep}) must divide model.num_experts ({self.model.num_experts}): each rank holds E / ep experts")
        par = self.parallel
        if par.pp > 1:
            micro = par.pp_microbatches or self.train.grad_accum
            _check(self.train.batch_size % micro == 0, "parallel.pp_microbatches",
                   f"({micro}) must divide train.batch_size ({self.train.batch_size})")
            if par.pp_virtual == 1:
                _check(micro >= par.pp, "parallel.pp_microbatches",
                       f"({micro}) must be >= pp ({par.pp}) for 1F1B")
            else:
                rounds = max(1, micro // par.pp)
                _check(micro % rounds == 0, "parallel.pp_microbatches",
                       f"({micro}) must be a multiple of its rounds max(1, micro-batches // pp) = {rounds} for interleaved 1F1B")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Shapes of the released family (SPEC §1.1); the common fields (256 experts, top-8, ...) are shared.
_LING_COMMON = dict(
    vocab_size=157184, num_experts=256, num_shared_experts=1, num_experts_per_tok=8, n_group=8,
    topk_group=4, routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=600000.0,
    max_position_embeddings=32768, head_dim=128, num_nextn_predict_layers=1,
    pad_token_id=156892, eos_token_id=156895,  # (open): SPEC gives no ids; any in-range id serves shapes and counts
)

PRESETS: dict[str, dict[str, dict]] = {
    # The CPU default: trains in minutes on 2 cores. Two departures from the released shapes, both
    # measured (docs/training.md): rope_theta 10000, the value SPEC §1.1 says the 4K stage may have used
    # (with 600000 only ~2 rotary frequencies resolve positions within 128 tokens: easy tier 19% -> 85%),
    # and RoPE on the whole 32-wide head instead of half of it, which doubles the positional part of
    # each attention logit under QK-norm (held-out loss 0.068 -> 0.023, hard tier 3% -> 39%).
    "tiny": {"model": dict(rope_theta=10000.0, partial_rotary_factor=1.0)},
    # For benchmarks: hidden 512, matmuls large enough to measure MFU on a CPU.
    "small": {"model": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, head_dim=64, moe_intermediate_size=512,
        num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1)},
    "ling-mini-2.0": {"model": dict(
        _LING_COMMON, num_hidden_layers=20, hidden_size=2048, num_attention_heads=16,
        num_key_value_heads=4, intermediate_size=5120, moe_intermediate_size=512, first_k_dense_replace=1)},
    "ling-flash-2.0": {"model": dict(
        _LING_COMMON, num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=9216, moe_intermediate_size=1024, first_k_dense_replace=1)},
    "ling-1t": {"model": dict(
        _LING_COMMON, num_hidden_layers=80, hidden_size=8192, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=18432, moe_intermediate_size=2048, first_k_dense_replace=4)},
    # Ring-linear hybrids (SPEC §8): the tiny CPU model with layers 0, 2 linear and 1, 3 softmax (groups of 2).
    "tiny-linear": {"model": dict(rope_theta=10000.0, partial_rotary_factor=1.0, layer_group_size=2,
                                  group_norm_size=2)},
    # Ling-mini-2.0 converted as SPEC §8 states: 16 linear layers, softmax at 4, 9, 14, 19.
    "ring-mini-linear-2.0": {"model": dict(
        _LING_COMMON, num_hidden_layers=20, hidden_size=2048, num_attention_heads=16,
        num_key_value_heads=4, intermediate_size=5120, moe_intermediate_size=512, first_k_dense_replace=1,
        layer_group_size=5, group_norm_size=4, linear_silu=False)},
    # Ling-flash-2.0 converted the same way. The group size is not in SPEC: 8 (28 linear layers, softmax at 7, 15, 23,
    # 31) is the one that gives the published 104B total and 6.1B active non-embedding; group_norm_size 8 keeps mini's
    # 4 heads per norm group (open). docs/linear.md derives both.
    "ring-flash-linear-2.0": {"model": dict(
        _LING_COMMON, num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
        num_key_value_heads=4, intermediate_size=9216, moe_intermediate_size=1024, first_k_dense_replace=1,
        layer_group_size=8, group_norm_size=8, linear_silu=False)},
}

# Presets too large to materialise on a laptop: built on the meta device (shapes and counts only).
META_PRESETS = ("ling-mini-2.0", "ling-flash-2.0", "ling-1t", "ring-mini-linear-2.0", "ring-flash-linear-2.0")


def _coerce(value, typ, key: str):
    """Convert a TOML or command-line value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config: {key} expects true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):  # TOML arrays, tables and dates too
            raise ConfigError(f"config: {key} expects an integer, got {value!r}")
        try:
            if isinstance(value, str):
                return int(value.replace("_", ""))
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except ValueError:
            raise ConfigError(f"config: {key} expects an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"config: {key} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {key} expects a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"config: {key} expects a string, got {value!r}")
        return str(value)
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} expects a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    raise ConfigError(f"config: {key} has an unsupported type {typ}")


def _section_types(section) -> dict[str, type]:
    return typing.get_type_hints(type(section))


def set_value(cfg: Config, dotted: str, value) -> None:
    """Set `section.key` on the tree, converting the value to the field's type."""
    parts = dotted.split(".")
    sections = [f.name for f in dataclasses.fields(cfg)]
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"config: unknown key '{dotted}' (sections: {', '.join(sections)}; use section.key)")
    section = getattr(cfg, parts[0])
    types_ = _section_types(section)
    if parts[1] not in types_:
        raise ConfigError(f"config: unknown key '{dotted}' (keys of [{parts[0]}]: {', '.join(types_)})")
    setattr(section, parts[1], _coerce(value, types_[parts[1]], dotted))


def apply_dict(cfg: Config, tree: dict, source: str = "") -> None:
    """Apply a nested {section: {key: value}} mapping (a preset or a parsed TOML file)."""
    for section, values in tree.items():
        if not isinstance(values, dict):
            where = f" in {source}" if source else ""
            raise ConfigError(f"config: '{section}'{where} must be a [section] table of keys")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--section.key=value` (or `--section.key value`) pairs from a list of CLI words."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"config: cannot read argument '{arg}' (expected --section.key=value)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"config: {arg} needs a value (--section.key=value)")
        pairs.append((key, value))
        i += 1
    return pairs


def read_toml(path: str | Path, what: str = "config", error: type[LinglabError] = ConfigError) -> dict:
    """A TOML file's tables, or one line naming the file (`what` prefixes the message, `error` is its type)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what}: {path} is not valid TOML ({e})") from None


def load_config(preset: str | None = "tiny", path: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Preset, then TOML file, then `--section.key=value` overrides; validated."""
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"config: unknown preset '{preset}' (choose from: {', '.join(PRESETS)})")
        apply_dict(cfg, PRESETS[preset])
    if path is not None:
        apply_dict(cfg, read_toml(path), source=str(path))
    for key, value in parse_overrides(overrides or []):
        set_value(cfg, key, value)
    cfg.validate()
    return cfg


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written into each run directory)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return '"none"'
    return repr(v)
