"""VideoTrainer: Trainer checkpoints of a VideoModel are loadable adapters (a plain Trainer cannot save them)."""

import torch
from conftest import DV, encode, random_features
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from video2param import VideoModel, wrap_model
from video2param.trainer import VideoTrainer


class _Batchable(Dataset):
    def __init__(self, ids, mask, feats):
        self.ids, self.mask, self.feats = ids, mask, feats

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.ids[i], "videos": self.feats[i]}


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_checkpoints_reload_to_the_same_logits(tmp_path, llama, tokenizer):
    vm = wrap_model(llama, method="vipe", vision_hidden_size=DV, num_frames=4, rank=4, inject_every=2, hidden_dim=32,
                    num_heads=4, depth=1, tokenizer=tokenizer, stage="sft")
    ids, mask = encode(tokenizer, ["what colour is the object ? red", "which way does it move ? left"] * 2, "right")
    data = _Batchable(ids, mask, random_features(4))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             remove_unused_columns=False, logging_strategy="no")
    VideoTrainer(model=vm, args=args, train_dataset=data, data_collator=_collate).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    vm.eval()
    expected = vm(input_ids=ids[:1], attention_mask=mask[:1], videos=random_features(1)).logits
    llm = AutoModelForCausalLM.from_pretrained(ckpt / "llm", attn_implementation="eager")
    again = VideoModel.from_pretrained(llm, ckpt / "adapter", tokenizer=tokenizer)
    again.eval()
    got = again(input_ids=ids[:1], attention_mask=mask[:1], videos=random_features(1)).logits
    assert torch.allclose(got, expected, atol=1e-5)
