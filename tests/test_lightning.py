"""freezeout.lightning in one process, against the real Lightning: T from the trainer under
gradient accumulation, every unit's rate logged as the formula gives it, frozen units untouched,
a wrong T refused, a run cut short warned, and a resume from a mid-run checkpoint that ends where
the uninterrupted run ends."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import freezeout
from conftest import closed_form_frozen_at, closed_form_lrs

L = pytest.importorskip("lightning.pytorch")
from freezeout.lightning import FreezeOutCallback  # noqa: E402

# Lightning 2.6 builds a pytree spec the way torch 2.14 deprecates (its own business, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")

N_UNITS, T_0, BASE = 6, 0.3, 0.1


class Net(L.LightningModule):
    def __init__(self, total_steps=None, t_0=T_0, interval="step"):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
                                     for _ in range(N_UNITS - 1)], nn.Linear(16, 4))
        self.total_steps, self.t_0, self.interval = total_steps, t_0, interval

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        units = list(self.model)
        optimizer = torch.optim.SGD(freezeout.param_groups(units), lr=BASE, momentum=0.9)
        scheduler = freezeout.FreezeOut(optimizer, units, total_steps=self.total_steps, t_0=self.t_0,
                                        how_scale="linear")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}


class Metrics(L.loggers.Logger):
    """The metrics Lightning hands its loggers, kept in memory."""

    def __init__(self):
        super().__init__()
        self.logged = []

    name, version = "memory", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


def loader(n: int = 64):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, 4, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def trainer(**options):
    options = {"max_epochs": 3, "accumulate_grad_batches": 2, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
               "devices": 1, **options}
    return L.Trainer(**options)


def test_t_from_the_trainer_every_rate_logged_as_the_formula_gives_it_and_frozen_units_left_alone():
    net, callback, logger = Net(), FreezeOutCallback(), Metrics()
    frozen_state = {}

    class Watch(L.Callback):  # each unit's weights and batch-norm statistics when it froze, and its gradients
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for i, unit in enumerate(net.model):
                if not next(unit.parameters()).requires_grad:
                    assert all(p.grad is None for p in unit.parameters())
                    frozen_state.setdefault(i, {k: v.clone() for k, v in unit.state_dict().items()})

    t = trainer(callbacks=[callback, Watch()], logger=logger, log_every_n_steps=1)
    t.fit(net, loader())
    scheduler = callback.scheduler
    assert scheduler.total_steps == 12  # 8 batches an epoch, 2 a step, 3 epochs
    assert scheduler.frozen_at == closed_form_frozen_at(N_UNITS, 12, T_0, power=1)
    rates = [(step, m) for step, m in logger.logged if "freezeout/lr_unit_0" in m]
    assert [step for step, _ in rates] == list(range(12))
    for k, metrics in rates:  # the rates the optimizer used in step k
        assert [metrics[f"freezeout/lr_unit_{i}"] for i in range(N_UNITS)] == pytest.approx(
            closed_form_lrs(k, N_UNITS, 12, T_0, power=1, base=BASE), rel=1e-12, abs=0)
        assert metrics["freezeout/frozen_units"] == sum(at is not None and at <= k + 1 for at in scheduler.frozen_at)
    for i, state in frozen_state.items():  # bit-identical from the freeze on, batch-norm statistics too
        assert all(torch.equal(state[k], v) for k, v in net.model[i].state_dict().items())
    assert len(frozen_state) == N_UNITS - 1


def test_a_schedule_made_for_another_t_is_refused_before_the_first_step():
    net = Net(total_steps=24)  # epochs x batches, with the accumulation forgotten
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"^FreezeOut's total_steps is 24 but this trainer makes 12 optimizer steps "
                                         r"\(trainer.estimated_stepping_batches, .*accumulate_grad_batches=2\); "
                                         r"make the scheduler with total_steps=None"):
        trainer(callbacks=[FreezeOutCallback()]).fit(net, loader())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_what_freezeout_cannot_follow_is_refused():
    with pytest.raises(ValueError, match=r"FreezeOut steps once per optimizer step: return it with 'interval': 'step'"):
        trainer(callbacks=[FreezeOutCallback()]).fit(Net(interval="epoch"), loader())

    class Plain(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="configure_optimizers returned no FreezeOut scheduler"):
        trainer(callbacks=[FreezeOutCallback()]).fit(Plain(), loader())


def test_a_run_stopped_before_t_is_warned():
    class StopAfterFive(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.should_stop = True

    with pytest.warns(UserWarning, match=r"FreezeOut: the run made 5 optimizer steps, but the schedule was made for "
                                         r"T=12: units 1-4 never froze and the output unit's rate was still"):
        trainer(callbacks=[FreezeOutCallback(), StopAfterFive()]).fit(Net(), loader())


@pytest.mark.parametrize("t_0", [T_0, 1.0])  # 1.0: the same resume without freezing, exact as well
def test_a_resume_from_a_mid_run_checkpoint_ends_as_the_uninterrupted_run(tmp_path, t_0):
    checkpoints = L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                              filename="{epoch}")
    whole = Net(t_0=t_0)
    trainer(max_epochs=4, callbacks=[FreezeOutCallback(), checkpoints], enable_checkpointing=True).fit(whole, loader())
    resumed, callback = Net(t_0=t_0), FreezeOutCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no FreezeOut warning: the resumed run made its T
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|checkpoint).*")
        # Lightning says so of the frozen units, which FreezeOut keeps in inference mode on purpose.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer(max_epochs=4, callbacks=[callback]).fit(resumed, loader(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert callback.scheduler.last_epoch == 16 and callback.scheduler.frozen_at == whole.trainer.lr_scheduler_configs[
        0].scheduler.frozen_at
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
