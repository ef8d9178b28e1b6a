"""Lightning with strategy="ddp" (find_unused_parameters=False) on 2 CPU processes, FreezeOut
attached through freezeout.lightning, instrumented by tests/ddp_count.py; run by
tests/test_ddp.py. Lightning starts the second process itself (it runs this script again).

    python tests/ddp_lightning.py OUT.json
"""
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ddp_count import Counts
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

import freezeout
from freezeout.lightning import FreezeOutCallback


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
                                     for _ in range(5)], nn.Linear(16, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        units = list(self.model)
        optimizer = torch.optim.SGD(freezeout.param_groups(units), lr=0.1, momentum=0.9)
        scheduler = freezeout.FreezeOut(optimizer, units, total_steps=None, t_0=0.3, how_scale="linear")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Record(L.Callback):
    def __init__(self, counts: Counts):
        self.counts = counts

    def on_fit_start(self, trainer, pl_module):
        self.counts.register(trainer.strategy.model)  # Lightning registers ddp_comm_hook on CUDA only

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.counts.end_step(pl_module.model, trainer.lr_scheduler_configs[0].scheduler.num_frozen)


def main(out: str) -> None:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(128, 16, generator=g), torch.randint(0, 4, (128,), generator=g))
    counts = Counts()
    strategy = DDPStrategy(find_unused_parameters=False, process_group_backend="gloo")
    freezeout_callback = FreezeOutCallback()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, accumulate_grad_batches=2,
                        callbacks=[freezeout_callback, Record(counts)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    net = Net()
    trainer.fit(net, torch.utils.data.DataLoader(data, batch_size=8))
    scheduler = freezeout_callback.scheduler
    counts.finish(net.model, out, total_steps=scheduler.total_steps, frozen_at=scheduler.frozen_at,
                  last_step=scheduler.last_epoch)
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1])
