"""Hugging Face Trainer on a GPU node, as a user writes it: a tiny GPT-2 from its config (no
download), the Trainer's own defaults (CUDA, nccl, DDP), its own train_runtime and
train_samples_per_second. Run by tests/ray/test_gpu_programs.py under `relay launch`."""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
out = sys.argv[2] if len(sys.argv) > 2 else "hf-out"


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=32, vocab=128):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                                            bos_token_id=0, eos_token_id=0))
args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps, logging_steps=1,
                         learning_rate=1e-3, report_to=[], save_strategy="no", seed=0)
trainer = Trainer(model=model, args=args, train_dataset=Tokens())
print(f"device {args.device}, n_gpu {args.n_gpu}, parallel mode {args.parallel_mode}")
result = trainer.train()
print({k: v for k, v in result.metrics.items()})
print("losses", [h["loss"] for h in trainer.state.log_history if "loss" in h])
