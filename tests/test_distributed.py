"""Two CPU processes on gloo: DDP through VideoTrainer trains exactly like one process with the same global batch
(vipe and llava), FSDP2 sharding (the engine for large LLMs) leaves the weight path, the LoRA on the LLM, the
gathered save and the sharded load intact, and VideoTrainer under Trainer's own FSDP2 resumes exactly.

One spawn of two processes runs all three checks (process start-up dominates the time); the single-process
references run in the test process itself.
"""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import DV, WORDS, encode, random_features
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_lm
from trainer_rows import FeatureRows, stack_rows

from video2param import VideoModel, wrap_model
from video2param.data.tokenizer import build_word_tokenizer

pytestmark = pytest.mark.slow  # process start-up: about a minute of wall time on 2 busy cores

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORLD = 2
PER_DEVICE = 2
STEPS = 2
VIPE = dict(method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2, hidden_dim=32, num_heads=4,
            depth=1)
LLAVA = dict(method="llava", vision_hidden_size=DV, num_frames=4)
TEXTS = ["what colour is the object ? red", "which way does it move ? left", "what shape is the object ? blue",
         "which way does it move ? up", "what colour is the object ? green", "which way does it move ? down",
         "what colour is the object ? blue", "which way does it move ? right"]


def _rows(tok) -> FeatureRows:
    ids, mask = encode(tok, TEXTS, "right")
    return FeatureRows(ids, mask, random_features(len(TEXTS), seed=5))


def _tok():
    return build_word_tokenizer(WORDS)


VOCAB = len(build_word_tokenizer(WORDS)) + 8


def _build(kind: str, lora: bool = False) -> VideoModel:
    from peft import LoraConfig

    llm = make_tiny_lm("llama", vocab_size=VOCAB)
    torch.manual_seed(11)
    options = VIPE if kind == "vipe" else LLAVA
    llm_lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False) if lora else None
    return wrap_model(llm, tokenizer=_tok(), stage="sft" if lora or kind == "llava" else "pretrain",
                      llm_lora=llm_lora, **options)


def _train_with_trainer(kind: str, output: str, batch: int) -> dict[str, torch.Tensor]:
    from transformers import TrainingArguments

    from video2param.trainer import VideoTrainer

    vm = _build(kind)
    args = TrainingArguments(output_dir=output, max_steps=STEPS, per_device_train_batch_size=batch, learning_rate=1e-3,
                             save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True, logging_strategy="no", seed=7,
                             dataloader_num_workers=0)
    VideoTrainer(model=vm, args=args, train_dataset=_rows(_tok()), data_collator=stack_rows).train()
    state = {f"method.{k}": v for k, v in vm.method.state_dict().items()}
    if kind == "llava":  # stage sft: the whole LLM trains too
        state.update({f"llm.{k}": v for k, v in vm.llm.state_dict().items()})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# ---- FSDP2 ---------------------------------------------------------------------------------------------------
def _fsdp_batch():
    ids, mask = encode(_tok(), TEXTS[:4], "right")
    keep = mask.all(dim=0)  # equal lengths: the mean of the two ranks' mean losses is the mean over all four
    ids, mask = ids[:, keep], mask[:, keep]
    return ids, mask, random_features(4, seed=9)


def _step(vm, ids, mask, feats):
    params = [p for p in vm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = vm(input_ids=ids, attention_mask=mask, labels=ids, videos=feats).loss
    loss.backward()
    opt.step()
    return loss.detach()


def _fsdp_check(rank: int, out_dir: str) -> None:
    """Shard a vipe + LoRA model with FSDP2, train a step, save gathered, reload sharded; rank 0 writes results."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from video2param.targets import decoder_layers
    from video2param.trainer import load_training_checkpoint, save_training_checkpoint

    vm = _build("vipe", lora=True)
    fingerprint = vm.fingerprint  # read before sharding, as VideoTrainer does
    for layer in decoder_layers(vm.llm):
        fully_shard(layer)
    fully_shard(vm)
    ids, mask, feats = _fsdp_batch()
    part = slice(rank * 2, rank * 2 + 2)
    loss = _step(vm, ids[part], mask[part], feats[part])
    full = get_model_state_dict(vm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ckpt = os.path.join(out_dir, "fsdp_ckpt")
    if rank == 0:
        save_training_checkpoint(vm, ckpt, state_dict=full, fingerprint=fingerprint)
        trainable = {k: v for k, v in full.items() if k.startswith("method.") or "lora_" in k}
        save_file({k: v.contiguous() for k, v in trainable.items()}, os.path.join(out_dir, "fsdp_trained.safetensors"))
    torch.distributed.barrier()
    # Resume into the sharded model after scrambling it: every rank reads the files, each keeps its shard.
    with torch.no_grad():
        for p in vm.parameters():
            if p.requires_grad:
                p.zero_()
    load_training_checkpoint(vm, ckpt)
    again = get_model_state_dict(vm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({k: again[k].contiguous() for k in trainable}, os.path.join(out_dir, "fsdp_reloaded.safetensors"))
        with open(os.path.join(out_dir, "fsdp_loss.txt"), "w") as f:
            f.write(repr(float(loss)))


def _fsdp_trainer_resume(rank: int, out_dir: str) -> None:
    """VideoTrainer under Trainer's own FSDP2: 4 steps with a checkpoint at 2, then a resume from it."""
    from transformers import TrainingArguments

    from video2param.trainer import VideoTrainer

    output = os.path.join(out_dir, "fsdp_trainer")
    args = TrainingArguments(output_dir=output, max_steps=4, per_device_train_batch_size=PER_DEVICE, learning_rate=1e-3,
                             save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, seed=7, fsdp=True,
                             fsdp_config=str(EXAMPLES / "fsdp2.json"))  # the config docs/training.md points to
    runs = []
    for resume in (None, os.path.join(output, "checkpoint-2")):
        trainer = VideoTrainer(model=_build("vipe", lora=True), args=args, train_dataset=_rows(_tok()),
                               data_collator=stack_rows)
        trainer.train(resume_from_checkpoint=resume)
        runs.append([e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > 2])
    if rank == 0:
        with open(os.path.join(out_dir, "fsdp_trainer_losses.txt"), "w") as f:
            f.write(repr(runs))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    for kind in ("vipe", "llava"):
        state = _train_with_trainer(kind, os.path.join(out_dir, kind), PER_DEVICE)
        if rank == 0:
            save_file(state, os.path.join(out_dir, f"ddp_{kind}.safetensors"))
    _fsdp_check(rank, out_dir)
    _fsdp_trainer_resume(rank, out_dir)
    # Both ranks must be done with gloo before either tears it down: a rank that destroyed its group (and exited)
    # while the other still had collectives in flight aborted the other ("terminate called without an active
    # exception") about one run in five.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("kind", ["vipe", "llava"])
def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(two_processes, tmp_path, kind):
    ddp = load_file(two_processes / f"ddp_{kind}.safetensors")
    single = _train_with_trainer(kind, str(tmp_path), PER_DEVICE * WORLD)
    assert ddp.keys() == single.keys()
    untouched = _build(kind)
    start = {**{f"method.{k}": v for k, v in untouched.method.state_dict().items()},
             **{f"llm.{k}": v for k, v in untouched.llm.state_dict().items()}}
    assert any(not torch.equal(single[k], start[k]) for k in single)  # training moved the weights
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)


def test_fsdp2_sharding_trains_saves_and_reloads_like_the_unsharded_model(two_processes, tmp_path):
    reference = _build("vipe", lora=True)
    before = copy.deepcopy(reference)
    ids, mask, feats = _fsdp_batch()
    loss = _step(reference, ids, mask, feats)
    # Sharded or not, one step gives the same loss and the same adapter and LoRA.
    rank0_loss = float((two_processes / "fsdp_loss.txt").read_text())
    half = before(input_ids=ids[:2], attention_mask=mask[:2], labels=ids[:2], videos=feats[:2]).loss
    assert rank0_loss == pytest.approx(half.item(), abs=1e-5)
    expected = {**{f"method.{k}": v for k, v in reference.method.state_dict().items()},
                **{f"llm.{k}": v for k, v in reference.llm.state_dict().items() if "lora_" in k}}
    trained = load_file(two_processes / "fsdp_trained.safetensors")
    assert trained.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    # The checkpoint written from the gathered state dict is an ordinary adapter (+ LLM LoRA) ...
    loaded = VideoModel.from_pretrained(make_tiny_lm("llama", vocab_size=VOCAB),
                                        two_processes / "fsdp_ckpt" / "adapter", tokenizer=_tok())
    reference.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, videos=feats).logits,
                                   reference(input_ids=ids, attention_mask=mask, videos=feats).logits,
                                   rtol=1e-4, atol=1e-5)
    # ... and loading it back into the sharded model restored every shard.
    reloaded = load_file(two_processes / "fsdp_reloaded.safetensors")
    for key in trained:
        torch.testing.assert_close(reloaded[key], trained[key], rtol=0, atol=0, msg=key)
    assert float(loss) > 0


def test_trainer_with_fsdp2_saves_adapter_checkpoints_and_resumes_from_them(two_processes):
    import ast

    uninterrupted, resumed = ast.literal_eval((two_processes / "fsdp_trainer_losses.txt").read_text())
    assert len(uninterrupted) == 2
    assert resumed == pytest.approx(uninterrupted, abs=1e-6)
    checkpoint = two_processes / "fsdp_trainer" / "checkpoint-2" / "adapter"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "llm_lora").is_dir()
