"""VideoTrainer: Trainer checkpoints of a VideoModel are loadable adapters, training resumes from them exactly, and
load_best_model_at_end brings the best one back (a plain Trainer can do none of this; see video2param.trainer)."""

import pytest
import torch
from conftest import DV, WORDS, encode, random_features
from peft import LoraConfig
from tiny_models import make_tiny_lm
from trainer_rows import FeatureRows, stack_rows
from transformers import AutoModelForCausalLM, TrainingArguments

from video2param import VideoModel, wrap_model
from video2param.data.tokenizer import build_word_tokenizer
from video2param.llm_lora import llm_lora_state_dict
from video2param.serialization import read_adapter
from video2param.trainer import VideoTrainer, load_training_checkpoint

VIPE = dict(method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2, hidden_dim=32, num_heads=4,
            depth=1)
LLAVA = dict(method="llava", vision_hidden_size=DV, num_frames=4)
TEXTS = ["what colour is the object ? red", "which way does it move ? left", "what shape is the object ? blue",
         "which way does it move ? up", "what colour is the object ? green", "which way does it move ? down"]


def _data(tokenizer, n=8):
    ids, mask = encode(tokenizer, (TEXTS * 2)[:n], "right")
    return FeatureRows(ids, mask, random_features(n, seed=3))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=5e-3,
                save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                remove_unused_columns=False, disable_tqdm=True, seed=7)
    base.update(kw)
    return TrainingArguments(**base)


def _build(kind, tokenizer, vocab, method_seed, lora=False):
    llm = make_tiny_lm("llama", vocab_size=vocab, seed=0)  # the same base LLM every time
    torch.manual_seed(method_seed)  # a different adapter initialisation: resuming must overwrite it
    options = dict(VIPE if kind == "vipe" else LLAVA)
    stage = "pretrain" if kind == "vipe" and not lora else "sft"
    llm_lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"]) if lora else None
    return wrap_model(llm, tokenizer=tokenizer, stage=stage, llm_lora=llm_lora, **options)


def _losses(trainer, after_step=0):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > after_step]


@pytest.mark.parametrize("kind,lora", [("vipe", False), ("vipe", True), ("llava", False)],
                         ids=["vipe-pretrain", "vipe-sft-lora", "llava-sft-whole-llm"])
def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path, kind, lora):
    tokenizer = build_word_tokenizer(WORDS)
    vocab = len(tokenizer) + 8
    data = _data(tokenizer)
    full = VideoTrainer(model=_build(kind, tokenizer, vocab, 1, lora), args=_args(tmp_path / "a"), train_dataset=data,
                        data_collator=stack_rows)
    full.train()
    resumed = VideoTrainer(model=_build(kind, tokenizer, vocab, 2, lora), args=_args(tmp_path / "a"),
                           train_dataset=data, data_collator=stack_rows)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    expected, got = _losses(full, after_step=2), _losses(resumed, after_step=2)  # the steps run after resuming
    assert len(expected) == 2 and len(got) == 2
    assert got == pytest.approx(expected, abs=1e-6)
    # ... and the trained weights end up the same.
    for (name, a), b in zip(full.model.method.state_dict().items(), resumed.model.method.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    if lora:
        a, b = llm_lora_state_dict(full.model.llm), llm_lora_state_dict(resumed.model.llm)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    tokenizer = build_word_tokenizer(WORDS)
    data = _data(tokenizer)
    vm = _build("vipe", tokenizer, len(tokenizer) + 8, 1)
    # "Best" = highest eval loss, i.e. the first checkpoint while the loss falls: not the final weights.
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=True, per_device_eval_batch_size=4)
    trainer = VideoTrainer(model=vm, args=args, train_dataset=data, eval_dataset=data, data_collator=stack_rows)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved = read_adapter(f"{best}/adapter").state
    final = read_adapter(tmp_path / "checkpoint-4" / "adapter").state
    assert any(not torch.equal(saved[k], final[k]) for k in saved)
    for name, value in vm.method.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_checkpoints_reload_to_the_same_logits(tmp_path, llama, tokenizer):
    vm = wrap_model(llama, tokenizer=tokenizer, stage="sft", **VIPE)
    ids, mask = encode(tokenizer, ["what colour is the object ? red", "which way does it move ? left"] * 2, "right")
    data = FeatureRows(ids, mask, random_features(4))
    args = _args(tmp_path / "out", max_steps=2, learning_rate=1e-3, logging_strategy="no")
    VideoTrainer(model=vm, args=args, train_dataset=data, data_collator=stack_rows).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    vm.eval()
    expected = vm(input_ids=ids[:1], attention_mask=mask[:1], videos=random_features(1)).logits
    llm = AutoModelForCausalLM.from_pretrained(ckpt / "llm", attn_implementation="eager")
    again = VideoModel.from_pretrained(llm, ckpt / "adapter", tokenizer=tokenizer)
    again.eval()
    got = again(input_ids=ids[:1], attention_mask=mask[:1], videos=random_features(1)).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_checkpoint_of_another_adapter_is_refused(tmp_path, tokenizer):
    vocab = len(tokenizer) + 8
    vm = _build("vipe", tokenizer, vocab, 1)
    vm.save_pretrained(tmp_path / "ckpt" / "adapter")
    other = wrap_model(make_tiny_lm("llama", vocab_size=vocab), tokenizer=tokenizer, **{**VIPE, "rank": 2})
    with pytest.raises(ValueError, match="adapter config differs"):
        load_training_checkpoint(other, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a VideoTrainer checkpoint"):
        load_training_checkpoint(vm, tmp_path)
