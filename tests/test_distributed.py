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


# ---- joint embedding: negatives gathered from every process -------------------------------------------------------

# rows 0-4 go to rank 0 and rows 5-7 to rank 1 (uneven), and rank 1 has no audio at all: the gather pads and fills in
CONTRASTIVE_PRESENCE = {"has_image": [1, 1, 0, 1, 1, 1, 1, 0], "has_text": [1, 0, 1, 1, 1, 1, 1, 1],
                        "has_audio": [0, 1, 1, 1, 1, 0, 0, 0]}
RANK_ROWS = [list(range(0, 5)), list(range(5, 8))]
CONTRASTIVE_SETTINGS = {"infonce+fused": dict(fused_contrastive_weight=0.5),
                        "sigmoid+anchor": dict(contrastive_loss="sigmoid", contrastive_anchor="text")}
# float32 sums in another order: the losses and gradients agree to rounding, far below what a missing negative or a
# gradient off by the number of processes (2x) would give
CONTRASTIVE_ATOL = 1e-5


def contrastive_batch() -> dict[str, torch.Tensor]:
    batch = make_batch(batch_size=8, seed=3)
    batch.update({key: torch.tensor(value).bool() for key, value in CONTRASTIVE_PRESENCE.items()})
    return batch


def contrastive_loss_and_gradients(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**batch, return_loss=True).loss
    loss.backward()
    module = getattr(model, "module", model)
    gradients = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.item(), gradients


def build_contrastive(settings: dict):
    from modeling_mm import MMFusionContrastiveModel

    torch.manual_seed(0)
    # training mode, as mm-train runs it (a tower that a process lacks stays in the graph with a zero weight), with
    # no dropout anywhere (the tiny towers have none), so one process and two compute the same function
    return MMFusionContrastiveModel(tiny_fusion_config(projection_dim=16, modality_dropout=0.0, **settings)).train()


def contrastive_on_rank(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    batch = {key: value[RANK_ROWS[rank]] for key, value in contrastive_batch().items()}
    results = {}
    for name, settings in CONTRASTIVE_SETTINGS.items():
        model = torch.nn.parallel.DistributedDataParallel(build_contrastive(settings), find_unused_parameters=False)
        results[name] = contrastive_loss_and_gradients(model, batch)
    torch.save(results, os.path.join(result_dir, f"contrastive-{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_give_the_loss_and_gradients_of_one_process_with_the_global_batch(tmp_path):
    mp.spawn(contrastive_on_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"contrastive-{rank}.pt") for rank in range(WORLD_SIZE)]
    for name, settings in CONTRASTIVE_SETTINGS.items():
        single_loss, single_gradients = contrastive_loss_and_gradients(build_contrastive(settings),
                                                                       contrastive_batch())
        # each rank alone, without the other's negatives, would give another loss: the check can fail
        alone_loss, _ = contrastive_loss_and_gradients(
            build_contrastive(settings), {k: v[RANK_ROWS[0]] for k, v in contrastive_batch().items()})
        assert abs(alone_loss - single_loss) > 100 * CONTRASTIVE_ATOL
        for rank, results in enumerate(ranks):
            loss, gradients = results[name]
            assert abs(loss - single_loss) < CONTRASTIVE_ATOL, (name, rank, loss, single_loss)
            assert set(gradients) == set(single_gradients), name
            for parameter, gradient in single_gradients.items():
                difference = (gradients[parameter] - gradient).abs().max().item()
                assert difference < CONTRASTIVE_ATOL, (name, rank, parameter, difference)
