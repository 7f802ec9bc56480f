"""PyTorch Lightning on a GPU node, as a user writes it: Trainer(accelerator="gpu", devices=-1)
with the DDP or FSDP strategy, Lightning's own Timer callback for the time the fit took.
Run by tests/ray/test_gpu_programs.py under `relay launch`."""

import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from torch import nn

strategy = sys.argv[1] if len(sys.argv) > 1 else "ddp"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1))
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


pl.seed_everything(0)
x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=16)
timer = Timer()
trainer = pl.Trainer(accelerator="gpu", devices=-1, strategy=strategy, max_steps=steps, callbacks=[timer],
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)
module = Regression()
trainer.fit(module, data)
if trainer.global_rank == 0:
    print(f"strategy {type(trainer.strategy).__name__} on {trainer.strategy.root_device}, "
          f"{trainer.world_size} devices")
    print(f"{trainer.global_step} steps, Timer: {timer.time_elapsed('train') * 1e3:.3f} ms")
    print("losses", module.losses)
