"""lorakit in one page: adapt a model, train a few steps, save, reload, merge.

    python examples/quickstart.py
"""

import tempfile

import torch
from torch import nn

import lorakit


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


torch.manual_seed(0)
model = make_model()
pretrained = {k: v.clone() for k, v in model.state_dict().items()}  # stands in for pretrained weights
x, y = torch.randn(256, 32), torch.randint(0, 2, (256,))

# 1. Inject LoRA into the two hidden layers; everything else is frozen. B = 0, so outputs are unchanged.
lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["0", "2"]))
trainable, total = lorakit.trainable_parameters(model)
print(f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")

# 2. Train the adapter.
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
for _ in range(50):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"loss after 50 steps {loss.item():.3f}")

# 3. Save a PEFT-format checkpoint and load it into a fresh copy of the base model.
with tempfile.TemporaryDirectory() as d:
    lorakit.save_adapter(model, d)
    fresh = make_model()
    fresh.load_state_dict(pretrained)
    lorakit.load_adapter(fresh, d)  # injects the LoRA layers, checks every tensor, then loads
    print("reloaded output matches:", torch.allclose(fresh(x), model(x), atol=1e-6))

# 4. Merge for zero added latency; unmerge gives the base weights back.
adapted = model(x)
lorakit.merge(model)
print("merged output matches:", torch.allclose(model(x), adapted, atol=1e-5))
plain = lorakit.unload(model)  # an ordinary nn.Sequential of nn.Linear again
print(type(plain[0]).__name__)
