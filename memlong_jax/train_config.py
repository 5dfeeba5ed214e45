"""Training settings: `TrainConfig`, one field per `python -m train.run --set` key.

It lives in the library, not in `train/`, because a preset (`memlong_jax.presets`) names the
model, MemLong and training settings together and the library's commands read presets; what
uses these settings (`train.config.resolve`/`validate`, the training loop) stays in `train/`.
"""

from __future__ import annotations

import dataclasses

from memlong_jax.llama.model import REMAT_POLICIES
from memlong_jax.settings import Config, setting


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """Help text, allowed values and least values are in each field's metadata."""

    model: str = setting(
        "tiny",
        help="preset whose architecture is used (memlong_jax.presets); init_from's "
             "config.json wins when given")
    init_from: str = setting(
        "",
        help="converted checkpoint directory (python -m convert.from_hf SRC DIR); empty: "
             "random init from seed (tiny only)")
    data: str = setting(
        "pydoc",
        help="comma-separated text files, .jsonl files ({'text': ...} per line) or "
             "directories; 'pydoc' = Python's bundled reference text")
    tokenizer: str = setting(
        "auto",
        help="auto (init_from's tokenizer.json, else bytes), byte, or a directory/file with "
             "tokenizer.json")
    cache_dir: str = setting(
        "out/token_cache",
        help="where tokenized corpora are cached (memory-mapped)")
    output_dir: str = setting(
        "out/train/tiny",
        help="checkpoints, metrics.jsonl, TensorBoard events; resumed when it holds "
             "checkpoints")
    seq_len: int = setting(
        32, least=1,
        help="tokens per training block (a multiple of memlong.chunk_size)")
    rows_per_replica: int = setting(
        1, least=1,
        help="sequences per micro-step per replica (each its own contiguous stream)")
    grad_accum: int = setting(
        2, least=1,
        help="micro-steps per optimizer step (memory is written after each)")
    steps: int = setting(40, help="optimizer steps; 0 = one epoch of the training split", least=0)
    lr: float = setting(3e-3, help="peak AdamW learning rate")
    weight_decay: float = setting(
        1e-4,
        help="AdamW decoupled weight decay (applied to every trainable leaf, as upstream)")
    warmup_steps: int = setting(
        4, least=0,
        help="steps of warmup from 0 to lr, then linear decay to 0 at `steps`")
    warmup_shape: str = setting(
        "linear", choices=("linear", "log"),
        help="linear, or log (DeepSpeed WarmupDecayLR: lr*log(step+1)/log(warmup))")
    clip: float = setting(1.0, help="global gradient-norm clip (0 = off)")
    adam_b1: float = setting(0.9, help="AdamW beta1")
    adam_b2: float = setting(0.999, help="AdamW beta2")
    adam_eps: float = setting(1e-8, help="AdamW epsilon")
    seed: int = setting(42, help="seed of random init, LoRA init and LoRA dropout")
    init_adapter: str = setting(
        "",
        help="start the trained parameters from this adapter (python -m train.export RUN DIR "
             "--adapter; same model and LoRA settings) instead of a fresh LoRA: continues a "
             "finished run under other settings, with a fresh optimizer and schedule")
    data_start: int = setting(
        0, least=0,
        help="micro-steps each stream skips before its first block (to continue another run's "
             "data after it: its steps x grad_accum)")
    trainable: str = setting(
        "lora", choices=("lora", "upper"),
        help="lora (LoRA on lora_targets of the layers above the memory layer) or upper "
             "(every parameter of those layers); plus their norms and the final norm")
    train_from: int = setting(
        -1,
        help="first layer that trains (-1: the one above the memory layer; a higher one "
             "trains fewer layers; layers up to the memory layer never get gradients)")
    lora_rank: int = setting(8, help="LoRA rank r", least=1)
    lora_alpha: float = setting(16.0, help="LoRA alpha (scale alpha/r)")
    lora_dropout: float = setting(0.05, help="LoRA dropout (on input features, see train/lora.py)")
    lora_targets: str = setting(
        "q_proj,k_proj,v_proj,o_proj",
        help="comma-separated projections that get LoRA")
    train_norms: bool = setting(
        True,
        help="train the RMSNorm weights of the upper layers and the final norm")
    dtype: str = setting("float32", help="compute dtype", choices=("float32", "bfloat16"))
    param_dtype: str = setting(
        "float32", choices=("float32", "bfloat16"),
        help="storage dtype of frozen params")
    remat: str = setting(
        "none", choices=REMAT_POLICIES,
        help="rematerialisation per decoder layer: none, full (nothing saved), dots (matmul "
             "outputs saved), dots_no_batch (only non-batched matmuls saved)")
    scan_layers: bool = setting(
        False,
        help="run each stretch of layers that read no memory as one lax.scan (faster "
             "compiles; same numbers up to fp32 summation order)")
    mesh_data: int = setting(
        -1,
        help="devices on the `data` mesh axis (-1: all devices / mesh_fsdp)")
    mesh_fsdp: int = setting(
        1,
        help="devices on the `fsdp` mesh axis (params and optimizer state sharded)")
    val_fraction: float = setting(
        0.05,
        help="last fraction of blocks held out for validation (no shuffling, as upstream)")
    recall_fraction: float = setting(
        0.0,
        help="fraction of each stream's episodes turned into recall episodes "
             "(train/recall_mix.py: something said early in the episode is needed in its "
             "last block); 0 = plain text")
    recall_episode: int = setting(
        4,
        help="blocks per recall episode (the last one asks, the others state)")
    recall_kinds: str = setting(
        "repeat,facts,passkey",
        help="comma-separated recall episode kinds: repeat, facts, passkey")
    eval_every: int = setting(0, help="validate every N steps (0: only at the end)", least=0)
    eval_batches: int = setting(
        2, least=0,
        help="validation batches per evaluation (0: no validation)")
    eval_length: int = setting(128, help="tokens per validation window, memory reset per window")
    eval_window: int = setting(
        32,
        help="scored tail of each validation window (the paper's last-2048 protocol)")
    signal_every: int = setting(
        0, least=0,
        help="every N steps, before the update: the batch's loss with and without memory "
             "(memory_gain, nats) and the attention mass on memory per retrieval layer "
             "(train/signals.py); 0 = off")
    log_every: int = setting(10, help="write metrics every N steps", least=1)
    checkpoint_every: int = setting(20, help="checkpoint every N steps", least=1)
    keep_checkpoints: int = setting(3, help="keep the last N checkpoints", least=1)
    async_checkpoint: bool = setting(True, help="write checkpoints in the background")
    progress: bool = setting(True, help="show a progress bar")
    tensorboard: bool = setting(True, help="write TensorBoard event files")
    peak_tflops: float = setting(0.0, help="peak TFLOP/s per device for MFU (0: known GPUs only)")
    encoder_dir: str = setting(
        "",
        help="text retriever directory (empty: bundled all-MiniLM-L6-v2)")
    key_table: str = setting(
        "",
        help="precomputed text-retriever keys of the data (python -m train.keys); empty: the "
             "encoder embeds every batch's chunks")
    export_dir: str = setting(
        "",
        help="after training, write the LoRA-merged model here (our checkpoint format)")
    export_hf: str = setting("", help="after training, also write it as an HF directory here")
    allow_data_change: bool = setting(
        False,
        help="resume even though the data's content fingerprint differs from the "
             "checkpoint's")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def recall_kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.recall_kinds.split(",") if k.strip())

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
