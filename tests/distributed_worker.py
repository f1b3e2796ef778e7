"""Run under ``torchrun`` by tests/test_distributed.py: a few training steps on each rank, then each rank's
state saved to ``<out>/rank<R>.pt`` for the test to compare.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py steps OUT
    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py nonfinite OUT
    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py epoch OUT DATA REFS

``steps``/``nonfinite``: :meth:`Trainer.train_step` on rank-specific random features (:func:`step_data`;
``nonfinite``: rank 1's first batch is NaN); ``epoch``: one epoch of the real training run on a demo dataset.
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models.resad import ModelConfig, ResAD  # noqa: E402
from utils import distributed  # noqa: E402
from utils.run.config import TrainConfig  # noqa: E402
from utils.run.training import Trainer  # noqa: E402
from utils.seed import seed_everything  # noqa: E402

CHANNELS, SIZES, STEPS = [4, 6], [8, 4], 3
MODEL = ModelConfig(num_embeddings=8, coupling_layers=2, pos_embed_dim=8)
TRAINING = TrainConfig(lr=1e-3)


def step_data(rank: int, step: int, nonfinite: bool = False):
    """The (features, residuals, masks) of rank ``rank``'s batch ``step``: two images, anomalies in one."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    features = [torch.randn(2, c, s, s, generator=generator) for c, s in zip(CHANNELS, SIZES)]
    residuals = [torch.rand(2, c, s, s, generator=generator) for c, s in zip(CHANNELS, SIZES)]
    masks = torch.zeros(2, 1, 32, 32)
    masks[1, :, 8:20, 4:12] = 1.0
    if nonfinite and rank == 1 and step == 0:
        residuals[0][0, 0, 0, 0] = float("nan")
    return features, residuals, masks


def model_and_trainer():
    seed_everything(0)
    model = ResAD(CHANNELS, MODEL).train()
    return model, Trainer(model, TRAINING)


def steps(out: str, nonfinite: bool) -> None:
    ranks = distributed.init("cpu")
    model, trainer = model_and_trainer()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(7 + ranks.rank)
    losses = [trainer.train_step(*step_data(ranks.rank, step, nonfinite), stage2=True, generator=generator)
              for step in range(1 if nonfinite else STEPS)]
    torch.save({"model": model.state_dict(), "initial": initial, "trainer": trainer.state_dict(), "losses": losses,
                "skipped": trainer.guard.skipped}, os.path.join(out, f"rank{ranks.rank}.pt"))


def epoch(out: str, data: str, refs: str) -> None:
    from tests.run_helpers import make_args
    from utils.cli.adapters import run_config
    from utils.run.preflight import TRAIN, prepare
    from utils.run.train_run import TrainingRun

    args = make_args(setting="custom", source_dataset="demo", target_dataset="demo", seen_classes=["stripes", "nut"],
                     unseen_classes=["chip"], train_dataset_dir=data, test_dataset_dir=data, test_ref_feature_dir=refs,
                     num_ref_shot=4, train_ref_shot=2, train_ref_pool=3, backbone="tf_efficientnet_lite0",
                     epochs=1, stage1_epochs=1, batch_size=2, lr=1e-4, num_workers=0, coupling_layers=2,
                     num_embeddings=16, checkpoint_path=os.path.join(out, "ckpt"), device="cpu")
    run = TrainingRun(prepare(run_config(args, [4], {4: "demo"}), TRAIN))
    run.train_epoch(0)
    torch.save({"model": run.model.state_dict(), "trainer": run.trainer.state_dict()},
               os.path.join(out, f"rank{run.ranks.rank}.pt"))


if __name__ == "__main__":
    mode, folder = sys.argv[1], sys.argv[2]
    try:
        if mode == "epoch":
            epoch(folder, sys.argv[3], sys.argv[4])
        else:
            steps(folder, nonfinite=mode == "nonfinite")
    finally:
        distributed.shutdown()
