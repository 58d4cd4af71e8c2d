"""`BEATs`: filterbank, patch embedding, encoder and (fine-tuned models) the class head."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import checkpoint, hub, serialization
from .attention import check_implementation
from .config import BEATsConfig, check_memory
from .encoder import TransformerEncoder
from .errors import InputError
from .fbank import fbank
from .inputs import ArrayLike, prepare_batch
from .labels import audioset_names, display_names
from .model_output import PATCHES_PER_STEP, BEATsOutput, frame_padding_mask


class BEATs(nn.Module):
    """The BEATs audio encoder (Microsoft, arXiv 2212.09058), numerically exact.

    Build one from a config (random weights, the original's initialisation) or load
    released weights with `from_pretrained`. Use `extract_features` on 16 kHz audio.
    """

    is_tokenizer: ClassVar[bool] = False  # True for BEATsTokenizer: loads tokenizer files

    def __init__(self, cfg: BEATsConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else BEATsConfig()
        _check_memory(cfg, type(self).is_tokenizer, torch.empty(0).device)
        self.cfg = cfg
        embed, dim = cfg.embed_dim, cfg.encoder_embed_dim
        patch = cfg.input_patch_size
        self.patch_embedding = nn.Conv2d(1, embed, kernel_size=patch, stride=patch,
                                         bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(embed)
        self.post_extract_proj = nn.Linear(embed, dim) if embed != dim else None
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = TransformerEncoder(cfg)
        if cfg.finetuned_model:
            self.predictor_dropout = nn.Dropout(cfg.predictor_dropout)
            self.predictor: nn.Linear | None = nn.Linear(dim, cfg.predictor_class)
        else:
            self.predictor = None
        # class index -> AudioSet MID, or the class name of a `beats finetune` model
        self.label_dict: dict[int, str] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def attn_implementation(self) -> str:
        """How attention is computed: the implementation the latest forward pass ran.

        Set it to choose: ``"auto"`` (the default: ``"by_clip"`` for bfloat16 inference on
        a CPU without AMX, else ``"sdpa"``), ``"eager"`` (the plain formula), ``"sdpa"``
        or ``"by_clip"``; all give the same numbers to float rounding (`beats.attention`).
        Before the first forward pass, after a new setting and after ``.to()`` it shows
        the one an inference call would run.
        """
        return self.encoder.attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, name: str) -> None:
        self.encoder.attn_implementation = name

    @property
    def labels(self) -> list[str] | None:
        """Display names of the classes, in index order (fine-tuned models), else None."""
        return None if self.label_dict is None else display_names(self.label_dict)

    # ------------------------------------------------------------------ computation
    def embed_patches(self, features: torch.Tensor) -> torch.Tensor:
        """Filterbank (B, T, 128) -> encoder input (B, S, C), S = 8 * (T // 16)."""
        x = self.patch_embedding(features.unsqueeze(1).to(self.dtype))  # (B, E, T//16, 8)
        x = x.flatten(2).transpose(1, 2)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.dropout_input(x)

    def preprocess(
        self,
        wav: ArrayLike,
        padding_mask: ArrayLike | None = None,
        *,
        lengths: ArrayLike | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked audio -> (normalised filterbank (B, T, 128) float32, lengths (B,))."""
        wav_t, lengths_t = prepare_batch(wav, padding_mask, lengths, device=self.device)
        features, _ = fbank(wav_t, lengths_t, mean=self.cfg.fbank_mean, std=self.cfg.fbank_std)
        return features, lengths_t

    def extract_features(
        self,
        wav: ArrayLike,
        padding_mask: ArrayLike | None = None,
        *,
        lengths: ArrayLike | None = None,
        sample_rate: int = 16000,
        output_hidden_states: bool = False,
        output_layer: int | None = None,
    ) -> BEATsOutput:
        """Embed 16 kHz audio (other rates are resampled when ``sample_rate`` says so).

        Args:
            wav: (N,) or (B, N) samples in [-1, 1] (tensor or numpy; int16/int32 PCM is
                rescaled), or a list of 1-D clips of any lengths.
            padding_mask: (B, N) bool, True at padded samples. Or give ``lengths``.
            lengths: (B,) valid samples per clip.
            sample_rate: the rate of ``wav`` in Hz; anything but 16000 is resampled to
                16 kHz with soxr first (``padding_mask``/``lengths`` count input samples).
            output_hidden_states: also return every layer's output.
            output_layer: stop after layer k (0 = encoder input, L = last; negative counts
                from the end) and return its output as ``features``; the layers above are
                not run, and neither the pre-norm final LayerNorm nor the class head is.

        Each clip's outputs are the same alone or in any padded batch (exact patch-level
        masking; the original misaligns it). Runs under the caller's grad mode, so it
        serves fine-tuning too; for inference `embed` is the same under
        ``torch.inference_mode``.
        """
        output_layer = self._layer_index(output_layer)
        wav_t, lengths_t = prepare_batch(wav, padding_mask, lengths, device=self.device,
                                         sample_rate=sample_rate)
        return self.forward_waveform(
            wav_t, lengths_t, output_hidden_states=output_hidden_states,
            output_layer=output_layer,
        )

    @torch.inference_mode()
    def embed(
        self,
        wav: ArrayLike,
        padding_mask: ArrayLike | None = None,
        *,
        lengths: ArrayLike | None = None,
        sample_rate: int = 16000,
        output_hidden_states: bool = False,
        output_layer: int | None = None,
    ) -> BEATsOutput:
        """`extract_features` under ``torch.inference_mode``: the inference entry point.

        Same arguments and outputs. The outputs are inference tensors: they cannot be
        saved for a later backward pass (``.clone()`` them outside inference mode to
        train a head on them, or use `extract_features` under ``torch.no_grad``).
        """
        return self.extract_features(
            wav, padding_mask, lengths=lengths, sample_rate=sample_rate,
            output_hidden_states=output_hidden_states,
            output_layer=output_layer,
        )

    def forward_waveform(
        self,
        wav: torch.Tensor,
        lengths: torch.Tensor,
        *,
        output_hidden_states: bool = False,
        output_layer: int | None = None,
        mask_keys: bool | None = None,
    ) -> BEATsOutput:
        """The computation on checked tensors, without input checks (see `extract_features`).

        Args:
            wav: (B, N) float32 samples in [-1, 1], zero past each clip's length.
            lengths: (B,) int64 valid samples per clip, each >= 2800.
            output_hidden_states, output_layer, mask_keys: as in `forward_fbank`.
        """
        features, frames = fbank(wav, lengths, mean=self.cfg.fbank_mean, std=self.cfg.fbank_std)
        return self.forward_fbank(
            features, frames, output_hidden_states=output_hidden_states,
            output_layer=output_layer, mask_keys=mask_keys,
        )

    def forward_fbank(
        self,
        features: torch.Tensor,
        frames: torch.Tensor,
        *,
        output_hidden_states: bool = False,
        output_layer: int | None = None,
        mask_keys: bool | None = None,
    ) -> BEATsOutput:
        """Everything after the filterbank, so that several models can share one.

        Args:
            features: (B, T, 128) filterbank (`beats.fbank.fbank`) normalised with this
                model's statistics (``cfg.fbank_mean``, ``cfg.fbank_std``), zero past each
                clip's frames.
            frames: (B,) int64 valid frames per clip (the second output of ``fbank``),
                each >= 16.
            output_hidden_states, output_layer: as in `extract_features` (``output_layer``
                in 0..L).
            mask_keys: give attention the key padding mask. None decides from the data
                (one host sync): only when some position is padded. Traced graphs pass
                True, which gives the same result for any lengths.
        """
        x = self.embed_patches(features)
        mask = frame_padding_mask(frames, x.shape[1])
        if mask_keys is None:
            mask_keys = bool(mask.any())
        x, hidden = self.encoder(
            x, mask if mask_keys else None, output_hidden_states=output_hidden_states,
            output_layer=output_layer,
        )
        keep = (~mask).unsqueeze(-1)
        if mask_keys:  # zero the padded positions (nothing to do without padding)
            x = x * keep
            hidden = tuple(h * keep for h in hidden)
        out = BEATsOutput(features=x, padding_mask=mask)
        if output_hidden_states:
            out.hidden_states = hidden
        if self.predictor is not None and output_layer is None:
            # Pooled in float32 whatever the model's dtype; logits and probs are float32.
            scores = self.predictor(self.predictor_dropout(x)).float() * keep
            out.logits = scores.sum(dim=1) / keep.sum(dim=1)
            out.probs = self.activate(out.logits)
            batch, positions, classes = scores.shape
            out.frame_logits = scores.view(
                batch, positions // PATCHES_PER_STEP, PATCHES_PER_STEP, classes).mean(dim=2)
        return out

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits (..., classes): ``sigmoid`` (multi-label, the released
        models) or ``softmax`` over classes, as ``cfg.predictor_activation`` says. On
        ``frame_logits`` the meaning is the clip's, per step: each class's presence, or
        for single-label models the step's distribution over classes (summing to 1, even
        in silence: thresholds belong well above ``1 / classes``)."""
        if self.cfg.predictor_activation == "softmax":
            return logits.softmax(dim=-1)
        return torch.sigmoid(logits)

    def _layer_index(self, output_layer: int | None) -> int | None:
        """``output_layer`` checked and mapped to 0..L (negative counts from the end)."""
        num_layers = self.cfg.encoder_layers
        if output_layer is None:
            return None
        if not -num_layers - 1 <= output_layer <= num_layers:
            raise InputError(
                f"output_layer={output_layer} is out of range: this model has "
                f"{num_layers} layers (use 0..{num_layers}, or negative from the end)"
            )
        return output_layer % (num_layers + 1)

    forward = extract_features

    # ------------------------------------------------------------------ training helpers
    def freeze(self) -> BEATs:
        """Freeze every parameter and switch to eval mode (frozen-backbone use)."""
        self.requires_grad_(False)
        return self.eval()

    def unfreeze(self) -> BEATs:
        """Make every parameter trainable again (mode is left to the caller)."""
        self.requires_grad_(True)
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_microsoft_checkpoint(
        cls,
        ckpt: dict[str, Any],
        source: str = "checkpoint",
        *,
        config: ConfigLike | None = None,
    ) -> BEATs:
        """Build a model from a loaded checkpoint dict (``cfg``, ``model``, ``label_dict``).

        ``cfg`` may be None (a bare state dict, see `checkpoint.load_pt`) when ``config``
        gives the architecture; ``config``'s keys override the checkpoint's ``cfg``.
        """
        if not isinstance(ckpt.get("model"), dict):
            raise InputError(f"{source}: 'model' must be a dict, got "
                             f"{type(ckpt.get('model')).__name__}")
        cfg = ckpt.get("cfg")
        if cfg is not None and not isinstance(cfg, dict):
            raise InputError(f"{source}: 'cfg' must be a dict, got {type(cfg).__name__}")
        label_dict = ckpt.get("label_dict")
        if label_dict is not None:
            label_dict = {int(k): str(v) for k, v in dict(label_dict).items()}
        merged = _merge_config(cfg, config, source, len(ckpt["model"]))
        return cls._from_parts(merged, ckpt["model"], label_dict, source)

    @classmethod
    def _from_parts(
        cls,
        cfg: dict[str, Any],
        state_dict: dict[str, torch.Tensor],
        label_dict: dict[int, str] | None,
        source: str,
    ) -> BEATs:
        """Build ``cls`` from a config dict and a state dict, checking every key strictly.

        Accepts the weight-norm key styles and repeated position tables of Microsoft files,
        and OpenBEATs/ESPnet files: keys under ESPnet's ``encoder.`` prefix (other parts of
        the ESPnet model are set aside with a warning) and its padding-mask convolutions
        (`checkpoint.prepare_state_dict`).
        """
        is_tokenizer = checkpoint.is_tokenizer_state_dict(state_dict)
        if cls.is_tokenizer != is_tokenizer:
            raise hub.ModelKindError(hub.kind_mismatch(source, is_tokenizer))
        model = _build_for_loading(cls, BEATsConfig.from_dict(cfg))
        state_dict, outside = checkpoint.prepare_state_dict(state_dict, source)
        if outside:
            warnings.warn(
                f"{source}: ignoring {len(outside)} keys outside the BEATs encoder "
                f"({checkpoint.key_examples(outside)}): the file holds a whole ESPnet model, and "
                "beats loads its encoder (the keys under 'encoder.')",
                UserWarning, stacklevel=3,
            )
        checkpoint.check_keys(model, state_dict, source)
        model.load_state_dict(state_dict, strict=True)
        model.label_dict = label_dict
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        config: ConfigLike | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        attn_implementation: str = "auto",
    ) -> BEATs:
        """Load a checkpoint from anywhere; returned in eval mode.

        ``name_or_path`` is, in the order tried:

        - a local path: a Microsoft or OpenBEATs ``.pt`` (read with ``weights_only=True``,
          so a file that would run code is refused), a bare state dict (an ESPnet ``.pth``;
          needs ``config``), a ``model.safetensors`` with its ``config.json`` (or with
          ``config``), or a folder written by `save_pretrained` or ``beats convert``;
        - a registry name or alias, any case (``BEATs_iter3_plus_AS2M``, ``as2m-cpt2``,
          ``default``; see ``beats models``): downloaded once into the beats cache
          (``cache_dir``, else ``$BEATS_CACHE``, else ``~/.cache/beats``), checked and
          converted to safetensors, so later loads never unpickle anything;
        - a Hugging Face Hub repo id ``owner/name`` holding ``config.json`` and
          ``model.safetensors``, at ``revision``, through huggingface_hub and its cache
          (or ``cache_dir``).

        ``config`` (a `BEATsConfig`, a dict of ``cfg`` keys, or the path of a JSON file of
        them) gives the architecture of a bare state dict; its keys override those of a
        checkpoint that has its own (``fbank_mean``/``fbank_std``, say).

        ``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` forbid downloads: cached files
        load, anything else is an error that says what is missing. The model is moved to
        ``device`` and cast to ``dtype`` when given. ``attn_implementation`` sets
        `attn_implementation` (checked before anything is loaded).
        """
        check_implementation(attn_implementation)

        def convert(pt_path: Path, out_dir: Path) -> None:
            ckpt = checkpoint.load_pt(pt_path)
            cls.from_microsoft_checkpoint(ckpt, source=str(pt_path)).save_pretrained(out_dir)

        found = hub.resolve(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            convert=convert,
            tokenizer=cls.is_tokenizer,
            config_given=config is not None,
        )
        if found.pt is not None:
            model = cls.from_microsoft_checkpoint(checkpoint.load_pt(found.pt), found.source,
                                                  config=config)
        else:
            assert found.weights is not None
            cfg = None if found.config is None else serialization.read_config(found.config)[0]
            state_dict = serialization.read_weights(found.weights)
            labels = None if found.labels is None else serialization.read_labels(found.labels)
            cfg = _merge_config(cfg, config, found.source, len(state_dict))
            model = cls._from_parts(cfg, state_dict, labels, found.source)
        model.attn_implementation = attn_implementation
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and (with labels) ``labels.json``.

        Each file is written under a temporary name and renamed into place; loading the
        folder with `from_pretrained` gives back identical tensors. Returns the folder.
        """
        return serialization.write_pretrained(
            save_directory, self.cfg.to_dict(), self.state_dict(), self.label_dict,
            architecture=type(self).__name__,
        )

    def save_microsoft_checkpoint(self, path: str | Path) -> Path:
        """Write the model as a Microsoft-format ``.pt`` (atomically): ``cfg``, ``model`` in
        the original's key layout (weight norm as ``weight_g``/``weight_v``, the shared
        relative position table under every layer's name) and, for fine-tuned models with
        labels, ``label_dict``. The original code and `from_pretrained` both load it.
        """
        labels = self.label_dict if self.predictor is not None else None
        return checkpoint.save_microsoft_checkpoint(
            path, self.cfg, self.state_dict(), labels, tokenizer=self.is_tokenizer
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        commit_message: str = "Upload BEATs model",
        create_pr: bool = False,
    ) -> str:
        """Upload the `save_pretrained` files to a Hugging Face Hub repo (created if needed).

        Uses huggingface_hub (``HF_ENDPOINT``, your login or ``token``). Returns the URL of
        the commit (or of the pull request with ``create_pr=True``).
        """
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="beats-push-") as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, revision=revision,
                commit_message=commit_message, create_pr=create_pr,
            )
        return str(info.pr_url if create_pr and info.pr_url else info.commit_url)

    # ------------------------------------------------------------------ classification
    def predict_labels(
        self,
        wav: ArrayLike,
        top_k: int = 5,
        *,
        padding_mask: ArrayLike | None = None,
        lengths: ArrayLike | None = None,
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most probable classes of each clip, as (display name, probability).

        Fine-tuned models only. ``wav``, ``padding_mask`` and ``lengths`` are as in
        `extract_features`; runs under ``torch.inference_mode()``. Classes without a label
        are named ``class N``; ``top_k`` larger than the number of classes gives them all.
        """
        if self.predictor is None:
            raise InputError(
                "predict_labels needs a fine-tuned model (one with a class head), such as "
                "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2; this model has no head "
                "(cfg.finetuned_model is False): use extract_features for embeddings"
            )
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive int, got {top_k!r}")
        names = audioset_names()
        label_dict = self.label_dict or {}

        def name(index: int) -> str:
            mid = label_dict.get(index)
            return f"class {index}" if mid is None else names.get(mid, mid)

        with torch.inference_mode():
            probs = self.extract_features(wav, padding_mask, lengths=lengths).probs
        assert probs is not None
        values, indices = probs.float().topk(min(top_k, probs.shape[1]), dim=1)
        return [
            [(name(i), p) for p, i in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def detect(self, wav: ArrayLike, padding_mask: ArrayLike | None = None, *,
               lengths: ArrayLike | None = None, sample_rate: int = 16000,
               **config: Any) -> list[list[Any]]:
        """Sound events of each clip: a list per clip of `beats.events.Event` (onset,
        offset, label, score), sorted by onset. Fine-tuned models only. ``wav`` and the
        masks are as in `extract_features`; ``config`` holds `beats.detect.DetectConfig`
        fields (``threshold``, ``median_filter``, ``min_duration``, ``min_gap``,
        ``classes``, ``window``, ``hop``). Each clip is scored alone from its frame
        scores (`BEATsOutput.frame_logits`)."""
        from .detect import DetectConfig, Detector

        detector = Detector(self, DetectConfig.from_options(config))
        clips, sizes = prepare_batch(wav, padding_mask, lengths, sample_rate=sample_rate)
        return [detector.events(clips[b, :n].cpu()) for b, n in enumerate(sizes.tolist())]


ConfigLike = BEATsConfig | dict[str, Any] | str | Path  # what ``config=`` accepts


def _merge_config(
    cfg: dict[str, Any] | None, config: ConfigLike | None, source: str, num_tensors: int
) -> dict[str, Any]:
    """The checkpoint's ``cfg`` with the user's ``config`` keys over it."""
    if config is None:
        if cfg is None:
            raise InputError(
                f"{source} is a bare state dict ({num_tensors} tensors) without the model's "
                "config: give it, as BEATs.from_pretrained(path, config=...) with a "
                "BEATsConfig, a dict or a JSON file of the cfg keys (`beats convert IN OUT "
                "--config cfg.json`)"
            )
        return dict(cfg)
    if isinstance(config, BEATsConfig):
        user = config.to_dict()
    elif isinstance(config, dict):
        user = dict(config)
    elif isinstance(config, (str, Path)):
        user, _ = serialization.read_config(config)
    else:
        raise TypeError("config must be a BEATsConfig, a dict or the path of a JSON file, got "
                        f"{type(config).__name__}")
    return {**(cfg or {}), **user}


def _check_memory(cfg: BEATsConfig, tokenizer: bool, device: torch.device) -> None:
    """`config.check_memory` against the memory of ``device`` (nothing for meta tensors)."""
    if device.type == "meta":
        return
    available = None
    if device.type == "cuda" and torch.cuda.is_available():
        available = torch.cuda.mem_get_info(device)[0]
    check_memory(cfg, tokenizer=tokenizer, available=available,
                 bytes_per_element=torch.get_default_dtype().itemsize)


def _build_for_loading(cls: type[BEATs], cfg: BEATsConfig) -> BEATs:
    """``cls(cfg)`` with uninitialised tensors, for a caller that loads every one of them.

    Skips the random initialisation (seconds for the large models) by building on the meta
    device. Falls back to a normal build when some tensor would not be loaded: a
    non-persistent buffer, or a plain tensor attribute computed in ``__init__``.
    """
    try:
        with torch.device("meta"):
            model = cls(cfg)
    except Exception:
        return cls(cfg)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()) or any(
        isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
        for module in model.modules()
        for value in vars(module).values()
    ):
        return cls(cfg)
    _check_memory(cfg, cls.is_tokenizer, torch.device("cpu"))
    return model.to_empty(device="cpu")
