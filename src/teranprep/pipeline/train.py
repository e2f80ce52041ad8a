"""The train stage: splits/ + features/ -> runs/NAME/ (resolved config, checkpoints, metrics, plot).

Single process, or one process per GPU/CPU rank under torchrun (torch.distributed): each rank
trains on its own slice of every global batch (training.batch_size per rank, hardest negatives
within that slice), gradients are averaged by DistributedDataParallel, rank 0 validates and
writes. Resume replays the same batches and RNG streams, so CPU losses match an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import PrepError
from ..interrupts import DeferredInterrupts, Interrupted, resumable
from ..manifests.atomic import atomic_write_bytes, commit_temp, sha256_file, temp_path_for
from ..manifests.lineage_warnings import emit, features_warnings, merge, recorded_warnings, warning_fields
from ..manifests.values import require_finite_scores, tensors_nonfinite
from ..teran.checkpoint import BEST, CHECKPOINT_FORMAT, LAST
from ..teran.config import dump_config, load_config
from ..manifests.ownership import releases_locks
from ..manifests.remote import lineage_location, mirror_url, with_remote_folders

CHECKPOINT_VERSION = 1


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_rsum: float | None
    last_validation: dict | None = None
    losses: list[float] = field(default_factory=list)
    data_wait: list[float] = field(default_factory=list)  # share of each logged interval

    def summary(self) -> str:
        best = "n/a" if self.best_rsum is None else f"{self.best_rsum:.2f}"
        return f"{self.run_dir}: {self.step} steps, best validation rsum {best}"


def lineage_of(splits_dir: Path, features_dir: Path) -> dict:
    from ..manifests.features import manifest_sha256
    from ..manifests.splits import caption_rule_of, read_splits_manifest
    return {"splits": lineage_location(splits_dir),
            "splits_manifest_sha256": sha256_file(Path(splits_dir) / "manifest.json"),
            "features": lineage_location(features_dir),  # a URL (or its mirror) by its URL
            "features_manifest_sha256": manifest_sha256(features_dir),
            # search normalises queries by the rule these captions were (tokenizers/text.py)
            "caption_rule": caption_rule_of(read_splits_manifest(splits_dir))}


def lr_factor(step: int, steps_per_epoch: int, t: dict) -> float:
    """Linear warm-up over training.warmup_iters, then x lr_decay every lr_decay_epochs epochs."""
    factor = t["lr_decay"] ** ((step // steps_per_epoch) // t["lr_decay_epochs"]) if t["lr_decay_epochs"] else 1.0
    if t["warmup_iters"] and step < t["warmup_iters"]:
        factor *= (step + 1) / t["warmup_iters"]
    return factor


def make_optimizer(model: torch.nn.Module, t: dict, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of a run (benchmarks/bench_train.py times the step with this one too).

    Adam; on CPU torch's fused kernel: one pass over parameter, gradient and both moments per
    step instead of one per elementwise op (teran_coco's 212M parameters: ~1.6 s a step instead
    of ~3.8 s on a 2-core Ice Lake), the same update to float rounding.
    """
    return torch.optim.Adam(model.parameters(), lr=t["lr"], fused=device.type == "cpu" or None)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    tmp = temp_path_for(Path(path))
    torch.save(payload, tmp)
    commit_temp(tmp, Path(path))


def load_checkpoint(path: Path) -> dict:
    from ..safe_torch import load_torch_file
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: checkpoint not found")
    ckpt = load_torch_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise PrepError(f"{path}: not a teranprep TERAN checkpoint; original TERAN checkpoints "
                        "(model_best_rsum.pth.tar) go through `prep eval` directly or "
                        "teranprep.teran.reference_import")
    return ckpt


def config_differences(given: dict, recorded: dict, prefix: str = "") -> list[str]:
    """"key: recorded -> given" for every setting that differs (training.precision excepted: a
    resumed run keeps its own, and --precision is checked on its own)."""
    found = []
    for key in sorted(set(given) | set(recorded)):
        name = f"{prefix}{key}"
        a, b = recorded.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(b, a, f"{name}.")
        elif a != b and name != "training.precision":
            found.append(f"{name}: {a!r} -> {b!r}")
    return found


def _val_split_warnings(splits_dir: Path, n_images: int) -> list[str]:
    """What a val split too small to validate on means for the run (warnings, not refusals)."""
    where = Path(splits_dir) / "val.parquet"
    if n_images == 0:
        return [f"{where} is empty: training runs without validation (no {BEST}, no rsum); "
                "rebuild the splits with --val N to select a best checkpoint"]
    if n_images == 1:
        return [f"{where} has 1 image: every validation ranks it first (R@1 100), so best-checkpoint "
                "selection is meaningless; rebuild the splits with a larger --val"]
    return []


def refuse_long_captions(splits_dir: Path, split, positions: int) -> None:
    """One line when a caption of `split` is longer than the text encoder's position embeddings
    (the encoder would fail on it mid-run); the fix is build-splits --max-tokens."""
    lengths = split.captions["input_ids"].map(len)
    if len(lengths) and int(lengths.max()) > positions:
        row = int(lengths.to_numpy().argmax())
        raise PrepError(f"{Path(splits_dir) / (split.name + '.parquet')}: caption_id "
                        f"{int(split.captions['caption_id'].iloc[row])} has {int(lengths.max())} tokens, "
                        f"the text encoder has {positions} positions; rebuild the splits with "
                        f"`prep build-splits --max-tokens {positions}` (or lower)")


def _all_finite(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite on this rank (and, under torchrun, on every rank)."""
    finite = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
    if distributed:
        import torch.distributed as dist
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _resolve_device(device: str, local_rank: int) -> torch.device:
    from ..devices import resolve_device
    return torch.device(resolve_device(device, local_rank=local_rank))


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops records past the checkpoint a resumed run restarts from (they will be redone)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text("utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode("utf-8"))


def plot_validation(metrics_path: Path, out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(l) for l in metrics_path.read_text("utf-8").splitlines() if l.strip()]
    val = [r for r in records if r.get("kind") == "val"]
    if not val:
        return
    steps = [r["step"] for r in val]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, [r["rsum"] for r in val], marker="o")
    ax1.set_title("validation rsum")
    for d in ("i2t", "t2i"):
        for k in ("r1", "r5", "r10"):
            ax2.plot(steps, [r[d][k] for r in val], label=f"{d} {k.upper()}")
    ax2.set_title("validation recall (%)")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
    fig.tight_layout()
    tmp = temp_path_for(Path(out_png))
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    commit_temp(tmp, Path(out_png))


def validate(model, split, store, config: dict, device) -> dict:
    from ..teran.metrics import retrieval_metrics
    from ..teran.scoring import encode_split, model_score_matrix
    t = config["training"]
    precision = t.get("precision", "fp32")
    encoded = encode_split(model, split, store, batch_size=max(t["batch_size"], 32), device=device,
                           max_regions=t["max_regions"], precision=precision)
    scores = model_score_matrix(model, encoded, device=device, precision=precision)
    require_finite_scores(scores, what="validation", hint="the model's weights or the val "
                          "features hold NaN/inf; check the features with `prep verify FEATURES --full`")
    return retrieval_metrics(scores, split.caption_image)


@with_remote_folders(inputs=("splits_dir",), outputs={"out": None})
@releases_locks
def train(splits_dir: Path, config, out: Path, *, resume: bool = False, features: Path | None = None,
          device: str = "auto", stop_after: int | None = None, precision: str | None = None,
          echo=print) -> TrainResult:
    """Trains TERAN on splits_dir's train split, validating on its val split, into `out`.

    `config` is a YAML path, a bundled config name or a dict. `stop_after` ends the run after that
    many steps (saving the last checkpoint), as an interruption would; `resume` continues it.
    `precision` (fp32 | bf16) overrides training.precision; it is part of the run's config, so a
    resume with another precision is refused.
    """
    from ..teran.precision import check_precision
    if precision is not None:
        check_precision(precision)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ..teran.alignment import hinge_loss
    from ..teran.data import EpochBatchSampler, PairDataset, load_split, make_loader, open_features
    from ..teran.model import build_model

    splits_dir, out = Path(splits_dir), Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and mirror_url(out):
        raise PrepError(f"{mirror_url(out)}: a run under torchrun writes to a local (or shared) "
                        "folder only; train into one and copy the run up")
    dev = _resolve_device(device, local_rank)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    is_main = rank == 0

    if is_main:
        from ..manifests.ownership import RUN, claim_output_dir
        claim_output_dir(out, RUN, create=False)  # never a features/ or splits/ folder, nor a file
    last_path = out / LAST
    ckpt = None
    if resume:
        if not last_path.is_file():
            raise PrepError(f"{last_path}: nothing to resume; run `prep train` without --resume first")
        ckpt = load_checkpoint(last_path)
        if config is not None:  # --config with --resume: it must be the run's own
            changed = config_differences(load_config(config), ckpt["config"])
            if changed:
                raise PrepError(f"{out}: --config differs from the config this run was trained with "
                                f"({'; '.join(changed[:5])}{'; ...' if len(changed) > 5 else ''}); "
                                "resume without --config (the run's own is used) or start a new run "
                                "in another --out")
        config = ckpt["config"]
        run_precision = config["training"].get("precision", "fp32")
        if precision is not None and precision != run_precision:
            raise PrepError(f"{out}: this run trains in {run_precision}; --precision {precision} "
                            "would change its numbers mid-run. Resume without --precision, or "
                            "start a new run in another --out")
    else:
        config = load_config(config)
        if precision is not None:
            config["training"]["precision"] = precision
        if last_path.exists():
            raise PrepError(f"{out}: already holds a run; pass --resume to continue it or choose "
                            "another --out")
    t = config["training"]

    store = open_features(splits_dir, features)  # refuses mismatched lineage
    lineage = lineage_of(splits_dir, store.root)
    warnings = merge(features_warnings(store.root, store.manifest),
                     recorded_warnings(ckpt["lineage"] if ckpt is not None else None))
    emit("train", warnings)
    lineage.update(warning_fields(warnings))  # lineage.json and every checkpoint carry it
    if ckpt is not None and ckpt["lineage"]["splits_manifest_sha256"] != lineage["splits_manifest_sha256"]:
        raise PrepError(f"{splits_dir / 'manifest.json'}: differs from the splits {last_path} was "
                        "trained on; resume with the same splits or start a new run")
    feature_dim = store.feature_dim
    if config["image"]["feature_dim"] not in (None, feature_dim):
        raise PrepError(f"{store.root}: features are {feature_dim}-d but the config says "
                        f"image.feature_dim={config['image']['feature_dim']}")
    train_split = load_split(splits_dir, "train", store)
    val_split = load_split(splits_dir, "val", store, max_images=t["val_max_images"])
    validating = len(val_split.image_keys) > 0
    if is_main:
        emit("train", _val_split_warnings(splits_dir, len(val_split.image_keys)))

    if dev.type == "cpu":  # the same activations every step: reuse their buffers (7-8% a step here)
        from .common.distribute import keep_freed_buffers
        keep_freed_buffers()
    torch.manual_seed(t["seed"])
    np.random.seed(t["seed"])
    random.seed(t["seed"])
    model = build_model(config, feature_dim).to(dev)
    for split in (train_split, val_split):
        refuse_long_captions(splits_dir, split, model.text_encoder.config.max_position_embeddings)
    optimizer = make_optimizer(model, t, dev)
    sampler = EpochBatchSampler(len(train_split.captions), t["batch_size"], t["seed"], rank, world)
    steps_per_epoch = sampler.steps_per_epoch()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, t))
    run_precision = t.get("precision", "fp32")
    # bf16 needs no loss scaling; float16 autocast (training.amp) is CUDA's fp32-precision option.
    use_amp = bool(t["amp"]) and dev.type == "cuda" and run_precision == "fp32"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step, best_rsum = 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best_rsum = int(ckpt["step"]), ckpt["best_rsum"]
        _set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])

    metrics_path = out / "metrics.jsonl"
    if is_main:
        claim_output_dir(out, RUN)  # created here, after the inputs were checked; writable; locked
        if ckpt is None and last_path.exists():  # another run finished here while we read inputs
            raise PrepError(f"{out}: already holds a run; pass --resume to continue it or choose "
                            "another --out")
        if ckpt is None:
            atomic_write_bytes(out / "config.yaml", dump_config(config).encode("utf-8"))
            metrics_path.write_text("", encoding="utf-8")
            (out / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n", encoding="utf-8")
        else:
            _truncate_metrics(metrics_path, step)

    train_model = (DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
                   if distributed else model)
    pin = t.get("pin_memory", "auto")
    loader = make_loader(PairDataset(train_split, store, t["max_regions"]), batch_sampler=sampler,
                         num_workers=t["num_workers"], prefetch_factor=t.get("prefetch_factor", 2),
                         pin_memory=dev.type == "cuda" if pin == "auto" else bool(pin))
    total_steps = steps_per_epoch * t["epochs"]
    stop_at = min(total_steps, stop_after) if stop_after is not None else total_steps
    result = TrainResult(out, step, best_rsum)
    last_saved = [step]  # the step of the checkpoint in LAST (0: none yet)

    def gather_rng():
        if not distributed:
            return [_rng_state()]
        states = [None] * world
        dist.all_gather_object(states, _rng_state())
        return states

    def checkpoint(name_paths, validation):
        rng = gather_rng()  # collective: every rank takes part
        if not is_main:
            return
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
                   "best_rsum": result.best_rsum, "rng": rng, "config": config,
                   "lineage": lineage, "feature_dim": feature_dim, "validation": validation,
                   "text_config": model.text_encoder.config.to_dict()}
        for path in name_paths:
            save_checkpoint(path, payload)
        if out / LAST in name_paths:
            last_saved[0] = step

    def validate_and_save():
        if not validating:  # an empty val split: nothing to select a best checkpoint by
            checkpoint([out / LAST], None)
            return
        validation = None
        if is_main:
            validation = validate(model, val_split, store, config, dev)
            record = {"kind": "val", "step": step, "epoch": step // steps_per_epoch, **validation,
                      **warning_fields(warnings)}
            _append_jsonl(metrics_path, record)
            echo(f"step {step}: val rsum {validation['rsum']:.2f} "
                 f"(i2t R@1 {validation['i2t']['r1']:.1f}, t2i R@1 {validation['t2i']['r1']:.1f})")
            result.last_validation = validation
        if distributed:
            holder = [validation]
            dist.broadcast_object_list(holder, src=0)
            validation = holder[0]
        improved = result.best_rsum is None or validation["rsum"] > result.best_rsum
        if improved:
            result.best_rsum = validation["rsum"]
        checkpoint([out / LAST] + ([out / BEST] if improved else []), validation)
        if is_main:
            plot_validation(metrics_path, out / "validation.png")
        train_model.train()

    from ..teran.precision import autocast

    def step_autocast():
        if run_precision == "bf16":
            return autocast(dev, "bf16")
        return torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp)

    # Data wait: the time from asking the loader for a batch to having it on the device, as a
    # share of the whole step (wait + forward + backward + update), per logging interval.
    timing = {"waited": 0.0, "stepped": 0.0, "steps": 0}

    def record_timing(t_fetch, t_ready):
        timing["waited"] += t_ready - t_fetch
        timing["stepped"] += time.perf_counter() - t_fetch
        timing["steps"] += 1

    def timing_fields():
        share = timing["waited"] / timing["stepped"] if timing["stepped"] > 0 else 0.0
        fields = {"data_wait_share": round(share, 4), "precision": run_precision,
                  "step_s": round(timing["stepped"] / max(1, timing["steps"]), 4)}
        result.data_wait.append(share)
        timing.update(waited=0.0, stepped=0.0, steps=0)
        return fields

    # Between validations: loss, steps/s and ETA every PROGRESS_SECONDS (also off a terminal).
    from .common.progress import duration, progress_seconds
    pace = {"every": progress_seconds(), "t0": time.monotonic(), "step0": step}
    pace["last"] = pace["t0"]

    def progress_line(loss_value):
        now = time.monotonic()
        if now - pace["last"] < pace["every"] or now <= pace["t0"]:
            return
        pace["last"] = now
        rate = (step - pace["step0"]) / (now - pace["t0"])
        eta = duration((stop_at - step) / rate) if rate > 0 else "?"
        echo(f"step {step}/{stop_at}: loss {loss_value:.4f}, {rate:.2f} steps/s, ETA {eta}")

    def _train_loop(pending):
        nonlocal step
        while step < stop_at:
            epoch, start_batch = divmod(step, steps_per_epoch)
            sampler.set_position(epoch, start_batch)
            t_fetch = time.perf_counter()
            for batch in loader:
                batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
                t_ready = time.perf_counter()
                with step_autocast():
                    scores = train_model(batch)
                loss = hinge_loss(scores.float(), t["margin"])
                if not _all_finite(loss, distributed):
                    # Nothing of this step was applied: the model still holds `step` good steps.
                    stop_on_nonfinite_loss(batch)
                scaler.scale(loss).backward()
                if t["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
                lr_used = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                # Freed now, not before the next backward: the next forward's activations then
                # reuse the gradients' memory instead of adding to it (teran_coco: 0.85 GB).
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                loss_value = float(loss.detach())  # also waits for the device: the step is done
                record_timing(t_fetch, t_ready)
                result.losses.append(loss_value)
                if is_main and (step % t["log_every"] == 0 or step == 1):
                    _append_jsonl(metrics_path, {"kind": "train", "step": step, "epoch": epoch,
                                                 "loss": loss_value, "lr": lr_used, **timing_fields()})
                if is_main:
                    progress_line(loss_value)
                if step % t["val_every"] == 0 or step == total_steps:
                    validate_and_save()
                elif step == stop_at or (t["checkpoint_every"] and step % t["checkpoint_every"] == 0):
                    checkpoint([out / LAST], None)
                if step >= stop_at:
                    break
                pending.check()  # an interrupt lands here, between whole steps
                t_fetch = time.perf_counter()  # validation and checkpoints are not data wait

    def stop_on_nonfinite_loss(batch):
        inputs_bad = [name for name in ("features", "boxes", "sizes")
                      if name in batch and batch[name].is_floating_point()
                      and not torch.isfinite(batch[name]).all()]
        weights_bad = tensors_nonfinite(model.state_dict().items())
        # (single process only: last_saved is rank 0's, and a checkpoint is a collective)
        if not distributed and not weights_bad and step > last_saved[0]:
            checkpoint([out / LAST], None)  # the last good state, resumable
        cause = (f"this batch's {'/'.join(inputs_bad)} hold NaN/inf: check the features with "
                 f"`prep verify {store.root} --full`" if inputs_bad else
                 f"the model's weights hold NaN/inf ({weights_bad[0]}, ...)" if weights_bad else
                 "the model diverged: lower training.lr or training.grad_clip in the config")
        kept_line = (f"last good checkpoint (step {last_saved[0]}) kept in {out / LAST}"
                     if last_saved[0] else "no checkpoint was written")
        raise PrepError(f"{out}: the loss is non-finite at step {step + 1}; likely cause: {cause}; "
                        f"training stopped, {kept_line}")

    def kept():
        return (f"a resumable checkpoint at step {last_saved[0]} of {stop_at} is in {out / LAST}"
                if last_saved[0] else f"no step was completed in {out}")

    train_model.train()
    with resumable(kept):
        try:
            with DeferredInterrupts() as pending:
                try:
                    _train_loop(pending)
                except Exception:
                    if pending.signum is None:
                        raise
                    # the same signal reached the loader's worker processes (a process group's
                    # SIGTERM); their death between two steps is the interrupt, not a failure
                    raise Interrupted(pending.signum) from None
        except (Interrupted, KeyboardInterrupt):
            # Interrupts land between whole steps (DeferredInterrupts), so the model and optimizer
            # hold exactly `step` steps of training: saved, this resumes like any other checkpoint.
            if not distributed and step > last_saved[0]:
                checkpoint([out / LAST], None)
            raise
    result.step = step
    store.close()
    if distributed:
        dist.barrier()
    return result

