"""The Hugging Face Trainer under DDP on 2 CPU processes (torchrun, gloo), a small BERT with
FreezeOut attached through freezeout.hf, instrumented by tests/ddp_count.py; run by
tests/test_ddp.py.

    torchrun --nproc_per_node 2 tests/ddp_hf.py OUT.json FIND_UNUSED(0|1)
"""
import sys
import warnings

import torch
import torch.distributed as dist
from ddp_count import Counts
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import freezeout
from freezeout.hf import FreezeOutCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 128):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(0, 50, (n, 8), generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


class Record(TrainerCallback):
    """Finds the DDP module the Trainer runs (at its first forward) to count its all-reduces."""

    def __init__(self, counts: Counts):
        self.counts, self.model, self.hook = counts, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

        def find(module, inputs):
            if isinstance(module, DistributedDataParallel):
                self.counts.register(module)
                self.hook.remove()
        self.hook = torch.nn.modules.module.register_module_forward_pre_hook(find)

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        self.counts.end_step(self.model, lr_scheduler.num_frozen)


def main(out: str, find_unused: bool) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(config)
    units = [model.bert.embeddings, *model.bert.encoder.layer, [model.bert.pooler, model.classifier]]
    optimizer = torch.optim.AdamW(freezeout.param_groups(units), lr=1e-3)
    scheduler = freezeout.FreezeOut(optimizer, units, total_steps=None, t_0=0.3, how_scale="linear")
    args = TrainingArguments(output_dir=out + ".trainer", num_train_epochs=3, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, ddp_backend="gloo",
                             ddp_find_unused_parameters=find_unused, dataloader_num_workers=0)
    counts = Counts()
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, scheduler),
                      callbacks=[FreezeOutCallback(), Record(counts)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    rates = [{k: v for k, v in r.items() if k.startswith("freezeout/") or k in ("step", "learning_rate")}
             for r in trainer.state.log_history if "loss" in r]
    counts.finish(model, out, total_steps=scheduler.total_steps, frozen_at=scheduler.frozen_at,
                  last_step=scheduler.last_epoch, rates=rates,
                  freezeout_warnings=[str(w.message) for w in caught if "FreezeOut" in str(w.message)])
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "1")
