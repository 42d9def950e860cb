"""`VideoModel`: a HuggingFace causal LM with a video adapter attached, and `wrap_model` to build one.

The LLM's own modeling code runs unchanged. A video enters either as spliced input embeddings (token methods)
or as per-sample low-rank deltas on target modules (weight methods); see ``inject``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import targets as tg
from .config import VideoAdapterConfig
from .inject.lowrank import (
    InjectionScope,
    _set_submodule,
    carry_context_through_checkpointing,
    inject_lowrank,
    remove_lowrank,
    replace_active_context,
    site_key,
    use_weight_context,
)
from .inject.tokens import ensure_video_token, question_mask, splice_video_tokens, strip_video_marks
from .llm_lora import attach_llm_lora, llm_lora_parameters, resolve_llm
from .methods.base import (
    Conditioning,
    LLMInfo,
    LLMReadout,
    Prompt,
    TokenContext,
    VideoContext,
    WeightContext,
    get_method,
)
from .serialization import BaseModelFingerprint, check_state, read_adapter, save_adapter
from .videos import VideoInputs, prepare_video_inputs

Stage = Literal["pretrain", "sft", "frozen"]


class VideoModel(nn.Module):
    """A causal LM that understands video. Build it with ``wrap_model``.

    ``forward``/``generate`` take the usual text inputs plus ``videos=`` (features (B,T,P,Dv), pixel frames with a
    vision tower, file paths or clips) or a ready ``context=`` from ``encode_video``.
    """

    def __init__(self, llm: nn.Module, config: VideoAdapterConfig, *, vision: Any = None, tokenizer: Any = None,
                 text_encoder: nn.Module | None = None, teacher: Any = None, stage: Stage = "pretrain",
                 llm_lora: Any = None) -> None:
        super().__init__()
        # A PeftModel is wrapped through its base model (LoRA layers in place), so module names never change.
        llm = resolve_llm(llm, llm_lora)
        if not hasattr(llm, "get_input_embeddings") or not hasattr(llm, "config"):
            raise TypeError(f"wrap_model: expected a HuggingFace causal LM, got {type(llm).__name__}")
        first = next(llm.parameters(), None)
        if first is None:
            raise ValueError("wrap_model: the LLM has no parameters")
        if first.device.type == "meta":
            raise ValueError(
                "wrap_model: the LLM's weights are on the meta device (not loaded); load it with real weights "
                "(e.g. from_pretrained without device_map='meta') before wrapping"
            )
        self.llm = llm
        self.tokenizer = tokenizer
        # What the method reads, given its options (e.g. PPLLaVA's uniform relevance reads no text tower).
        self._needs, self._views = get_method(config.method).requirements(config.options)
        self.vision = _as_vision_encoder(vision, self._needs, self._views)
        # Helper models stay frozen and outside the adapter's state dict (see adapter_state_dict).
        self.text_encoder = text_encoder
        if text_encoder is not None:
            text_encoder.requires_grad_(False)
        config = _with_vision_width(config, self.vision)
        # The method may size itself from its helper models (e.g. the text tower's width), checked against them.
        config = get_method(config.method).complete_config(config, vision=self.vision, text_encoder=text_encoder)
        method_cls = get_method(config.method)
        # A teacher loads before any module of the LLM is wrapped (its base-model check sees the plain LLM). It is
        # held, not registered: it stays frozen and outside every state dict (``_apply`` moves it along).
        teacher_model, config = _resolve_teacher(llm, config, method_cls, teacher, tokenizer)
        object.__setattr__(self, "_teacher", teacher_model)
        self.config = config
        n_layers = tg.num_layers(llm)
        sites: list[tg.TargetSite] = []
        if method_cls.kind == "weights":
            layers = tg.injection_layers(n_layers, every=None if config.inject_layers else config.inject_every,
                                         explicit=config.inject_layers)
            sites = tg.find_targets(llm, roles=config.targets, layers=layers)
        self.llm_info = LLMInfo(hidden_size=tg.hidden_size(llm), num_layers=n_layers, sites=sites,
                                site_keys=[site_key(s) for s in sites],
                                model_type=getattr(llm.config, "model_type", ""))
        param = next(llm.parameters())
        self.method = method_cls(config, self.llm_info).to(device=param.device)
        self.video_token = config.video_token
        self.video_token_id: int | None = (
            ensure_video_token(tokenizer, config.video_token) if tokenizer is not None else None
        )
        embedding = llm.get_input_embeddings()  # num_embeddings, not weight.shape: ZeRO-3 partitions the weight
        rows = int(getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0])
        if self.video_token_id is not None and self.video_token_id >= rows:
            # Checked before any module is wrapped, so the caller can resize and wrap again.
            raise ValueError(
                f"video_token: {config.video_token!r} has id {self.video_token_id} but the LLM's embedding has only "
                f"{rows} rows; call llm.resize_token_embeddings(len(tokenizer)) before wrap_model"
            )
        if llm_lora is not None:
            attach_llm_lora(llm, llm_lora)  # first, so the video wrappers wrap the LoRA layers (see llm_lora.py)
        self._scope = InjectionScope()
        self._wrappers = inject_lowrank(llm, sites, self._scope) if sites else {}
        self._site_layout = {key: (s.in_features, s.out_features) for s, key in zip(sites, self.llm_info.site_keys)}
        self._merge_lock = threading.Lock()
        self._merge_owner: int | None = None  # thread holding the merged video
        self._merge_depth = 0
        self._merged: WeightContext | None = None
        self._unwrapped = False
        self.set_stage(stage)

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def method_kind(self) -> str:
        return type(self.method).kind

    @property
    def fingerprint(self) -> BaseModelFingerprint:
        return BaseModelFingerprint.of(self.llm)

    @property
    def teacher(self) -> "VideoModel | None":
        """The frozen token adapter this model's method learns from (``wrap_model(teacher=...)``), or None."""
        return self._teacher

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() reach registered submodules only; the held teacher's adapter must follow the LLM.
        super()._apply(fn, recurse)
        teacher = self.__dict__.get("_teacher")
        if teacher is not None:
            teacher.method._apply(fn, recurse)
        return self

    # ---- training stages -------------------------------------------------------------------------------------
    def set_stage(self, stage: Stage) -> None:
        """Choose what trains: ``pretrain`` = the video method only, ``sft`` = method and LLM, ``frozen`` = nothing.

        In ``sft`` an LLM with a LoRA (``llm_lora=``, a PeftModel, ``attach_llm_lora``) trains its LoRA only; without
        one the whole LLM trains. The vision tower always stays frozen.
        """
        if stage not in ("pretrain", "sft", "frozen"):
            raise ValueError(f"stage: expected 'pretrain', 'sft' or 'frozen', got {stage!r}")
        self.stage = stage
        lora = llm_lora_parameters(self.llm)
        for p in self.llm.parameters():
            p.requires_grad_(stage == "sft" and not lora)
        for p in lora:
            p.requires_grad_(stage == "sft")
        for p in self.method.parameters():
            p.requires_grad_(stage != "frozen")
        if self.vision is not None:
            for p in self.vision.parameters():
                p.requires_grad_(False)

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, the vision tower included in the total."""
        params = {id(p): p for p in self.parameters()}.values()
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable / total parameter counts, the video adapter's size and the LLM LoRA's size (if any)."""
        trainable, total = self.trainable_parameters()
        method = sum(p.numel() for p in self.method.parameters())
        lora = sum(p.numel() for p in llm_lora_parameters(self.llm))
        lora_text = f" || LLM LoRA params: {lora:,}" if lora else ""
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
              f" || {self.config.method} params: {method:,}{lora_text} (stage={self.stage})")

    # ---- video → context -------------------------------------------------------------------------------------
    def prepare_videos(self, videos: Any, frame_mask: torch.Tensor | None = None) -> VideoInputs:
        """Turn ``videos`` (features, pixels, paths, clips) into checked features (B,T,P,Dv) and a frame mask."""
        inputs = prepare_video_inputs(videos, frame_mask, vision=self.vision,
                                      feature_dim=self.config.vision_hidden_size, num_frames=self.config.num_frames)
        dtype = self._method_dtype()
        return VideoInputs(inputs.features.to(device=self.device, dtype=dtype),
                           None if inputs.frame_mask is None else inputs.frame_mask.to(self.device),
                           {name: view.to(device=self.device, dtype=dtype) for name, view in inputs.views.items()})

    def _method_dtype(self) -> torch.dtype:
        return next(self.method.parameters(), torch.empty(0)).dtype

    def encode_video(self, videos: Any, frame_mask: torch.Tensor | None = None, *,
                     input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> VideoContext:
        """Encode a batch of videos once into a reusable context (pass it as ``context=`` to forward/generate).

        Methods that condition on the prompt (``needs`` has ``prompt``…) need ``input_ids``; they read the question
        only: padding, the ``<video>`` mark and (with ``labels``) the answer are masked out, or pass
        ``prompt_mask`` (True = question token) yourself.
        """
        self._check_alive()
        inputs = self.prepare_videos(videos, frame_mask)
        views = self._vision_views(inputs)
        cond = self._conditioning(inputs.features.shape[0], input_ids, attention_mask, labels, prompt_mask)
        cond.vision_views = views
        context = self.method.encode(inputs.features, inputs.frame_mask, cond)
        expected = TokenContext if self.method_kind == "tokens" else WeightContext
        if not isinstance(context, expected):
            raise TypeError(f"method {self.config.method!r} returned {type(context).__name__}, expected {expected.__name__}")
        return context

    def _conditioning(self, batch: int, input_ids, attention_mask, labels, prompt_mask) -> Conditioning:
        """Fill a ``Conditioning`` with exactly what the method declared in ``needs``."""
        needs = self._needs
        cond = Conditioning()
        if needs & {"prompt", "prompt_embeds", "prompt_text"}:
            if input_ids is None:
                raise ValueError(f"method {self.config.method!r} conditions on the prompt: pass input_ids")
            if input_ids.shape[0] != batch and batch != 1:
                raise ValueError(f"videos: {batch} video(s) for a text batch of {input_ids.shape[0]}")
            mask = question_mask(input_ids, attention_mask, self.video_token_id, labels, prompt_mask)
            embeds = texts = None
            if "prompt_embeds" in needs:
                # Masked positions (the mark, padding, answer) are looked up as id 0: never the mark's own row.
                embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(~mask, 0))
                embeds = embeds.to(self._method_dtype())  # the method computes in its own dtype (as for features)
            if "prompt_text" in needs:
                texts = self._decode_questions(input_ids, mask)
            cond.prompt = Prompt(input_ids, mask, embeds, texts)
        if "text_encoder" in needs:
            cond.text_encoder = self._text_tower()
            if cond.text_encoder is None:
                raise ValueError(
                    f"method {self.config.method!r} needs a text tower: pass wrap_model(text_encoder=...) or a dual "
                    "encoder as vision= (CLIPModel, SiglipModel, their name, or a DualEncoder)"
                )
        if "llm_readout" in needs:
            cond.read_llm = self.read_llm
        if "tokenizer" in needs:
            if self.tokenizer is None:
                raise ValueError(f"method {self.config.method!r} tokenizes text of its own: pass tokenizer= to wrap_model")
            cond.tokenizer = self.tokenizer
        if "teacher" in needs:
            if self._teacher is None:
                raise ValueError(
                    f"method {self.config.method!r} learns from a teacher: pass wrap_model(teacher=...) or "
                    "from_pretrained(teacher=...), a token VideoModel on this LLM or a saved token adapter's "
                    "directory / Hub repo id"
                )
            cond.teacher = self._teacher_tokens
        return cond

    def _text_tower(self) -> Any:
        """The text tower: ``text_encoder=`` when given, else the dual encoder given as ``vision=`` (or None)."""
        if self.text_encoder is not None:
            return self.text_encoder
        return self.vision if hasattr(self.vision, "encode_text") else None

    def _vision_views(self, inputs: VideoInputs) -> dict[str, torch.Tensor]:
        """The vision views the method declared: given with the features (``VideoFeatures``), else derived from the
        features by the dual encoder (``vision=`` or ``text_encoder=``); ValueError naming a view nobody provides."""
        names = self._views
        views = {name: inputs.views[name] for name in names if name in inputs.views}
        missing = [name for name in names if name not in views]
        if missing:
            source = next((m for m in (self.vision, self.text_encoder) if hasattr(m, "derive_views")), None)
            if source is None:
                raise ValueError(
                    f"videos: method {self.config.method!r} needs the vision view(s) {missing}, which nothing "
                    "provides: wrap the model with a dual encoder (vision=CLIPModel, SiglipModel, their name, or a "
                    f"DualEncoder), or pass videos=VideoFeatures(features, views={{{missing[0]!r}: ...}})"
                )
            derived = source.derive_views(inputs.features, missing)
            views.update({name: derived[name].to(device=self.device, dtype=self._method_dtype()) for name in missing})
        return views

    def _teacher_tokens(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None,
                        input_ids: torch.Tensor | None = None,
                        attention_mask: torch.Tensor | None = None) -> TokenContext:
        """The teacher's tokens for these features (``Conditioning.teacher``); frozen, no gradient."""
        with torch.no_grad():
            return self._teacher.encode_video(features, frame_mask, input_ids=input_ids,
                                              attention_mask=attention_mask)

    def _decode_questions(self, input_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        if self.tokenizer is None:
            raise ValueError(f"method {self.config.method!r} reads the question's text: pass tokenizer= to wrap_model")
        current = _current_turn(input_ids, mask, self.video_token_id)
        return [self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
                for row, m in zip(input_ids, current)]

    @torch.no_grad()
    def read_llm(self, context: TokenContext, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> LLMReadout:
        """Run the frozen LLM on ``input_ids`` with ``context`` spliced in (the token path), deltas off.

        ``input_ids`` is the instruction around the video (its ``<video>`` mark, or the video goes after BOS);
        None reads the video alone after BOS. Returns the residual stream entering each decoder layer (hidden
        states 0..L-1) and the attention mask. Used by methods that learn from the LLM's own reading of a video
        (Video2LoRA); the LLM and its outputs are untouched.
        """
        if not isinstance(context, TokenContext):
            raise ValueError(f"read_llm: needs a TokenContext, got {type(context).__name__}")
        context.validate(self.llm_info.hidden_size)
        if input_ids is None:
            bos = self._bos_token_id()
            input_ids = torch.full((context.batch_size, 1), 0 if bos is None else bos, dtype=torch.long,
                                   device=context.embeds.device)
            attention_mask = None
        spliced = self._splice(input_ids, attention_mask, context, None)
        with use_weight_context(self._scope, None):
            out = self.llm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                           position_ids=_positions_from_mask(spliced.attention_mask), output_hidden_states=True,
                           use_cache=False)
        return LLMReadout(tuple(out.hidden_states[:-1]), spliced.attention_mask.bool())

    def _resolve_context(self, videos, frame_mask, context, input_ids, attention_mask, labels=None,
                         prompt_mask=None) -> VideoContext | None:
        if videos is not None and context is not None:
            raise ValueError("pass either videos= or context=, not both")
        if context is None and videos is not None:
            context = self.encode_video(videos, frame_mask, input_ids=input_ids, attention_mask=attention_mask,
                                        labels=labels, prompt_mask=prompt_mask)
        elif context is not None:
            self.check_context(context)
        if context is None:
            return None
        batch = input_ids.shape[0] if input_ids is not None else None
        if batch is not None and context.batch_size != batch:
            if context.batch_size == 1:
                context = context.select([0] * batch)
            else:
                raise ValueError(
                    f"videos: {context.batch_size} video(s) for a text batch of {batch}; pass one video per prompt"
                )
        return context

    def check_context(self, context: Any) -> None:
        """ValueError unless ``context`` can drive this model: right kind, layout, width, finite values."""
        expected = TokenContext if self.method_kind == "tokens" else WeightContext
        if not isinstance(context, expected):
            raise ValueError(
                f"context: a {type(context).__name__} cannot drive a {self.config.method!r} adapter "
                f"(expects {expected.__name__})"
            )
        if getattr(context, "checked_by", None) is self._scope:
            return  # validated once for this model: reusing a context costs nothing
        if isinstance(context, TokenContext):
            context.validate(self.llm_info.hidden_size)
        else:
            context.validate(self._site_layout)
        context.checked_by = self._scope

    # ---- forward / generate ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                videos: Any = None, frame_mask: torch.Tensor | None = None, context: VideoContext | None = None,
                labels: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None, **kwargs: Any):
        """Run the LLM on text plus (optionally) a video per prompt; returns the LLM's output (``.loss`` with labels).

        Prompt-conditioned methods read the question only: with ``labels`` the answer positions (labels != -100)
        are hidden from them; ``prompt_mask`` (True = question token) overrides that.
        """
        self._check_alive()
        self._check_prompt(input_ids)
        context = self._resolve_context(videos, frame_mask, context, input_ids, attention_mask, labels, prompt_mask)
        if context is None:
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if isinstance(context, TokenContext):
            spliced = self._splice(input_ids, attention_mask, context, labels)
            return self.llm(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                            position_ids=_positions_from_mask(spliced.attention_mask), labels=spliced.labels, **kwargs)
        text = strip_video_marks(input_ids, attention_mask, self.video_token_id, labels)
        carry_context_through_checkpointing(self.llm)
        with use_weight_context(self._scope, context):
            return self.llm(input_ids=text.input_ids, attention_mask=text.attention_mask, labels=text.labels,
                            **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, videos: Any = None,
                 frame_mask: torch.Tensor | None = None, context: VideoContext | None = None, merge: bool = False,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Generate answers. Returns (B·n, prompt length + new tokens): the prompt as given, then the new tokens.

        n is ``num_return_sequences`` (each prompt's rows are consecutive, as in transformers). The video context is
        computed once for the call and reused at every decoding step. ``merge=True`` (one video, weight methods)
        folds the delta into the base weights for the call and restores them afterwards.
        """
        self._check_alive()
        self._check_prompt(input_ids)
        context = self._resolve_context(videos, frame_mask, context, input_ids, attention_mask)
        if context is None:
            return self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        if isinstance(context, TokenContext):
            if merge:
                raise ValueError("merge=True applies to weight-space methods only")
            spliced = self._splice(input_ids, attention_mask, context, None)
            new = self.llm.generate(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                                    **generate_kwargs)
            return _prompt_then_new(input_ids, new)
        text = strip_video_marks(input_ids, attention_mask, self.video_token_id)
        if merge:
            if input_ids.shape[0] != 1:
                raise ValueError("merge=True needs a batch of one prompt and one video")
            with self.merged(context):
                out = self.llm.generate(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                        **generate_kwargs)
        else:
            # transformers expands the batch (beams, returned sequences) inside generate: follow its rows.
            hook = self.llm.register_forward_pre_hook(_ExpandContext(self._scope, context), with_kwargs=True)
            try:
                with use_weight_context(self._scope, context):
                    out = self.llm.generate(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                            **generate_kwargs)
            finally:
                hook.remove()
        return _prompt_then_new(input_ids, out[:, text.input_ids.shape[1]:])

    def _check_prompt(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is None:
            raise ValueError("input_ids: required (the prompt)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a (batch, length) tensor, got {_describe(input_ids)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: empty prompt batch (shape {tuple(input_ids.shape)})")

    @contextlib.contextmanager
    def use(self, context: WeightContext) -> Iterator["VideoModel"]:
        """Make ``context`` active for plain ``vm.llm(...)`` calls inside the block (weight methods).

        The context is visible to this model only, and only in this thread or task: work handed to another
        thread inside the block runs without the video (pass ``context=`` to each call there instead).
        """
        self._check_alive()
        if not isinstance(context, WeightContext):
            raise ValueError("use(): needs a WeightContext (token methods pass context= to forward/generate)")
        self.check_context(context)
        carry_context_through_checkpointing(self.llm)
        with use_weight_context(self._scope, context):
            yield self

    @contextlib.contextmanager
    def merged(self, context: WeightContext) -> Iterator["VideoModel"]:
        """Fold one video's delta into the base weights inside the block; the weights are restored bit-exactly.

        While merged, the model serves only this video: a call with another context raises. Merging is exclusive:
        another thread waits for the block to end. The same thread may re-enter with the same video (nested
        ``merged`` or ``generate(..., merge=True)``); re-entering with another video raises RuntimeError.
        """
        self._check_alive()
        if not isinstance(context, WeightContext) or context.batch_size != 1:
            raise ValueError("merged(): needs a WeightContext of exactly one video")
        self.check_context(context)
        me = threading.get_ident()
        if self._merge_owner == me:
            if not _same_video(context, self._merged):
                raise RuntimeError(
                    "merged(): another video is already merged into this model by this thread; leave its "
                    "merged() block first"
                )
            self._merge_depth += 1
            try:
                with use_weight_context(self._scope, self._merged):
                    yield self
            finally:
                self._merge_depth -= 1
            return
        with self._merge_lock:
            merged = []
            self._merge_owner, self._merge_depth, self._merged = me, 1, context
            try:
                for wrapper in self._wrappers.values():
                    wrapper.merge(context)
                    merged.append(wrapper)
                with use_weight_context(self._scope, context):
                    yield self
            finally:
                for wrapper in merged:
                    wrapper.unmerge()
                self._merge_owner, self._merge_depth, self._merged = None, 0, None

    def _splice(self, input_ids, attention_mask, context: TokenContext, labels):
        video_token_id = self.video_token_id if self.video_token_id is not None else -1
        spliced = splice_video_tokens(input_ids, attention_mask, context, self.llm.get_input_embeddings(),
                                      video_token_id, bos_token_id=self._bos_token_id(), labels=labels)
        limit = getattr(self.llm.config, "max_position_embeddings", None)
        if isinstance(limit, int) and spliced.input_ids.shape[1] > limit:
            raise ValueError(
                f"videos: the prompt ({input_ids.shape[1]} tokens) plus {context.num_tokens} video tokens makes "
                f"{spliced.input_ids.shape[1]} positions, beyond the LLM's max_position_embeddings={limit}; "
                "use fewer frames or a method with fewer visual tokens"
            )
        return spliced

    def _bos_token_id(self) -> int | None:
        bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
        return bos if bos is not None else getattr(self.llm.config, "bos_token_id", None)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Remove the adapter and return the original LLM, its modules and weights bit-identical."""
        self._check_alive()
        self._refuse_inside_merged("unwrap()")
        remove_lowrank(self.llm, self._wrappers)
        self._wrappers = {}
        self._unwrapped = True
        for p in self.llm.parameters():
            p.requires_grad_(True)
        return self.llm

    def __getstate__(self) -> dict[str, Any]:
        # A lock can be neither copied nor pickled; copy.deepcopy(vm) gets a fresh one instead.
        state = self.__dict__.copy()
        state.pop("_merge_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._merge_lock = threading.Lock()
        self._merge_owner, self._merge_depth, self._merged = None, 0, None

    def _refuse_inside_merged(self, what: str) -> None:
        # Waiting for the merge lock inside our own merged() block would never end.
        if self._merge_owner == threading.get_ident():
            raise RuntimeError(f"{what} inside a merged() block: leave the block first (the weights hold a video)")

    def _check_alive(self) -> None:
        if self._unwrapped:
            raise RuntimeError("this VideoModel was unwrapped; wrap the LLM again to use a video adapter")

    # ---- saving / loading ------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors (the LLM and the vision tower are not included)."""
        return dict(self.method.state_dict())

    def save_pretrained(self, directory: str | Path, *, metrics: dict[str, float] | None = None) -> Path:
        """Write the adapter (config JSON, safetensors, model card) into ``directory`` (created if needed).

        Only those three files are written, each atomically; every other file in ``directory`` is left alone, and
        a ``README.md`` that video2param did not write is kept. A save killed at any point leaves the previous
        adapter or the new one loadable (docs/guarantees.md). Raises ``OSError`` naming the file that could not be
        written, ``ValueError`` for metrics that are not finite numbers.

        A LoRA on the LLM is written first, as a standard PEFT adapter in the subfolder ``llm_lora/``; the adapter's
        config records its weights' SHA-256, so a save killed between the two is refused on load, never mixed.
        """
        from .atomic_files import discard
        from .llm_lora import LORA_SUBDIR, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, llm_lora_config, save_llm_lora
        from .model_card import render_model_card
        from .serialization import check_metrics

        metrics = check_metrics(metrics)
        lora_dir = Path(directory) / LORA_SUBDIR
        lora_sha256 = save_llm_lora(self.llm, lora_dir) if llm_lora_config(self.llm) is not None else None
        fingerprint = self.fingerprint
        vision_name = _vision_name(self.vision)
        card = render_model_card(self.config, fingerprint, method_kind=self.method_kind,
                                 num_parameters=sum(p.numel() for p in self.method.parameters()),
                                 vision_name=vision_name, injected_layers=[s.layer for s in self.llm_info.sites],
                                 metrics=metrics)
        lora_entry = None if lora_sha256 is None else {"path": LORA_SUBDIR, "weights_sha256": lora_sha256}
        save_adapter(directory, self.config, self.adapter_state_dict(), fingerprint, card,
                     extra={"vision_tower": vision_name, "metrics": metrics, "llm_lora": lora_entry})
        if lora_sha256 is None:
            for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):  # a LoRA of an earlier save: not this adapter's
                discard(lora_dir / name)
        return Path(directory)

    def save_base_model(self, directory: str | Path, **save_kwargs: Any) -> Path:
        """Save the LLM as a plain HF checkpoint (original module names, no adapter), e.g. after stage ``sft``.

        The adapter stays attached: the wrappers are taken out for the save and put back afterwards.
        """
        self._check_alive()
        self._refuse_inside_merged("save_base_model()")
        with self._merge_lock:  # never while a video is merged into the weights
            remove_lowrank(self.llm, self._wrappers)
            try:
                self.llm.save_pretrained(directory, **save_kwargs)
            finally:
                for name, wrapper in self._wrappers.items():
                    _set_submodule(self.llm, name, wrapper)
        return Path(directory)

    @classmethod
    def from_pretrained(cls, llm: nn.Module, directory_or_repo_id: str | Path, *, vision: Any = None,
                        tokenizer: Any = None, text_encoder: nn.Module | None = None, teacher: Any = None,
                        revision: str | None = None,
                        token: str | None = None, cache_dir: str | Path | None = None, stage: Stage = "frozen",
                        allow_base_mismatch: bool = False, **hub_kwargs: Any) -> "VideoModel":
        """Wrap ``llm`` with a saved adapter from a local directory or a Hub repo id.

        Checked before ``llm`` is touched: the files (``read_adapter``), the base model's shapes, and a sample of
        its weights. An adapter saved on another base model with the same shapes raises ``AdapterMismatchError``
        unless ``allow_base_mismatch=True`` (then it loads with a warning). Any failure leaves ``llm`` as it was.
        An adapter saved with a LoRA on the LLM (``llm_lora/``) restores it too (``llm`` must then have none).
        """
        import warnings

        from .hub import resolve_adapter_dir
        from .llm_lora import LORA_SUBDIR, detach_llm_lora, load_llm_lora_state, read_llm_lora
        from .serialization import CONFIG_NAME, WEIGHTS_NAME, AdapterMismatchError

        if not isinstance(allow_base_mismatch, bool):
            raise ValueError(f"allow_base_mismatch: expected a bool, got {allow_base_mismatch!r}")
        directory = resolve_adapter_dir(directory_or_repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                        required_files=(CONFIG_NAME, WEIGHTS_NAME), **hub_kwargs)
        loaded = read_adapter(Path(directory))
        where = str(directory_or_repo_id)
        # Check the base model before wrapping it: a mismatch must leave `llm` untouched.
        current = BaseModelFingerprint.of(llm)
        diffs = loaded.fingerprint.differences(current)
        if diffs:
            raise AdapterMismatchError(f"adapter {where} was saved for another base model: " + "; ".join(diffs))
        if loaded.fingerprint.weights_match(current) is False:
            message = (f"adapter {where} was saved for another base model with the same shapes: sampled weights "
                       f"differ (adapter's base: {loaded.fingerprint.name or 'unnamed'}; this model: "
                       f"{current.name or 'unnamed'})")
            if not allow_base_mismatch:
                raise AdapterMismatchError(message + "; pass allow_base_mismatch=True to load it anyway")
            warnings.warn(message + "; loading anyway because allow_base_mismatch=True", UserWarning, stacklevel=2)
        lora = None
        entry = loaded.payload.get("llm_lora")
        if entry is not None:
            if not isinstance(entry, dict) or not isinstance(entry.get("weights_sha256"), str):
                raise ValueError(f"adapter {where}: llm_lora must be an object with a weights_sha256 string, got {entry!r}")
            lora = read_llm_lora(Path(directory) / LORA_SUBDIR, expected_sha256=entry["weights_sha256"])
        model = cls(llm, loaded.config, vision=vision, tokenizer=tokenizer, text_encoder=text_encoder,
                    teacher=teacher, stage=stage, llm_lora=None if lora is None else lora[0])
        try:
            check_state(model.adapter_state_dict(), loaded.state, where)
            model.method.load_state_dict(loaded.state, strict=True)
            if lora is not None:
                load_llm_lora_state(model.llm, lora[1])
        except BaseException:
            model.unwrap()  # leave the LLM exactly as it was passed in
            if lora is not None:
                detach_llm_lora(model.llm)
            raise
        return model

    def export_peft(self, video: Any, directory: str | Path, **kwargs: Any) -> Path:
        """Write one video's weight deltas as a standard PEFT LoRA adapter (see ``video2param.export.export_peft``)."""
        from .export import export_peft

        return export_peft(self, video, directory, **kwargs)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, commit_message: str | None = None,
                    token: str | None = None, metrics: dict[str, float] | None = None, **hub_kwargs: Any) -> str:
        """Save the adapter to a temporary directory and upload it to ``repo_id``; returns the commit reference."""
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "adapter", metrics=metrics)
            return push_folder(folder, repo_id, private=private, token=token,
                               commit_message=commit_message or f"Upload {self.config.method} video adapter",
                               **hub_kwargs)


def wrap_model(llm: nn.Module, config: VideoAdapterConfig | str | None = None, *, method: str | None = None,
               vision: Any = None, tokenizer: Any = None, text_encoder: nn.Module | None = None,
               teacher: Any = None, stage: Stage = "pretrain", llm_lora: Any = None, **options: Any) -> VideoModel:
    """Attach a video adapter to any HuggingFace causal LM.

    ``wrap_model(llm, VideoAdapterConfig(method="vipe"), vision=tower, tokenizer=tok)`` or the short form
    ``wrap_model(llm, method="vipe", rank=32, depth=2)``: common config fields by name, anything else is a
    method option. ``llm_lora=peft.LoraConfig(...)`` puts a LoRA on the LLM (it trains in stage ``sft`` instead of
    the whole LLM); an LLM given as a peft ``PeftModel`` keeps its LoRA the same way.
    """
    if isinstance(config, str):
        if method is not None and method != config:
            raise ValueError(f"method given twice: {config!r} and {method!r}")
        method, config = config, None
    if config is None:
        config = VideoAdapterConfig.split_kwargs(method or "vipe", options)
    elif method is not None or options:
        raise ValueError("pass either a VideoAdapterConfig or method=/options, not both")
    if not isinstance(config, VideoAdapterConfig):
        raise TypeError(f"config: expected a VideoAdapterConfig, got {type(config).__name__}")
    return VideoModel(llm, config, vision=vision, tokenizer=tokenizer, text_encoder=text_encoder, teacher=teacher,
                      stage=stage, llm_lora=llm_lora)


# ---- helpers -------------------------------------------------------------------------------------------------
def _as_vision_encoder(vision: Any, needs: frozenset[str] = frozenset(), views: tuple[str, ...] = ()):
    """``vision=`` as a ``VisionEncoder``: as given, a module wrapped (a CLIP/SigLIP dual model as a ``DualEncoder``),
    or a name/path loaded (as a ``DualEncoder`` when the method reads a text tower or vision views)."""
    if vision is None:
        return None
    from .video.dual_encoder import DualEncoder, is_dual_encoder_model
    from .video.encoder import VisionEncoder

    if isinstance(vision, VisionEncoder):
        return vision
    if isinstance(vision, (str, Path)):
        wants_dual = bool(views or "text_encoder" in needs)
        return DualEncoder.from_pretrained(vision) if wants_dual else VisionEncoder.from_pretrained(vision)
    if is_dual_encoder_model(vision):
        return DualEncoder(vision)
    return VisionEncoder(vision)


def _current_turn(input_ids: torch.Tensor, mask: torch.Tensor, video_token_id: int | None) -> torch.Tensor:
    """The last contiguous run of question positions (the current turn of a multi-turn prompt; a ``<video>`` mark
    inside the question does not split it): earlier turns, cut off by their answers, are left out."""
    inside = mask if video_token_id is None else mask | (input_ids == video_token_id)
    starts = inside & ~torch.nn.functional.pad(inside[:, :-1], (1, 0), value=False)
    run = starts.long().cumsum(dim=1)
    last = (run * inside).amax(dim=1, keepdim=True)
    return mask & (run == last)


def _with_vision_width(config: VideoAdapterConfig, vision) -> VideoAdapterConfig:
    if vision is None:
        return config
    width = int(vision.hidden_size)
    if config.vision_hidden_size is None:
        data = config.to_dict()
        data["vision_hidden_size"] = width
        return VideoAdapterConfig.from_dict(data)
    if config.vision_hidden_size != width:
        raise ValueError(f"vision_hidden_size: config says {config.vision_hidden_size}, the vision tower gives {width}")
    return config


def _resolve_teacher(llm: nn.Module, config: VideoAdapterConfig, method_cls, teacher: Any,
                     tokenizer: Any) -> tuple["VideoModel | None", VideoAdapterConfig]:
    """The frozen token ``VideoModel`` a method learns from, and the config recording where it was loaded from.

    ``teacher``: a token ``VideoModel`` wrapping this same ``llm`` object, a saved token adapter's directory or Hub
    repo id (loaded onto ``llm``: token adapters wrap no module, so both models share it), or None to load the one
    recorded in ``config.options["teacher"]`` (None there too: no teacher until one is given).
    """
    if "teacher" not in method_cls.needs:
        if teacher is not None:
            raise ValueError(f"teacher: method {config.method!r} does not learn from a teacher")
        return None, config
    recorded = config.options.get("teacher")
    if teacher is None:
        if recorded is None:
            return None, config
        teacher = recorded
    if isinstance(teacher, (str, Path)):
        source = str(teacher)
        model = VideoModel.from_pretrained(llm, source, tokenizer=tokenizer, stage="frozen")
        if source != recorded:
            data = config.to_dict()
            data["options"] = {**data["options"], "teacher": source}
            config = VideoAdapterConfig.from_dict(data)
    elif isinstance(teacher, VideoModel):
        model = teacher
    else:
        raise ValueError(
            "teacher: expected a token VideoModel on this LLM or a saved token adapter's directory / Hub repo id, "
            f"got {_describe(teacher)}"
        )
    if model.method_kind != "tokens":
        raise ValueError(
            f"teacher: must be a token adapter that reads the video in context (e.g. 'llava'), got "
            f"{model.config.method!r}"
        )
    if model.llm is not llm:
        raise ValueError(
            "teacher: it wraps another LLM object; the teacher must read with this model's own LLM (wrap the same "
            "llm with the token method, or pass the teacher's saved directory)"
        )
    width, teacher_width = config.vision_hidden_size, model.config.vision_hidden_size
    if width is not None and teacher_width is not None and width != teacher_width:
        raise ValueError(f"teacher: it reads features {teacher_width} wide, this adapter {width} wide")
    model.method.requires_grad_(False)
    model.method.eval()
    return model, config


def _vision_name(vision) -> str | None:
    if vision is None:
        return None
    return getattr(vision, "name", None) or getattr(getattr(vision, "tower", None), "name_or_path", None)


def _positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Position ids that skip padding, as HF generate computes them (so forward and generate agree)."""
    if bool(attention_mask.all()):
        return None
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


def _prompt_then_new(input_ids: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The prompt as given (repeated for each returned sequence), then the generated tokens."""
    repeats = new.shape[0] // input_ids.shape[0]
    prompt = input_ids.repeat_interleave(repeats, dim=0) if repeats > 1 else input_ids
    return torch.cat([prompt, new.to(input_ids.device)], dim=1)


class _ExpandContext:
    """Forward pre-hook: when generate runs k rows per prompt (beams, returned sequences), give each row its video.

    transformers repeats each prompt's rows consecutively (repeat_interleave), so row j belongs to video j // k.
    """

    def __init__(self, scope: InjectionScope, context: WeightContext) -> None:
        self.scope, self.context, self.expanded = scope, context, {}

    def __call__(self, module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        n = self.context.batch_size
        if x is None or x.shape[0] == n or x.shape[0] % n:
            return None
        k = x.shape[0] // n
        if k not in self.expanded:
            self.expanded[k] = self.context.select(torch.arange(n).repeat_interleave(k))
        replace_active_context(self.scope, self.expanded[k])
        return None


def _same_video(a: WeightContext, b: WeightContext | None) -> bool:
    if b is None:
        return False
    if a is b:
        return True
    if a.deltas.keys() != b.deltas.keys():
        return False
    return all(x.scale == y.scale and torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
               for x, y in ((a.deltas[k], b.deltas[k]) for k in a.deltas))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
