"""2-process DDP on CPU (gloo): random per-sample modality absence, modality dropout, LayerDrop and SpecAugment in the audio tower, and
activation checkpointing, with `find_unused_parameters=False`. The ranks see different data, so some steps leave a
whole modality out on one rank only; both ranks must still end with identical weights (Foundation acceptance 8)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_batch, tiny_fusion_config, tiny_wav2vec2_config

STEPS = 5
WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_on_rank(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    from modeling_mm import MMFusionForSequenceClassification

    torch.manual_seed(0)  # same initial weights on every rank
    config = tiny_fusion_config(modality_dropout=0.3, fusion_dropout=0.1)
    # wav2vec2's LayerDrop skips layers at random; SpecAugment uses its mask embedding only when a span is masked
    config.audio_config = tiny_wav2vec2_config(layerdrop=0.5, mask_time_prob=0.2, mask_time_length=5)
    model = MMFusionForSequenceClassification(config)
    model.activation_checkpointing_enable()
    model.train()
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    # no weight decay: a weight that moved was moved by a gradient
    optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=1e-2, weight_decay=0.0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    generator = torch.Generator().manual_seed(100 + rank)  # different data and absence on each rank
    for step in range(STEPS):
        batch = make_batch(batch_size=4, seed=10 * step + rank)
        presence = torch.rand(4, 3, generator=generator) < 0.5
        if step == 1 and rank == 0:
            presence[:, 2] = False  # rank 0 has no audio at all in this step; rank 1 does
        presence[~presence.any(1), 1] = True
        batch.update(has_image=presence[:, 0], has_text=presence[:, 1], has_audio=presence[:, 2])
        labels = torch.randint(0, 2, (4,), generator=generator)
        loss = ddp_model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    towers = ("model.vision_model.", "model.text_model.", "model.audio_model.")
    unchanged_fusion = [n for n in weights if not n.startswith(towers) and torch.equal(weights[n], initial[n])]
    torch.save({"weights": weights, "unchanged_fusion": unchanged_fusion}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_end_with_identical_weights(tmp_path):
    mp.spawn(train_on_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD_SIZE)]
    assert results[0]["unchanged_fusion"] == [], "every fusion and head weight should have been trained"
    for name, tensor in results[0]["weights"].items():
        assert torch.equal(tensor, results[1]["weights"][name]), f"ranks diverged at {name}"
