"""Training settings: `TrainConfig`, the named presets and `--set key=value` overrides.

A preset fixes every training setting and names the LLaMA architecture and MemLong settings it
starts from. `--set key=value` overrides a training field; `--set memlong.key=value` overrides a
MemLong field (`memlong_jax.memlong.config.MemLongConfig`). Unknown keys and keys given twice are
errors. The resolved config (all three parts) is written into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os

from memlong_jax.llama.config import PRESETS as MODEL_PRESETS
from memlong_jax.llama.config import ConfigError, LlamaConfig, parse_setting
from memlong_jax.llama.model import REMAT_POLICIES
from memlong_jax.memlong.config import MEMLONG_PRESETS, MemLongConfig
from train.recall_mix import KINDS as RECALL_KINDS

MEMLONG_PREFIX = "memlong."

CHOICES = {
    "trainable": ("lora", "upper"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": tuple(REMAT_POLICIES),
    "warmup_shape": ("linear", "log"),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One field per `--set` key; `HELP` below documents each."""

    model: str = "tiny"
    init_from: str = ""
    data: str = "pydoc"
    tokenizer: str = "auto"
    cache_dir: str = "out/token_cache"
    output_dir: str = "out/train/tiny"
    seq_len: int = 32
    rows_per_replica: int = 1
    grad_accum: int = 2
    steps: int = 40
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 4
    warmup_shape: str = "linear"
    clip: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 42
    trainable: str = "lora"
    train_from: int = -1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    train_norms: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    mesh_data: int = -1
    mesh_fsdp: int = 1
    val_fraction: float = 0.05
    recall_fraction: float = 0.0
    recall_episode: int = 4
    recall_kinds: str = "repeat,facts,passkey"
    eval_every: int = 0
    eval_batches: int = 2
    eval_length: int = 128
    eval_window: int = 32
    signal_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    progress: bool = True
    tensorboard: bool = True
    peak_tflops: float = 0.0
    encoder_dir: str = ""
    key_table: str = ""
    export_dir: str = ""
    export_hf: str = ""
    allow_data_change: bool = False

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def recall_kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.recall_kinds.split(",") if k.strip())

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


HELP = {
    "model": "LLaMA architecture preset (llama.config.PRESETS); init_from's config.json "
             "wins when given",
    "init_from": "converted checkpoint directory (python -m convert.from_hf SRC DIR); empty: "
                 "random init from seed (tiny only)",
    "data": "comma-separated text files, .jsonl files ({'text': ...} per line) or directories; "
            "'pydoc' = Python's bundled reference text",
    "tokenizer": "auto (init_from's tokenizer.json, else bytes), byte, or a directory/file "
                 "with tokenizer.json",
    "cache_dir": "where tokenized corpora are cached (memory-mapped)",
    "output_dir": "checkpoints, metrics.jsonl, TensorBoard events; resumed when it holds "
                  "checkpoints",
    "seq_len": "tokens per training block (a multiple of memlong.chunk_size)",
    "rows_per_replica": "sequences per micro-step per replica (each its own contiguous stream)",
    "grad_accum": "micro-steps per optimizer step (memory is written after each)",
    "steps": "optimizer steps; 0 = one epoch of the training split",
    "lr": "peak AdamW learning rate",
    "weight_decay": "AdamW decoupled weight decay (applied to every trainable leaf, as upstream)",
    "warmup_steps": "steps of warmup from 0 to lr, then linear decay to 0 at `steps`",
    "warmup_shape": "linear, or log (DeepSpeed WarmupDecayLR: lr*log(step+1)/log(warmup))",
    "clip": "global gradient-norm clip (0 = off)",
    "adam_b1": "AdamW beta1", "adam_b2": "AdamW beta2", "adam_eps": "AdamW epsilon",
    "seed": "seed of random init, LoRA init and LoRA dropout",
    "trainable": "lora (LoRA on lora_targets of the layers above the memory layer) or upper "
                 "(every parameter of those layers); plus their norms and the final norm",
    "train_from": "first layer that trains (-1: the one above the memory layer; a higher one "
                  "trains fewer layers; layers up to the memory layer never get gradients)",
    "lora_rank": "LoRA rank r", "lora_alpha": "LoRA alpha (scale alpha/r)",
    "lora_dropout": "LoRA dropout (on input features, see train/lora.py)",
    "lora_targets": "comma-separated projections that get LoRA",
    "train_norms": "train the RMSNorm weights of the upper layers and the final norm",
    "dtype": "compute dtype", "param_dtype": "storage dtype of frozen params",
    "remat": "rematerialisation per decoder layer: none, full (nothing saved), dots (matmul "
             "outputs saved), dots_no_batch (only non-batched matmuls saved)",
    "scan_layers": "run each stretch of layers that read no memory as one lax.scan (faster "
                   "compiles; same numbers up to fp32 summation order)",
    "mesh_data": "devices on the `data` mesh axis (-1: all devices / mesh_fsdp)",
    "mesh_fsdp": "devices on the `fsdp` mesh axis (params and optimizer state sharded)",
    "recall_fraction": "fraction of each stream's episodes turned into recall episodes "
                       "(train/recall_mix.py: something said early in the episode is needed in "
                       "its last block); 0 = plain text",
    "recall_episode": "blocks per recall episode (the last one asks, the others state)",
    "recall_kinds": "comma-separated recall episode kinds: repeat, facts, passkey",
    "val_fraction": "last fraction of blocks held out for validation (no shuffling, as upstream)",
    "eval_every": "validate every N steps (0: only at the end)",
    "eval_batches": "validation batches per evaluation (0: no validation)",
    "eval_length": "tokens per validation window, memory reset per window",
    "eval_window": "scored tail of each validation window (the paper's last-2048 protocol)",
    "signal_every": "every N steps, before the update: the batch's loss with and without "
                    "memory (memory_gain, nats) and the attention mass on memory per retrieval "
                    "layer (train/signals.py); 0 = off",
    "log_every": "write metrics every N steps", "checkpoint_every": "checkpoint every N steps",
    "keep_checkpoints": "keep the last N checkpoints",
    "async_checkpoint": "write checkpoints in the background",
    "progress": "show a progress bar", "tensorboard": "write TensorBoard event files",
    "peak_tflops": "peak TFLOP/s per device for MFU (0: known GPUs only)",
    "encoder_dir": "text retriever directory (empty: bundled all-MiniLM-L6-v2)",
    "key_table": "precomputed text-retriever keys of the data (python -m train.keys); empty: "
                 "the encoder embeds every batch's chunks",
    "export_dir": "after training, write the LoRA-merged model here (our checkpoint format)",
    "export_hf": "after training, also write it as an HF directory here",
    "allow_data_change": "resume even though the data's content fingerprint differs from the "
                         "checkpoint's",
}

_PAPER = dict(
    seq_len=1024, rows_per_replica=1, grad_accum=8, steps=0, lr=5e-5, weight_decay=1e-4,
    warmup_steps=1000, clip=1.0, trainable="lora", lora_rank=64, lora_alpha=8.0,
    lora_dropout=0.05, eval_every=1000, eval_batches=8, eval_length=4096, eval_window=2048,
    log_every=10, checkpoint_every=500, seed=42)

# MemLong settings of the presets that do not use their model's (memlong.config.MEMLONG_PRESETS;
# the `smollm2-135m` preset keeps upstream's recipe there).
PRESET_MEMLONG = {
    "smollm2-135m-recall": MEMLONG_PRESETS["smollm2-135m"].replace(
        memory_layer=8, retrieval_layers=tuple(range(8, 30)), memory_kv="per_layer",
        memory_positions="near", prefix_context="window", query_mode="causal",
        memory_tokens=1024),
}

PRESETS: dict[str, TrainConfig] = {
    # Seconds on a CPU: 4-layer random model, byte tokens, in-graph retriever.
    "tiny": TrainConfig(),
    # SmolLM2-135M from `make demo`'s converted checkpoint; the paper's recipe otherwise.
    "smollm2-135m": TrainConfig(
        model="smollm2-135m", init_from="demo_out/smollm2-135m", output_dir="out/train/smollm2-135m",
        **_PAPER),
    # Issue 15's recipe (docs/results.md): per-layer memory read by every layer from the memory
    # layer up, trained on books with recall episodes mixed in and the memory signals logged.
    # The memory holds the previous block only (all of it retrieved), so training teaches
    # reading; at evaluation the text retriever picks chunks from a long memory and `near`
    # positions present them as the text just before the window, as training did.
    "smollm2-135m-recall": TrainConfig(
        model="smollm2-135m", init_from="demo_out/smollm2-135m",
        output_dir="out/train/smollm2-135m-recall", seq_len=1024, rows_per_replica=1,
        grad_accum=4, steps=120, lr=1e-3, warmup_steps=5, trainable="lora", lora_rank=16,
        lora_alpha=32.0, lora_dropout=0.0, eval_every=0, eval_batches=0, eval_length=2048,
        eval_window=1024, log_every=1, checkpoint_every=5, signal_every=10,
        recall_fraction=0.5, recall_episode=2, seed=42),
    # The paper's recipe: OpenLLaMA-3B-v2, bf16.
    "openllama3b": TrainConfig(
        model="openllama3b", init_from="checkpoints/open_llama_3b_v2",
        output_dir="out/train/openllama3b", dtype="bfloat16", param_dtype="bfloat16", **_PAPER),
}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Everything a run is defined by."""

    name: str
    train: TrainConfig
    memlong: MemLongConfig

    def to_dict(self) -> dict:
        return {"preset": self.name, "train": self.train.to_dict(),
                "memlong": self.memlong.to_dict()}


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown setting {key!r}{hint}; see --help for the keys")


def resolve(name: str, assignments=()) -> Resolved:
    """The preset `name` with `key=value` overrides applied; raises ConfigError on bad input."""
    if name not in PRESETS:
        raise ConfigError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")
    base = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    seen: set[str] = set()
    changes: dict = {}
    mem_items: list[str] = []
    for item in assignments:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"bad --set {item!r}: expected key=value")
        if key in seen:
            raise ConfigError(f"setting {key!r} given twice")
        seen.add(key)
        if key.startswith(MEMLONG_PREFIX):
            mem_items.append(f"{key[len(MEMLONG_PREFIX):]}={value}")
            continue
        if key not in fields:
            raise _unknown(key, list(fields) + [MEMLONG_PREFIX + f.name
                                                for f in dataclasses.fields(MemLongConfig)])
        changes[key] = parse_setting(key, getattr(base, key), value.strip())
    train = base.replace(**changes)
    if "output_dir" not in changes and train.model != base.model:
        train = train.replace(output_dir=f"out/train/{train.model}")
    preset_mem = memlong_preset(name, train.model)
    memlong = preset_mem.with_overrides(mem_items)
    return Resolved(name, train, memlong)


def memlong_preset(name: str, model: str) -> MemLongConfig:
    """The MemLong settings a preset starts from: its own, else its model's."""
    return PRESET_MEMLONG.get(name) or MEMLONG_PRESETS.get(name) or MEMLONG_PRESETS[model]


def validate(run: Resolved, model: LlamaConfig) -> Resolved:
    """Check the settings against each other and the model; raise ConfigError on the first
    problem."""
    t, m = run.train, run.memlong.validate(model)
    for key, allowed in CHOICES.items():
        if getattr(t, key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(t, key)!r}")
    positive = ("seq_len", "rows_per_replica", "grad_accum", "lora_rank", "log_every",
                "checkpoint_every", "keep_checkpoints")
    for key in positive:
        if getattr(t, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(t, key)}")
    for key in ("steps", "warmup_steps", "eval_every", "eval_batches", "signal_every"):
        if getattr(t, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(t, key)}")
    if t.seq_len % m.chunk_size:
        raise ConfigError(f"seq_len ({t.seq_len}) must be a multiple of memlong.chunk_size "
                          f"({m.chunk_size})")
    if t.eval_batches:
        if t.eval_window % m.chunk_size or t.eval_length % m.chunk_size or \
                not 0 < t.eval_window <= t.eval_length:
            raise ConfigError(f"eval_window ({t.eval_window}) and eval_length ({t.eval_length}) "
                              f"must be multiples of memlong.chunk_size ({m.chunk_size}) with "
                              "0 < eval_window <= eval_length")
    for key in ("lr", "weight_decay", "clip", "adam_eps", "lora_alpha", "peak_tflops"):
        value = getattr(t, key)
        if not math.isfinite(value) or value < 0 or (key in ("lr", "adam_eps") and value == 0):
            raise ConfigError(f"{key} must be a finite number "
                              f"{'> 0' if key in ('lr', 'adam_eps') else '>= 0'}, got {value}")
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= getattr(t, key) < 1:
            raise ConfigError(f"{key} must be in [0, 1), got {getattr(t, key)}")
    if not 0 <= t.recall_fraction <= 1:
        raise ConfigError(f"recall_fraction must be in [0, 1], got {t.recall_fraction}")
    if t.recall_episode < 2:
        raise ConfigError(f"recall_episode must be at least 2 blocks, got {t.recall_episode}")
    kinds = t.recall_kind_list
    if not kinds or not set(kinds) <= set(RECALL_KINDS):
        raise ConfigError(f"recall_kinds must name some of {', '.join(RECALL_KINDS)}, got "
                          f"{t.recall_kinds!r}")
    if not 0 <= t.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {t.val_fraction}")
    if not 0 <= t.lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {t.lora_dropout}")
    if m.memory_layer >= model.num_hidden_layers - 1:
        raise ConfigError("nothing to train: the memory layer is the last layer")
    if t.train_from != -1 and not m.memory_layer < t.train_from < model.num_hidden_layers:
        raise ConfigError(f"train_from must be -1 or in {m.memory_layer + 1}.."
                          f"{model.num_hidden_layers - 1} (above the memory layer), got "
                          f"{t.train_from}")
    if t.trainable == "lora":
        bad = [x for x in t.lora_target_list if x not in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj")]
        if bad or not t.lora_target_list:
            raise ConfigError(f"lora_targets must name projections (q_proj, k_proj, v_proj, "
                              f"o_proj, gate_proj, up_proj, down_proj), got {t.lora_targets!r}")
    if t.mesh_fsdp <= 0 or t.mesh_data == 0 or t.mesh_data < -1:
        raise ConfigError(f"mesh_data ({t.mesh_data}) must be -1 or positive and mesh_fsdp "
                          f"({t.mesh_fsdp}) positive")
    return Resolved(run.name, t, m)


def help_text() -> str:
    """The key table for `--help`: every key with its default in each preset."""
    names = list(PRESETS)
    lines = ["settings (--set key=value; defaults per preset: " + " | ".join(names) + "):"]
    for f in dataclasses.fields(TrainConfig):
        values = [repr(getattr(PRESETS[n], f.name)) for n in names]
        shown = values[0] if len(set(values)) == 1 else " | ".join(values)
        lines.append(f"  {f.name} = {shown}")
        lines.append(f"      {HELP.get(f.name, '')}")
    lines.append("MemLong settings (--set memlong.key=value; defaults per preset):")
    for f in dataclasses.fields(MemLongConfig):
        values = [repr(getattr(memlong_preset(n, PRESETS[n].model), f.name)) for n in names]
        shown = values[0] if len(set(values)) == 1 else " | ".join(values)
        lines.append(f"  memlong.{f.name} = {shown}")
    return "\n".join(lines)


def model_config(run: Resolved) -> LlamaConfig:
    """The architecture: init_from's config.json when it exists, else the `model` preset."""
    path = run.train.init_from
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return LlamaConfig.from_json_file(os.path.join(path, "config.json"))
    if run.train.model not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {run.train.model!r}; choose from "
                          f"{', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[run.train.model]
