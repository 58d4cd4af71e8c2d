"""Where ``from_pretrained`` finds a checkpoint.

In this order: an existing local path (a Microsoft ``.pt``, a ``.safetensors`` file with
its ``config.json`` beside it, or a save_pretrained folder); a registry name or alias (see
`beats.registry`; downloaded and converted once into the beats cache, see `beats.cache`);
a Hugging Face Hub repo id ``owner/name`` (fetched with huggingface_hub, which keeps its
own cache and honours ``HF_ENDPOINT``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import cache, registry
from .errors import InputError, NotFoundError, UnreachableError
from .serialization import CONFIG_NAME, LABELS_NAME, WEIGHTS_NAME, read_config

_PATH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class Resolved:
    """A checkpoint found on disk: a Microsoft ``.pt``, or the safetensors format's files."""

    source: str
    pt: Path | None = None
    config: Path | None = None
    weights: Path | None = None
    labels: Path | None = None  # only when config.json says the model has labels


def offline_reason(local_files_only: bool = False) -> str | None:
    """Why downloads are off (``local_files_only``, ``HF_HUB_OFFLINE``), or None if they are on.

    ``HF_HUB_OFFLINE`` is read when called, so setting it after import counts too.
    """
    if local_files_only:
        return "local_files_only=True"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and getattr(constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE was set when huggingface_hub was imported"
    return None


class ModelKindError(InputError):
    """A tokenizer checkpoint loaded as an encoder, or the other way round."""


def kind_mismatch(source: str, checkpoint_is_tokenizer: bool) -> str:
    """The message for loading a tokenizer as an encoder or the other way round."""
    if checkpoint_is_tokenizer:
        return (f"{source} is an acoustic tokenizer checkpoint (config quant_n/quant_dim, keys "
                "quantize.* and quantize_layer.*): load it with BEATsTokenizer.from_pretrained "
                "(on the command line: `beats tokenize`)")
    return (f"{source} is a BEATs encoder checkpoint without the tokenizer's quantizer: load "
            "it with BEATs.from_pretrained (on the command line: `beats extract`)")


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    convert: Callable[[Path, Path], None],
    tokenizer: bool = False,
    progress: bool | None = None,
    config_given: bool = False,
) -> Resolved:
    """Find ``name_or_path`` on disk, downloading it first when needed.

    Args:
        convert: ``convert(pt_path, out_dir)`` turns a downloaded ``.pt`` into the
            save_pretrained files (for registry downloads).
        tokenizer: whether the caller loads acoustic tokenizers (else encoders); a registry
            entry of the other kind is refused before anything is downloaded.
        config_given: the caller has the model's config, so a ``.safetensors`` file
            without a ``config.json`` beside it is accepted (``config`` is then None).
    """
    text = os.fspath(name_or_path)
    if not isinstance(text, str):
        raise TypeError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}")
    path = Path(text).expanduser()
    if path.exists():
        _no_revision(revision, text, "a local path")
        return _local(path, config_given)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        raise NotFoundError(_missing_path_message(text))

    entry = registry.find(text)
    if entry is not None:
        _no_revision(revision, text, f"the registry name of {entry.name}")
        if (entry.kind == "tokenizer") != tokenizer:
            raise ModelKindError(kind_mismatch(entry.name, entry.kind == "tokenizer"))
        folder = cache.fetch(entry, cache_dir, offline=offline_reason(local_files_only),
                             convert=convert, progress=progress)
        return _folder(folder, f"{entry.name} (beats cache, {folder})")

    if _REPO_ID.match(text):
        return _from_hub(text, revision, cache_dir, local_files_only)

    raise InputError(_unknown_name_message(text))


def _no_revision(revision: str | None, text: str, what: str) -> None:
    if revision is not None:
        raise InputError(
            f"revision={revision!r} applies to Hugging Face Hub repos only, and {text!r} is {what}"
        )


def _looks_like_path(text: str) -> bool:
    """Whether a string that names nothing on disk was meant as a path (not a name or repo)."""
    if text.startswith(("/", "./", "../", "~")) or text.lower().endswith(_PATH_SUFFIXES):
        return True
    return "\\" in text or text.count("/") > 1


def _missing_path_message(text: str) -> str:
    message = f"no checkpoint file or folder at {text}"
    stem = Path(text).stem
    entry = registry.find(stem)
    if entry is not None:
        message += (f"; to download the released checkpoint instead, give its registry name: "
                    f"from_pretrained({entry.name!r})")
    return message


def _unknown_name_message(text: str) -> str:
    message = (f"unknown model {text!r}: it is not an existing file or folder, a registered "
               "model name, or a Hugging Face Hub repo id (owner/name).")
    matches = registry.close_matches(text)
    if matches:
        message += " Did you mean: " + ", ".join(matches) + "?"
    else:
        message += f" The default is {registry.default_model().name}."
    return message + " `beats models` lists every registered name."


def _local(path: Path, config_given: bool = False) -> Resolved:
    if path.is_dir():
        return _folder(path, str(path))
    if path.suffix == ".safetensors":
        config = path.parent / CONFIG_NAME
        if not config.is_file() and config_given:
            return Resolved(source=str(path), weights=path)
        if not config.is_file():
            raise NotFoundError(
                f"{path} needs its {CONFIG_NAME} in the same folder (as save_pretrained and "
                "`beats convert` write them), or the model's config given with config=...; "
                "neither is there"
            )
        return _files(config, path, path.parent / LABELS_NAME, str(path))
    if path.name == CONFIG_NAME:
        return _folder(path.parent, str(path.parent))
    return Resolved(source=str(path), pt=path)


def _folder(folder: Path, source: str) -> Resolved:
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not (config.is_file() and weights.is_file()):
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        pts = [n for n in present if n.endswith((".pt", ".pth"))]
        hint = (f" It holds {', '.join(pts)}: load that file, or convert it with "
                f"`beats convert {pts[0]} DIR`." if pts else "")
        raise NotFoundError(
            f"{folder} is not a beats model folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            f"(as save_pretrained and `beats convert` write them); it has {present or 'nothing'}."
            + hint
        )
    return _files(config, weights, folder / LABELS_NAME, source)


def _files(config: Path, weights: Path, labels: Path, source: str) -> Resolved:
    _, has_labels = read_config(config)
    return Resolved(source=source, config=config, weights=weights,
                    labels=labels if has_labels else None)


def _from_hub(
    repo_id: str, revision: str | None, cache_dir: str | Path | None, local_files_only: bool
) -> Resolved:
    """Fetch ``config.json``, ``model.safetensors`` (and ``labels.json``) from a Hub repo."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = offline_reason(local_files_only)
    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")

    def get(filename: str) -> Path:
        try:
            return Path(hf_hub_download(
                repo_id, filename, revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                local_files_only=offline is not None,
            ))
        except LocalEntryNotFoundError as e:
            if offline is not None:
                raise NotFoundError(
                    f"{filename} of the Hub repo {where} is not in the Hugging Face cache "
                    f"({_hub_cache(cache_dir)}) and downloads are off ({offline}). Load it once "
                    "with network access to cache it"
                ) from None
            cause = e.__cause__ or e.__context__ or e
            raise UnreachableError(
                f"cannot fetch {filename} of the Hub repo {where}: the Hub "
                f"({_hub_endpoint()}) did not answer ({_first_line(cause)}) and the file is "
                "not in the Hugging Face cache. Check the network connection and HF_ENDPOINT, "
                "or give the path of a model folder instead"
            ) from None
        except RevisionNotFoundError:
            raise InputError(f"the Hub repo {repo_id} has no revision {revision!r}") from None
        except RepositoryNotFoundError:
            matches = registry.close_matches(repo_id.split("/")[-1])
            hint = (" Registered names like it: " + ", ".join(matches) + ".") if matches else ""
            raise NotFoundError(
                f"{repo_id!r} is not a local path or a registered model name, and the Hugging "
                f"Face Hub ({_hub_endpoint()}) has no repo by that id that you can access (for a "
                "private or gated repo, log in with `hf auth login`)." + hint
            ) from None
        except EntryNotFoundError:
            if filename == CONFIG_NAME:
                raise NotFoundError(
                    f"the Hub repo {where} has no {CONFIG_NAME}, so it is not in the beats format. "
                    "If it holds a Microsoft .pt, download that file with "
                    "huggingface_hub.hf_hub_download and run `beats convert FILE DIR`"
                ) from None
            raise NotFoundError(
                f"the Hub repo {where} has a {CONFIG_NAME} but no {filename}"
            ) from None

    config = get(CONFIG_NAME)
    _, has_labels = read_config(config)
    weights = get(WEIGHTS_NAME)
    labels = get(LABELS_NAME) if has_labels else None
    return Resolved(source=f"{where} (Hugging Face Hub)", config=config, weights=weights,
                    labels=labels)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_cache(cache_dir: str | Path | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
