"""DistributedDataParallel on CPU (gloo): two processes train exactly like one.

The spawned workers (2 processes, one thread each) run every distributed scenario in one go, to
pay for process start-up and imports once, and hand their results back as files (torch.save
into tmp_path; queues between spawned processes are fragile under pytest). The parent
process compares them with single-process references.

`test_cli_torchrun_end_to_end` runs the real `python -m torch.distributed.run ... -m centerx
train` (what `NPROC=2 bash run.sh train` executes).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from centerx import errors
from centerx.data.base import ImageReadError
from centerx.data.pipeline import TrainingDataset, build_loader, collate
from centerx.data.synthetic import SyntheticShapes
from centerx.engine.trainer import Trainer
from centerx.losses.centernet_loss import CenterNetLoss
from centerx.losses.weighting import AdaptiveMagnitudeWeights, FixedWeights
from centerx.model.centernet import build_model
from centerx.model.checkpoint import load_checkpoint, to_plain
from centerx.objectives.supervised import SupervisedObjective

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
PER_RANK = 4
IMAGE_SIZE = 64  # the smallest multiple of the backbone stride that keeps every stage non-empty
CLASSES = ["circle", "square", "triangle"]
SPAWN_TIMEOUT_S = 240  # a hang (one rank waiting in a collective forever) fails instead of blocking


# ---------------------------------------------------------------------------------------------
# Shared by the workers and the parent
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model() -> torch.nn.Module:
    """The real tiny CenterNet, initialised identically in every process."""
    torch.manual_seed(0)
    cfg = OmegaConf.load(REPO / "conf" / "model" / "centernet.yaml")
    cfg.backbone = "tiny"
    return build_model(cfg, len(CLASSES))


def loss_weights() -> dict[str, float]:
    return dict(OmegaConf.load(REPO / "conf" / "loss" / "fixed.yaml").weighter.weights)


def total_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    terms = CenterNetLoss()(model(batch["image"]), batch)
    return FixedWeights(loss_weights())(terms)[0]


def equal_count_shards() -> list[list[int]]:
    """Image indices for each rank such that every shard holds the same number of heatmap
    positives and of objects (masked regression targets).

    Why: the focal loss is divided by the number of positives *in the batch it sees* and the L1
    terms by the number of objects. DDP averages the per-rank gradients, i.e. it optimises the
    mean of the per-rank losses; that equals the loss of the full batch exactly when every rank
    sees the same counts (up to the 1e-4 added to the L1 denominator: a relative 1e-6).
    Images are picked in groups of WORLD with identical counts; rank r takes the r-th of each.
    """
    dataset = TrainingDataset(
        SyntheticShapes(num_images=24, seed=0, image_size=IMAGE_SIZE), IMAGE_SIZE, augment=None
    )
    groups: dict[tuple[int, int], list[int]] = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        key = (int((sample["heatmap"] == 1).sum()), int(sample["mask"].sum()))
        groups.setdefault(key, []).append(index)
    chosen = [members[:WORLD] for members in groups.values() if len(members) >= WORLD]
    assert len(chosen) >= PER_RANK, "not enough images with matching counts"
    return [[group[rank] for group in chosen[:PER_RANK]] for rank in range(WORLD)]


def shard_batch(rank: int) -> dict:
    dataset = TrainingDataset(
        SyntheticShapes(num_images=24, seed=0, image_size=IMAGE_SIZE), IMAGE_SIZE, augment=None
    )
    return collate([dataset[i] for i in equal_count_shards()[rank]])


def tiny_meta() -> dict:
    """What a checkpoint of these runs records about the model."""
    return to_plain(
        {
            "class_names": CLASSES,
            "model_config": {"backbone": "tiny"},
            "image_size": IMAGE_SIZE,
            "config": {},
        }
    )


def rank_loader(source: SyntheticShapes, shuffle: bool = True) -> torch.utils.data.DataLoader:
    """This rank's share of `source`, PER_RANK images a batch."""
    dataset = TrainingDataset(source, IMAGE_SIZE, augment=None)
    return build_loader(dataset, PER_RANK, shuffle=shuffle, distributed=True, drop_last=True)


def params_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def train_cfg(**overrides):
    cfg = OmegaConf.load(REPO / "conf" / "train" / "default.yaml")
    cfg.seed = 0  # `${seed}` points at the root config, absent here
    cfg.merge_with(
        {"epochs": 2, "progress": False, "warmup_epochs": 0, "log_every": 1, "eval_every": 1}
    )
    cfg.merge_with(overrides)
    return cfg


# ---------------------------------------------------------------------------------------------
# The distributed worker
# ---------------------------------------------------------------------------------------------


class NaNOnOneRank:
    """The supervised objective, except that rank `bad_rank` returns NaN at call `bad_call`."""

    def __init__(self, rank: int, bad_rank: int, bad_call: int) -> None:
        self.inner = SupervisedObjective(CenterNetLoss())
        self.rank, self.bad_rank, self.bad_call = rank, bad_rank, bad_call
        self.calls = 0

    def __call__(self, model, batch):
        terms = self.inner(model, batch)
        self.calls += 1
        if self.rank == self.bad_rank and self.calls == self.bad_call:
            terms = {**terms, "cls": terms["cls"] * float("nan")}
        return terms


def _gradient_scenario(rank: int, out_dir: Path) -> None:
    # BatchNorm in training mode normalises with the statistics of the batch each process
    # sees (there is no SyncBatchNorm on gloo), so a half batch gives different activations
    # than the full batch. model.eval() makes BN use its (identical) running statistics: every
    # sample is then processed independently and gradients still flow through all layers.
    model = tiny_model().eval()
    ddp = DistributedDataParallel(model)
    loss = total_loss(ddp, shard_batch(rank))
    loss.backward()
    torch.save(
        {
            "loss": loss.detach(),
            "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        },
        out_dir / f"grads_rank{rank}.pt",
    )


def _trainer_scenario(rank: int, out_dir: Path) -> None:
    """The real Trainer under DDP: rank 1 alone meets a NaN loss; EMA and evaluation on."""
    run_dir = out_dir / "run"
    source = SyntheticShapes(num_images=16, seed=0, class_names=CLASSES, image_size=IMAGE_SIZE)
    loader = rank_loader(source)
    evaluated: list[dict] = []

    def evaluate(model: torch.nn.Module) -> dict:
        # What each rank would predict its share of the val images with.
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"AP": 0.1 * len(evaluated), "AP50": 0.2}

    cfg = train_cfg(ema=True, ema_decay=0.9, max_bad_steps=3)
    # 16 images / (2 ranks x 4) = 2 steps per epoch; the 3rd step (epoch 2) is bad on rank 1.
    objective = NaNOnOneRank(rank, bad_rank=1, bad_call=3)
    trainer = Trainer(
        tiny_model(),
        objective,
        FixedWeights(loss_weights()),
        loader,
        cfg,
        run_dir,
        tiny_meta(),
        evaluate=evaluate,
    )
    trainer.fit()
    # Rank 0 writes the checkpoints; the trainer's barrier means every rank may read them now.
    visible = {
        name: load_checkpoint(run_dir / "checkpoints" / name)["epoch"]
        for name in ("last.pt", "best.pt")
    }
    optimizer_steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    torch.save(
        {
            "params": params_of(trainer),
            "evaluated": evaluated,
            "visible": visible,
            "optimizer_steps": optimizer_steps,
            "global_step": trainer.global_step,
            "calls": objective.calls,
        },
        out_dir / f"trainer_rank{rank}.pt",
    )


class ZeroSizeTermOnOneRank:
    """The supervised objective, except that rank 1's wh term is 0 at its 2nd call (what a
    batch without objects gives): the adaptive weighter skips it on that rank only."""

    def __init__(self, rank: int) -> None:
        self.inner = SupervisedObjective(CenterNetLoss())
        self.rank, self.calls = rank, 0

    def __call__(self, model, batch):
        terms = self.inner(model, batch)
        self.calls += 1
        if self.rank == 1 and self.calls == 2:
            terms = {**terms, "wh": terms["wh"] * 0.0}
        return terms


def _skipped_term_scenario(rank: int, out_dir: Path) -> None:
    """Adaptive weighter under DDP: a term skipped on one rank must neither hang the ranks nor
    let their weights drift apart (its head gets a zero gradient there)."""
    source = SyntheticShapes(num_images=16, seed=0, class_names=CLASSES, image_size=IMAGE_SIZE)
    loader = rank_loader(source)
    targets = OmegaConf.load(REPO / "conf" / "loss" / "adaptive.yaml").weighter.targets
    objective = ZeroSizeTermOnOneRank(rank)
    trainer = Trainer(
        tiny_model(),
        objective,
        AdaptiveMagnitudeWeights(dict(targets)),
        loader,
        train_cfg(eval_every=100),
        out_dir / "skipped_run",
        tiny_meta(),
    )
    trainer.fit()
    torch.save(
        {
            "params": params_of(trainer),
            "global_step": trainer.global_step,
            "calls": objective.calls,
        },
        out_dir / f"skipped_rank{rank}.pt",
    )


class UnreadableOdd(SyntheticShapes):
    """Synthetic images whose odd indices fail to read like corrupt files."""

    def load(self, index: int):
        if index % 2:
            raise ImageReadError(f"broken_{index}.jpg: not a decodable image")
        return super().load(index)


def _unreadable_scenario(rank: int, out_dir: Path) -> None:
    """Without shuffling, rank 1's shard is the odd indices: every image of its batches is
    unreadable (before: an empty batch there, `continue`, and rank 0 waiting in the gradient
    all-reduce forever). Each is replaced by the next readable image: both ranks take every step."""
    source = UnreadableOdd(num_images=16, seed=0, class_names=CLASSES, image_size=IMAGE_SIZE)
    loader = rank_loader(source, shuffle=False)
    trainer = Trainer(
        tiny_model(),
        SupervisedObjective(CenterNetLoss()),
        FixedWeights(loss_weights()),
        loader,
        train_cfg(eval_every=100),
        out_dir / "unreadable_run",
        tiny_meta(),
    )
    trainer.fit()
    torch.save(
        {
            "params": params_of(trainer),
            "global_step": trainer.global_step,
            "skipped": trainer.skipped_images,
            "optimizer_steps": {
                int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()
            },
        },
        out_dir / f"unreadable_rank{rank}.pt",
    )


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        _gradient_scenario(rank, Path(out_dir))
        _trainer_scenario(rank, Path(out_dir))
        _skipped_term_scenario(rank, Path(out_dir))
        _unreadable_scenario(rank, Path(out_dir))
    finally:
        torch_dist.destroy_process_group()


class FailsOnRank1:
    """The supervised objective; rank 1 raises at its 2nd call (say, its data failed)."""

    def __init__(self, rank: int, out_dir: Path) -> None:
        self.inner = SupervisedObjective(CenterNetLoss())
        self.rank, self.out_dir, self.calls = rank, out_dir, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.rank == 1 and self.calls == 2:
            (self.out_dir / "rank1_failed_at").write_text(str(time.time()))
            raise RuntimeError("rank 1 fails")
        return self.inner(model, batch)


def _dead_rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 dies in the middle of training; rank 0 records what it sees, and when.
    The process group's timeout is long (600 s): only the dead peer's closed connection can
    end rank 0's wait quickly."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    out = Path(out_dir)
    source = SyntheticShapes(num_images=32, seed=0, class_names=CLASSES, image_size=IMAGE_SIZE)
    loader = rank_loader(source)
    trainer = Trainer(
        tiny_model(), FailsOnRank1(rank, out), FixedWeights(loss_weights()), loader,
        train_cfg(epochs=20, eval_every=100), out / "dead_rank_run", tiny_meta(),
    )  # fmt: skip
    try:
        trainer.fit()
    except Exception as err:
        if rank == 0:
            (out / "rank0_saw").write_text(f"{time.time()}\n{errors.describe(err).line}")
        raise


def run_workers(worker, out_dir: Path, join: bool = True) -> None:
    """WORLD spawned processes running worker(rank, WORLD, port, out_dir), waited for; the test
    fails after SPAWN_TIMEOUT_S (a hang). join=True re-raises a worker's exception with its
    traceback (context.join); join=False only waits for every process to end (context.join
    would terminate the others as soon as one failed)."""
    context = mp.start_processes(
        worker,
        args=(WORLD, free_port(), str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while True:
        if join and context.join(timeout=5):
            return
        if not join and not any(p.is_alive() for p in context.processes):
            return
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {SPAWN_TIMEOUT_S} s (a hang?)")
        time.sleep(0 if join else 0.2)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ddp")
    run_workers(_worker, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def dead_rank(tmp_path_factory) -> Path:
    """Two ranks, rank 1 dies mid-training; both processes have ended."""
    out_dir = tmp_path_factory.mktemp("dead_rank")
    run_workers(_dead_rank_worker, out_dir, join=False)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_ddp_gradient_equals_single_process_full_batch(ddp_results: Path) -> None:
    """DDP (2 processes x 4 images) gives the gradient of one process on all 8 images.

    The comparison is against the *full-batch* loss: the shards are built with equal positive
    and object counts (see equal_count_shards), which makes the mean of the per-rank losses
    (what DDP optimises) equal to the full-batch loss.
    """
    ranks = [torch.load(ddp_results / f"grads_rank{r}.pt") for r in range(WORLD)]
    shards = [shard_batch(r) for r in range(WORLD)]
    assert len({int((s["heatmap"] == 1).sum()) for s in shards}) == 1
    assert len({int(s["mask"].sum()) for s in shards}) == 1

    torch.set_num_threads(1)
    full = {key: torch.cat([s[key] for s in shards]) for key in shards[0] if key != "num_skipped"}
    model = tiny_model().eval()  # eval: BatchNorm statistics do not depend on the batch
    loss = total_loss(model, full)
    loss.backward()
    reference = {name: p.grad for name, p in model.named_parameters()}

    # The precondition, checked: the full-batch loss is the mean of the per-rank losses.
    torch.testing.assert_close(loss.detach(), (ranks[0]["loss"] + ranks[1]["loss"]) / 2)
    assert set(ranks[0]["grads"]) == set(reference)
    for name, grad in reference.items():
        # All-reduce leaves bit-identical gradients on every rank ...
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        # ... equal to the single-process gradient up to float summation order.
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Sensitivity: one rank's own (un-averaged) gradient is clearly different.
    half = tiny_model().eval()
    total_loss(half, shards[0]).backward()
    diffs = [
        float((p.grad - reference[n]).abs().max() / reference[n].abs().max().clamp(min=1e-12))
        for n, p in half.named_parameters()
    ]
    assert max(diffs) > 1e-2


def test_ddp_trainer_ranks_stay_in_lockstep(ddp_results: Path) -> None:
    """Under DDP, through the real Trainer:

    - a NaN loss on ONE rank makes every rank skip that step (no hang in the gradient
      all-reduce, no divergence): identical weights on both ranks and 4 - 1 optimizer steps;
    - every rank evaluates rank 0's model, BatchNorm running statistics and EMA included
      (each rank updates its own statistics from its own batches; without syncing them before
      evaluation, each rank would predict its share of the val images with a different model);
    - checkpoints written by rank 0 are readable by every rank as soon as fit() returns.
    """
    ranks = [torch.load(ddp_results / f"trainer_rank{r}.pt") for r in range(WORLD)]
    for state in ranks:
        assert state["global_step"] == 4 and state["calls"] == 4
        assert state["optimizer_steps"] == {3}  # the NaN step was skipped on both ranks
        assert state["visible"] == {"last.pt": 2, "best.pt": 2}
    # Parameters only: the training model's BatchNorm running statistics legitimately differ
    # (each rank's last forward updated them; DDP re-broadcasts rank 0's at the next forward).
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert len(ranks[0]["evaluated"]) == len(ranks[1]["evaluated"]) == 2  # eval_every=1
    for epoch, (ours, theirs) in enumerate(
        zip(ranks[0]["evaluated"], ranks[1]["evaluated"], strict=True)
    ):
        for name, value in ours.items():
            assert torch.equal(value, theirs[name]), f"epoch {epoch + 1}: {name}"
    saved = torch.load(ddp_results / "run" / "checkpoints" / "last.pt", weights_only=True)
    for name, value in saved["ema"].items():  # the EMA copy was evaluated and saved
        assert torch.equal(value, ranks[0]["evaluated"][-1][name]), name


@pytest.mark.slow
def test_cli_torchrun_end_to_end(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m centerx train`: trains, only rank 0 writes, and the
    evaluation covers every val image once (7 images: shards of 4 and 3, no padding repeats)."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "centerx", "train",
        "train.epochs=1", "data.train.num_images=32", "data.val.num_images=7",
        "train.batch_size=8", "train.progress=false", "train.num_threads=1", "train.log_every=1",
        "data.num_workers=0", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    # Only rank 0 writes: one record per step/epoch/eval (two writers would duplicate them),
    # and no temporary checkpoint files.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    # batch_size is global: 32 images / (2 ranks x 4) = 4 steps.
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    assert kinds.count("epoch") == 1 and kinds.count("eval") == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (last["epoch"], last["global_step"]) == (1, 4)
    assert (run_dir / "curves.png").is_file() and (run_dir / "samples.png").is_file()

    # eval.json (predictions of both ranks, gathered) == one process evaluating best.pt alone.
    metrics = json.loads((run_dir / "eval.json").read_text())
    from centerx.engine.evaluate import evaluate_predictor, torch_predictor
    from centerx.model.checkpoint import model_from_checkpoint

    torch.set_num_threads(1)
    model, _ = model_from_checkpoint(run_dir / "checkpoints" / "best.pt")
    val = SyntheticShapes(num_images=7, seed=1, class_names=CLASSES, image_size=128)
    single = evaluate_predictor(torch_predictor(model, k=100), val, 128, 32, progress=False)
    # Padding the 3-image shard to 4 (DistributedSampler) would score one image twice.
    assert metrics["num_detections"] == single["num_detections"] > 0
    for key in ("AP", "AP50", "AP75"):
        assert metrics[key] == pytest.approx(single[key], abs=1e-6)
    # The evaluation during training (stored in last.pt) saw the same model as eval.json.
    assert last["metrics"]["num_detections"] == metrics["num_detections"]
    assert last["metrics"]["AP"] == pytest.approx(metrics["AP"], abs=1e-6)


def test_ddp_term_skipped_on_one_rank_keeps_ranks_in_step(ddp_results: Path) -> None:
    """Rank 1's wh term is zero in one step; the adaptive weighter skips it there only. Both
    ranks finish every step (no hang in the gradient all-reduce) with identical weights."""
    ranks = [torch.load(ddp_results / f"skipped_rank{r}.pt") for r in range(WORLD)]
    assert [r["global_step"] for r in ranks] == [4, 4]  # 2 epochs x 2 steps, none lost
    assert [r["calls"] for r in ranks] == [4, 4]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert any(
        not torch.equal(value, tiny_model().state_dict()[name])
        for name, value in ranks[0]["params"].items()
        if name.startswith("head")
    ), "the heads never moved"


def test_ddp_unreadable_images_on_one_rank_keep_ranks_in_step(ddp_results: Path) -> None:
    """Every image of rank 1's batches is unreadable: both ranks still take all 4 steps (2
    epochs x 2), with identical weights; rank 1 counted its 8 skips per epoch."""
    ranks = [torch.load(ddp_results / f"unreadable_rank{r}.pt") for r in range(WORLD)]
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert [r["optimizer_steps"] for r in ranks] == [{4}, {4}]
    assert [r["skipped"] for r in ranks] == [0, 16]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name


def test_ddp_dead_rank_ends_the_others_within_seconds(dead_rank: Path) -> None:
    """Rank 1 raises mid-training; rank 0, waiting in the gradient all-reduce, sees its closed
    connection at once (not after the 600 s timeout) and reports it as one line."""
    failed_at = float((dead_rank / "rank1_failed_at").read_text())
    saw_at, line = (dead_rank / "rank0_saw").read_text().split("\n", 1)
    assert float(saw_at) - failed_at < 20
    assert line == (
        "centerx: error: another training process stopped (its own error is printed above)"
    )
