"""freezeout.hf in one process, against the real Hugging Face Trainer: T from the Trainer under
gradient accumulation, every unit's rate logged (to the log history and to the reporting
callbacks the Trainer puts first), a wrong T refused, a run cut short warned, and a resume
from a mid-run checkpoint that ends where the uninterrupted run ends."""
import warnings

import pytest
import torch

import freezeout
from conftest import closed_form_frozen_at, closed_form_lrs

transformers = pytest.importorskip("transformers")
from freezeout.hf import FreezeOutCallback  # noqa: E402

N_UNITS, T_0, BASE = 6, 0.3, 1e-3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(0, 50, (n, 8), generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def make_trainer(out, model=None, total_steps=None, t_0=T_0, callbacks=(), scheduler=None, **options):
    model = model or bert()
    units = [model.bert.embeddings, *model.bert.encoder.layer, [model.bert.pooler, model.classifier]]
    optimizer = torch.optim.AdamW(freezeout.param_groups(units), lr=BASE)
    if scheduler is None:
        scheduler = freezeout.FreezeOut(optimizer, units, total_steps=total_steps, t_0=t_0, how_scale="linear")
    options = {"num_train_epochs": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
               "logging_steps": 1, "report_to": [], "save_strategy": "no", "use_cpu": True, "disable_tqdm": True,
               "seed": 0, **options}
    args = transformers.TrainingArguments(output_dir=str(out), **options)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                optimizers=(optimizer, scheduler or None), callbacks=[*callbacks, FreezeOutCallback()])


class Seen(transformers.TrainerCallback):
    """A callback before FreezeOut's in the list, as the reporting integrations are: what it is logged."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_t_from_the_trainer_and_every_rate_logged_where_reporting_callbacks_see_it(tmp_path):
    seen = Seen()
    trainer = make_trainer(tmp_path, callbacks=[seen])
    trainer.train()
    scheduler = trainer.lr_scheduler
    assert scheduler.total_steps == trainer.state.max_steps == 12  # 8 batches an epoch, 2 a step, 3 epochs
    assert scheduler.frozen_at == closed_form_frozen_at(N_UNITS, 12, T_0, power=1)
    history = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in history] == list(range(1, 13))
    for record, logs in zip(history, [s for s in seen.logs if "loss" in s], strict=True):
        k = record["step"] - 1  # the step whose rates these are
        expected = closed_form_lrs(k, N_UNITS, 12, T_0, power=1, base=BASE)
        for where in (record, logs):
            assert [where[f"freezeout/lr_unit_{i}"] for i in range(N_UNITS)] == pytest.approx(expected, rel=1e-12)
            assert where["learning_rate"] == pytest.approx(expected[-1], rel=1e-12)  # the output unit's
            assert where["freezeout/frozen_units"] == sum(at is not None and at <= k + 1 for at in scheduler.frozen_at)


def test_a_schedule_made_for_another_t_is_refused_before_the_first_step(tmp_path):
    model = bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(tmp_path, model=model, total_steps=24)  # epochs x batches, accumulation forgotten
    with pytest.raises(ValueError, match=r"^FreezeOut's total_steps is 24 but this trainer makes 12 optimizer steps "
                                         r"\(state.max_steps, .*gradient_accumulation_steps=2, 1 processes\)"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_trainer_scheduler_that_is_not_freezeout_is_refused(tmp_path):
    model = bert()
    trainer = make_trainer(tmp_path, model=model, scheduler=False)  # the Trainer makes its own (linear)
    with pytest.raises(ValueError, match=r"the Trainer's scheduler is LambdaLR, not FreezeOut; give it one"):
        trainer.train()


def test_a_run_stopped_before_t_is_warned(tmp_path):
    class StopAfterFive(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                control.should_training_stop = True

    with pytest.warns(UserWarning, match=r"FreezeOut: the run made 5 optimizer steps, but the schedule was made for "
                                         r"T=12: units 1-4 never froze"):
        make_trainer(tmp_path, callbacks=[StopAfterFive()]).train()


@pytest.mark.parametrize("t_0", [T_0, 1.0])  # 1.0: the same resume without freezing, exact as well
def test_a_resume_from_a_mid_run_checkpoint_ends_as_the_uninterrupted_run(tmp_path, t_0):
    whole = make_trainer(tmp_path / "whole", t_0=t_0, save_strategy="steps", save_steps=5)
    whole.train()
    resumed = make_trainer(tmp_path / "resumed", t_0=t_0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no FreezeOut warning: the resumed run made its T
        resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-5"))
    assert resumed.lr_scheduler.last_epoch == 12 and resumed.lr_scheduler.frozen_at == whole.lr_scheduler.frozen_at
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
