"""Hugging Face accelerate on a GPU node, as its README writes a training loop: Accelerator()
picks CUDA and nccl, prepare() wraps the model in DDP on the GPU and the data loader; the loop
times itself with time.perf_counter. Run by tests/ray/test_gpu_programs.py under `relay launch`."""

import sys
import time

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
accelerator = Accelerator(mixed_precision="bf16")
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                                            bos_token_id=0, eos_token_id=0))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
accelerator.print(f"{accelerator.distributed_type}, device {accelerator.device}, "
                  f"{accelerator.num_processes} processes, mixed precision {accelerator.mixed_precision}")
losses = []
t0 = time.perf_counter()
for step, (batch,) in enumerate(loader):
    if step == steps:
        break
    loss = model(input_ids=batch, labels=batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    losses.append(accelerator.reduce(loss.detach(), "mean").item())
elapsed = time.perf_counter() - t0
accelerator.print(f"{steps} steps in {elapsed * 1e3:.3f} ms, "
                  f"{steps * 4 * accelerator.num_processes / elapsed:,.0f} samples/s")
accelerator.print("losses", losses)
