"""Supervised fine-tuning: teach a base model the chat format on conversations, fully or with LoRA adapters.

    gptlab sft --model runs/X/pretrain/model --data tasks --out runs/X/sft
    gptlab sft --preset gpu --model imported/qwen --data chats.jsonl --out runs/qwen-sft --lora-rank 16

Design decisions
- Data: an OpenAI-style `messages` JSONL file or HF dataset (`gptlab.chat.read_messages_jsonl`: strict validation, errors
  name file:line), or `tasks` (the default): conversations drawn from the train split of the embedded task
  suite, a uniform mix of every task (identity included, so the model learns who it is), each with one of
  its reference answers at random. Held-out loss is measured on the task suite's test split (disjoint by
  construction), or on `val_conversations` conversations set aside from a JSONL file.
- Loss only on what the assistant writes: `chat.render` gives the mask, targets are -1 elsewhere
  (`GPT.masked_loss` runs the head only where they are not, ~45% of positions here: 29% off a CPU
  step). The loss of a step is the mean over its trained tokens (micro-batch means
  weighted by their token counts), so a micro-batch of short answers does not weigh as much as one of long.
- Packing: whole conversations are packed into rows of `seq_len + 1` tokens (inputs are the first
  seq_len, targets the last seq_len) by best-fit decreasing bin packing, then rows are shuffled; the rest
  of a row is `<|pad|>` with -1 targets, typically a few percent (logged as `packing efficiency`). A
  conversation is never split: one longer than a row is dropped, with the count logged and recorded in
  `sft.json` (an error if nothing is left), because a cut conversation teaches answers to questions the
  model cannot see. A conversation may attend to the ones before it in its row, exactly as packed
  pretraining documents do; the `<|endoftext|>` opening each conversation marks the boundary, the target
  that predicts it is masked, and rotary attention depends only on relative position, so an offset in the
  row changes nothing by itself.
- Optimization reuses pretraining's pieces (`build_optimizers`, `lr_multiplier` with warmup + cosine or
  warmup-stable-decay, `StopRequest`, training checkpoints with exact resume, `MetricsLogger`) at a lower
  learning rate and no weight decay by default: fine-tuning should move a pretrained model, not re-learn it.
  LoRA (`--lora-rank`, see gptlab/lora.py) trains only the adapters, at a higher learning rate (`lora_lr`:
  the low-rank update starts at zero and is scaled by alpha / r). Its training checkpoints hold the frozen
  base as well as the adapters: a resume needs nothing else, at the cost of disk for large models.
- Output: `out/model`, an ordinary model dir (with LoRA, the adapters folded into the weights, so every
  later stage loads it like any model), `out/adapter` (LoRA only, PEFT format), `out/sft.json` (data
  counts, final held-out loss, gold accuracy), metrics and a loss curve. Gold accuracy is measured at the
  end with `gptlab.eval.gold.gold_accuracy` in chat mode (task suite test split, greedy, tool calls run).
- Imported models (HF/GGUF) are model dirs like any other, but their tokenizers lack gptlab's chat tokens:
  those are added to the tokenizer at new ids, growing the embedding (and an untied head) when the model
  has no spare rows. New rows are drawn from a normal with the existing rows' per-dimension mean and spread
  (after Hewitt 2021, "Initializing new word embeddings"): they look like ordinary tokens to the model,
  yet differ from each other, which matters under LoRA, where the embeddings stay frozen. The output is a
  gptlab-format model dir: no `imported.json` (the source is named in `sft.json`), so every stage prompts
  it in the format it was trained on and `gptlab export` gives it gptlab's chat template and end tokens,
  not the template of the model it started from. A LoRA adapter trained on such a model
  belongs to the base with the added tokens (its recorded config says so; loading it onto the original
  import is refused); `out/model` has the adapters folded in.
- Single process (SFT of the models this project targets fits one device); single-device CUDA runs use
  bf16 autocast, CPU runs fp32 and are exactly reproducible, resume included.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import lora as lora_mod
from ..chat import Rendered, read_messages_jsonl, render
from ..checkpoint import (load_model_dir, load_training_checkpoint, rng_state, save_model_dir, save_training_checkpoint,
                          set_rng_state)
from ..common import GptlabError, atomic_write_json, get_logger, torch_device
from ..config import option, register_config_command
from ..eval.gold import gold_accuracy
from ..infer.generation_config import greedy_generation_config
from ..model import GPT
from ..tasks import task_conversations, task_names
from ..tokenizer import SPECIAL_TOKENS, Tokenizer
from .loop import (checkpoint_to_resume, clipped_step, due, existing_checkpoints, set_lr_scale, stop_if_requested,
                   training_loop)
from .metrics import MetricsLogger, plot_loss_curve
from .optim import TrainConfig, bf16_autocast, build_optimizers, lr_multiplier

log = get_logger("sft")


@dataclass
class SFTConfig(TrainConfig):
    model: str = option("runs/default/pretrain/model", "base model directory (gptlab pretrain or gptlab import)")
    data: str = option("tasks", "'tasks' (the embedded task suite), an OpenAI messages .jsonl file, a HF dataset "
                                "folder (save_to_disk) or hf:NAME[:SPLIT] with a messages column")
    out: str = option("runs/default/sft", "output: model/, adapter/ (LoRA), checkpoints, metrics, sft.json")
    tasks: str | None = option(None, "data=tasks: comma-separated task names (default: all)")
    num_conversations: int = option(8000, "data=tasks: training conversations to draw")
    val_conversations: int = option(200, "held-out conversations for the SFT loss (test split / set aside from the file)")
    seq_len: int = option(512, "tokens per packed row (capped at the model's context window)")
    batch_size: int = option(8, "rows per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(2.0, "passes over the training conversations (when num_steps is 0)")
    num_steps: int = option(0, "optimizer steps (0 = from epochs)")
    lr: float = option(3e-4, "peak learning rate, full fine-tuning")
    lora_lr: float = option(2e-3, "peak learning rate of the LoRA adapters")
    muon_lr: float = option(0.005, "peak Muon learning rate (optimizer=muon)")
    weight_decay: float = option(0.0, "decoupled weight decay on matrices")
    decay_frac: float = option(0.5, "wsd: fraction of steps in the final linear decay")
    min_lr_frac: float = option(0.0, "final learning rate as a fraction of the peak")
    lora_rank: int = option(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: float = option(16.0, "LoRA alpha: the update is scaled by alpha / rank")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_targets: str = option(",".join(lora_mod.DEFAULT_TARGETS), "comma-separated linear layers to adapt")
    lora_base_dtype: str = option("float32", "frozen base with LoRA: float32, bfloat16 or int8 (adapted layers "
                                             "quantized per row)")
    eval_every: int = option(100, "held-out SFT loss every N steps (0 = start and end only)")
    gold_per_task: int = option(20, "test questions per task for gold accuracy at the end (0 = skip)")
    gold_max_tokens: int = option(128, "max new tokens per gold-accuracy answer")
    checkpoint_every: int = option(200, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, "keep the newest N checkpoints (0 = all)")

    def __post_init__(self):
        super().__post_init__()
        if self.lora_base_dtype not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"lora_base_dtype must be float32, bfloat16 or int8, got {self.lora_base_dtype!r}")
        if min(self.seq_len, self.batch_size, self.grad_accum, self.num_conversations) < 1 or self.lora_rank < 0:
            raise ValueError("seq_len, batch_size, grad_accum and num_conversations must be positive, lora_rank >= 0")
        if self.num_steps < 0 or (self.num_steps == 0 and self.epochs <= 0):
            raise ValueError("give num_steps > 0 or epochs > 0")
        if self.lora_rank and self.optimizer == "muon":
            raise ValueError("LoRA adapters are trained with adamw (Muon orthogonalizes full matrices)")


PRESETS = {
    # CPU: a few minutes on a laptop for the models `gptlab pretrain --preset tiny/small` makes.
    # The learning rate is that of training, not of fine-tuning: a model this small learns the tasks in SFT
    # rather than recalling them from pretraining (3e-4: 0% gold accuracy, 3e-3: up to 100% on some tasks;
    # docs/LOG.md). Imported models (SmolLM2, 135M) want --lr 1e-4 or LoRA.
    "cpu": SFTConfig(seq_len=512, batch_size=8, num_conversations=8000, epochs=2.0, lr=3e-3, warmup_steps=20,
                     eval_every=100, gold_per_task=20),
    # GPU (one H100, about a minute for the speedrun's 110M model): full 1024-token rows, 32 a step, more
    # data and a third epoch; bf16 autocast. The rate is the model's pretraining peak, for the reason above
    # (a briefly pretrained model learns the tasks here); set by that argument, not by a sweep.
    "gpu": SFTConfig(seq_len=1024, batch_size=32, num_conversations=100000, epochs=3.0, lr=6e-4,
                     lora_lr=2e-3, warmup_steps=20, eval_every=100, gold_per_task=100, checkpoint_every=200),
}


# ---------------------------------------------------------------------------------------------------------
# Data: conversations -> rendered ids/masks -> packed rows


def load_conversations(cfg: SFTConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held-out) conversations for `cfg.data` (module docstring)."""
    if cfg.data == "tasks":
        names = task_names(cfg.tasks)
        return (task_conversations(names, cfg.num_conversations, "train", cfg.seed),
                task_conversations(names, cfg.val_conversations, "test", cfg.seed))
    conversations = list(read_messages_jsonl(cfg.data))
    if len(conversations) < 2:
        raise GptlabError(f"{cfg.data}: {len(conversations)} conversation(s); SFT needs at least 2 "
                          "(one is held out for the validation loss)")
    random.Random(f"sft-split-{cfg.seed}").shuffle(conversations)
    n_val = max(1, min(cfg.val_conversations, len(conversations) // 10))
    return conversations[n_val:], conversations[:n_val]


def render_and_fit(tokenizer: Tokenizer, conversations: list[list[dict]], row_tokens: int,
                   what: str) -> tuple[list[Rendered], int]:
    """Rendered conversations that fit in a row of `row_tokens` tokens, and how many were dropped."""
    rendered = [render(tokenizer, c) for c in conversations]
    kept = [r for r in rendered if len(r.ids) <= row_tokens]
    dropped = len(rendered) - len(kept)
    if dropped:
        log.warning("%s: dropped %d of %d conversations longer than a row of %d tokens (longest: %d); "
                    "raise --seq-len to keep them", what, dropped, len(rendered), row_tokens,
                    max(len(r.ids) for r in rendered))
    if not kept:
        raise GptlabError(f"{what}: no conversation fits in a row of {row_tokens} tokens; raise --seq-len")
    return kept, dropped


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of items grouped into rows whose lengths sum to at most
    `capacity`. Each item goes to the open row it fills most tightly (a new row when none has room);
    placing long items first leaves short ones to fill the gaps. Within 11/9 of the optimal row count
    (Johnson 1973); in practice a few percent of padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the given order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"item {i} of length {lengths[i]} exceeds the row capacity {capacity}")
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            room, r = capacity - lengths[i], len(rows) - 1
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


def build_rows(examples: list[Rendered], rows: list[list[int]], seq_len: int,
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (len(rows), seq_len) int64: each row concatenates its conversations into
    seq_len + 1 tokens, padded with `pad_id`; a target is -1 unless the token is trained (mask 1)."""
    x = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    y = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        ids = [t for i in members for t in examples[i].ids]
        mask = [m for i in members for m in examples[i].mask]
        n = len(ids)
        x[r, :min(n, seq_len)] = torch.tensor(ids[:seq_len])
        targets = torch.tensor(ids[1:])
        y[r, :n - 1] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), targets, -1)
    return x, y


class ConversationBatches:
    """Micro-batches of packed rows, epoch after epoch. Each epoch shuffles the conversations, packs them
    and shuffles the rows, all seeded by (seed, epoch), so the position (epoch, row) is the whole state."""

    def __init__(self, examples: list[Rendered], seq_len: int, batch_size: int, pad_id: int, seed: int):
        self.examples, self.seq_len, self.batch_size, self.pad_id, self.seed = examples, seq_len, batch_size, pad_id, seed
        self.epoch, self.row = 0, 0
        self._rows: tuple[int, list[list[int]]] | None = None

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if self._rows is None or self._rows[0] != epoch:
            rng = random.Random(f"sft-pack-{self.seed}-{epoch}")
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            rows = [[order[j] for j in row] for row in pack([len(self.examples[i].ids) for i in order], self.seq_len + 1)]
            for row in rows:
                rng.shuffle(row)
            rng.shuffle(rows)
            self._rows = (epoch, rows)
        return self._rows[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = []
        while len(chosen) < self.batch_size:
            rows = self.epoch_rows(self.epoch)
            if self.row >= len(rows):
                self.epoch, self.row = self.epoch + 1, 0
                continue
            chosen.append(rows[self.row])
            self.row += 1
        return build_rows(self.examples, chosen, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def data_fingerprint(examples: list[Rendered]) -> str:
    """sha256 of the training token ids and masks: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.ids, ex.mask]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Imported models: add the chat tokens


def add_chat_tokens(model: GPT, tokenizer: Tokenizer) -> Tokenizer:
    """Return `tokenizer` with any missing gptlab special token (the chat format's) added at new ids, and
    grow `model`'s embedding/head to cover them (module docstring). Our own tokenizers come back as is."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.special_tokens]
    if not missing:
        return tokenizer
    spec = json.loads(tokenizer.json_text)
    first = tokenizer.vocab_size
    for i, name in enumerate(missing):
        spec.setdefault("added_tokens", []).append({"id": first + i, "content": name, "single_word": False,
                                                    "lstrip": False, "rstrip": False, "normalized": False,
                                                    "special": True})
    new = Tokenizer(json.dumps(spec, ensure_ascii=False), source=f"{tokenizer.source} + gptlab chat tokens")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        if new.vocab_size > model.config.vocab_size:
            grow = new.vocab_size - model.config.vocab_size
            model.model.embed_tokens.weight = torch.nn.Parameter(torch.cat([emb, emb.new_zeros(grow, emb.shape[1])]))
            if model.config.tie_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
            else:
                head = model.lm_head.weight
                model.lm_head.weight = torch.nn.Parameter(torch.cat([head, head.new_zeros(grow, head.shape[1])]))
            model.config = replace(model.config, vocab_size=new.vocab_size)
            model.model.embed_tokens.num_embeddings = model.lm_head.out_features = new.vocab_size
        generator = torch.Generator().manual_seed(0)
        tables = [model.model.embed_tokens.weight] + ([] if model.config.tie_embeddings else [model.lm_head.weight])
        for table in tables:
            old_rows = table[:first].float()
            mean, std = old_rows.mean(0), old_rows.std(0)
            noise = torch.randn(new.vocab_size - first, table.shape[1], generator=generator)
            table[first:new.vocab_size] = (mean + std * noise).to(table.device, table.dtype)
    log.info("added %d chat special tokens to the tokenizer (ids %d..%d)", len(missing), first, new.vocab_size - 1)
    return new


# ---------------------------------------------------------------------------------------------------------
# Evaluation: held-out SFT loss and gold accuracy


@torch.no_grad()
def sft_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast, device) -> float:
    """Mean cross-entropy (nats) over the trained tokens of packed rows (x, y)."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        with autocast:
            nats += model.masked_loss(xb, yb, reduction="sum").item()
        count += int((yb != -1).sum())
    model.train(was_training)
    return nats / max(1, count)


# ---------------------------------------------------------------------------------------------------------
# The loop


def sft(cfg: SFTConfig) -> Path:
    """Fine-tune per `cfg`; return the fine-tuned model directory (`out/model`)."""
    out_dir = Path(cfg.out)
    ckpt_root = out_dir / "checkpoints"
    device = torch_device(cfg.device)
    existing = existing_checkpoints(ckpt_root, cfg.resume)

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.model, device)
    tokenizer = add_chat_tokens(model, tokenizer)
    tokenizer.chat_template = None  # the run trains and measures gptlab's chat format, whatever an import used
    seq_len = min(cfg.seq_len, model.config.max_seq_len)
    if seq_len < cfg.seq_len:
        log.info("seq_len %d capped at the model's context window %d", cfg.seq_len, seq_len)
    pad_id = tokenizer.special_id("<|pad|>")

    train_convs, val_convs = load_conversations(cfg)
    train, dropped = render_and_fit(tokenizer, train_convs, seq_len + 1, "training data")
    val, val_dropped = render_and_fit(tokenizer, val_convs, seq_len + 1, "held-out data")
    val_x, val_y = build_rows(val, pack([len(r.ids) for r in val], seq_len + 1), seq_len, pad_id)
    batches = ConversationBatches(train, seq_len, cfg.batch_size, pad_id, cfg.seed)
    rows_per_epoch = len(batches.epoch_rows(0))
    used = sum(len(r.ids) for r in train)
    log.info("%d training conversations (%d tokens, %d trained) in %d rows of %d: packing efficiency %.1f%%; "
             "%d held out", len(train), used, sum(sum(r.mask) for r in train), rows_per_epoch, seq_len + 1,
             100 * used / (rows_per_epoch * (seq_len + 1)), len(val))
    rows_per_step = cfg.batch_size * cfg.grad_accum
    num_steps = cfg.num_steps or max(1, math.ceil(cfg.epochs * rows_per_epoch / rows_per_step))

    if cfg.lora_rank:
        targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
        lora_mod.add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets, cfg.lora_dropout,
                          cfg.lora_base_dtype if cfg.lora_base_dtype == "int8" else getattr(torch, cfg.lora_base_dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the schedule and optimizers come from pretraining; they read these fields of the config
    opt_cfg = replace(cfg, lr=cfg.lora_lr if cfg.lora_rank else cfg.lr, num_steps=num_steps)
    optimizers = build_optimizers(model, opt_cfg)
    fingerprint = data_fingerprint(train)

    step, resumed, last_good = 0, False, None
    if cfg.resume:
        ckpt = checkpoint_to_resume(ckpt_root, existing, log)
        if ckpt is not None:
            meta = load_training_checkpoint(ckpt, model, tokenizer, optimizers)
            if meta.get("data_sha256") != fingerprint:
                raise GptlabError(f"checkpoint {ckpt} was trained on other data (or other --seq-len/--seed); "
                                  "resume with the same data and options")
            batches.load_state_dict(meta["loader"])
            set_rng_state(meta["rng"][0])
            step, resumed, last_good = meta["step"], True, meta.get("train_loss")
            log.info("resumed from %s at step %d", ckpt, step)

    bf16 = bf16_autocast(cfg, device)
    autocast = bf16 or nullcontext()
    metrics = MetricsLogger(out_dir, tensorboard=cfg.tensorboard, resume_step=step if resumed else None)
    model.train()

    def save(at_step: int, train_loss: float | None) -> Path:
        meta = {"loader": batches.state_dict(), "train_loss": train_loss, "data_sha256": fingerprint,
                "num_steps": num_steps, "config": asdict(cfg)}
        return save_training_checkpoint(ckpt_root, at_step, model, tokenizer, optimizers=optimizers,
                                        rng_states=[rng_state()], meta=meta, keep_last=cfg.keep_checkpoints)

    def run_eval(at_step: int) -> float:
        loss = sft_loss(model, val_x, val_y, cfg.batch_size, autocast, device)
        metrics.log(at_step, **{"val/loss": loss})
        log.info("step %d: held-out SFT loss %.4f", at_step, loss)
        return loss

    n_trainable = sum(p.numel() for p in trainable)
    log.info("%s: %.2fM trainable of %.2fM parameters; %d steps of %d rows x %d tokens; device %s%s",
             f"LoRA r={cfg.lora_rank}" if cfg.lora_rank else "full fine-tuning", n_trainable / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6, num_steps, rows_per_step, seq_len, device,
             " (bf16 autocast)" if bf16 else "")
    loss_value = last_good
    with training_loop(num_steps, step, progress=cfg.progress, metrics=metrics, logger=log) as (bar, stop):
        if step == 0:
            run_eval(0)
        while step < num_steps:
            t0 = time.perf_counter()
            scale = lr_multiplier(step, opt_cfg)
            set_lr_scale(optimizers, scale)
            micro = [batches.next_batch() for _ in range(cfg.grad_accum)]
            trained_tokens = sum(int((y != -1).sum()) for _, y in micro)
            loss_sum = torch.zeros((), device=device)
            for x, y in micro:
                x, y = x.to(device), y.to(device)
                with autocast:
                    loss = model.masked_loss(x, y)
                # weight each micro-batch's mean by its share of the step's trained tokens
                weighted = loss * (int((y != -1).sum()) / trained_tokens)
                weighted.backward()
                loss_sum += weighted.detach()
            loss_value = loss_sum.item()
            grad_norm = clipped_step(optimizers, trainable, cfg.grad_clip, {"SFT loss": loss_value}, step=step,
                                     checkpoints=ckpt_root,
                                     context=f" (lr scale {scale:.4g}); last good loss {last_good}",
                                     hint="Try a lower --lr/--lora-lr or more --warmup-steps")
            step += 1
            last_good = loss_value
            dt = time.perf_counter() - t0
            metrics.log(step, **{"train/loss": loss_value, "train/lr_scale": scale, "train/grad_norm": grad_norm,
                                 "train/trained_tokens": trained_tokens,
                                 "train/tokens_per_s": rows_per_step * seq_len / dt})
            bar.set_postfix({"loss": f"{loss_value:.3f}"}, refresh=False)
            bar.update(1)
            stop_if_requested(stop.requested, lambda at: save(at, loss_value), step, log)
            if due(step, cfg.eval_every, num_steps):
                run_eval(step)
            if due(step, cfg.checkpoint_every, num_steps):
                save(step, loss_value)
        val_loss = run_eval(step)
        save(step, loss_value)

    final = out_dir / "model"
    summary = {"base_model": str(cfg.model), "data": cfg.data, "steps": num_steps, "seq_len": seq_len,
               "train_conversations": len(train), "dropped_too_long": dropped, "val_conversations": len(val),
               "val_dropped_too_long": val_dropped, "final_val_loss": val_loss, "final_train_loss": loss_value,
               "lora_rank": cfg.lora_rank}
    if cfg.lora_rank:
        summary["adapter"] = str(lora_mod.save_adapter(model, out_dir / "adapter", base_model=str(cfg.model)))
        lora_mod.fold_lora(model)
    save_model_dir(final, model, tokenizer, extra_files=greedy_generation_config())
    if cfg.gold_per_task:
        names = task_names(cfg.tasks if cfg.data == "tasks" else None)
        with autocast:
            gold = gold_accuracy(model, tokenizer, names, cfg.gold_per_task, mode="chat",
                                 max_new_tokens=cfg.gold_max_tokens, seed=cfg.seed)
        summary["gold_accuracy"] = {"mean": gold["accuracy"],
                                    **{name: r["accuracy"] for name, r in gold["tasks"].items()}}
        log.info("gold accuracy on the test split (%d per task, greedy): %s", cfg.gold_per_task,
                 ", ".join(f"{k} {v:.2f}" for k, v in summary["gold_accuracy"].items()))
    atomic_write_json(out_dir / "sft.json", summary)
    plot_loss_curve(metrics.path, out_dir / "loss.png")
    log.info("fine-tuned model: %s", final)
    return final


# ---------------------------------------------------------------------------------------------------------
# Command line


def register(sub) -> None:
    register_config_command(sub, "sft", "supervised fine-tuning on conversations (full or LoRA)",
                            __doc__.splitlines()[0], SFTConfig, PRESETS, sft)
