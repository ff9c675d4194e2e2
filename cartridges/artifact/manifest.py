"""The cartridge manifest (`manifest.json`): identity, provenance and checksums of an artifact.

Kept free of torch so that the registry can list and verify artifacts cheaply.
"""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cartridges.errors import CartridgeError, invalid_settings

FORMAT_VERSION = 2  # 2: the manifest's identity is bound into the payload (see `bound_fields`)
MANIFEST_FILE = "manifest.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PAYLOAD_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
# A library (cartridges/library) also carries its unit table and its BM25 router (bm25s's own files, no pickle).
LIBRARY_INDEX_FILE = "library.json"
ROUTER_FILES = {
    "data_name": "router_data.npy",
    "indices_name": "router_indices.npy",
    "indptr_name": "router_indptr.npy",
    "vocab_name": "router_vocab.json",
    "params_name": "router_params.json",
}
LIBRARY_FILES = (LIBRARY_INDEX_FILE, *ROUTER_FILES.values())

Method = Literal["init", "distilled", "composed", "library"]
Precision = Literal["float32", "float16", "int8"]  # how a prefix may be stored (cartridges/artifact/precision.py)
PRECISIONS: tuple[str, ...] = get_args(Precision)


def tool_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cartridges")
    except metadata.PackageNotFoundError:
        return "unknown"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class CorpusInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str = Field(
        description="sha256 over sorted (relative path, content hash) pairs and the tokenizer fingerprint"
    )
    num_documents: int
    num_tokens: int = Field(description="tokens of the whole corpus under the model's tokenizer")
    source: str = Field(description="where the corpus was read from")


class Manifest(BaseModel):
    """Everything needed to trust and reproduce a cartridge, besides its tensors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    format_version: int = Field(default=FORMAT_VERSION, ge=1)
    name: str
    version: int | None = Field(default=None, ge=1, description="assigned by the registry on publish")
    created_at: str = Field(default_factory=utc_now)
    model_id: str
    model_fingerprint: str
    tokenizer_fingerprint: str
    num_tokens: int = Field(ge=1, description="length of the KV prefix in tokens")
    num_frozen_tokens: int = Field(
        ge=0, description="leading tokens not trained (the attention sink); at most num_tokens"
    )
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    dtype: Precision
    corpus: list[CorpusInfo] = Field(description="one entry per corpus; several for composed cartridges")
    method: Method
    method_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    parent: str | None = Field(default=None, description="the reference this one was derived from, if any")
    files: dict[str, str] = Field(default_factory=dict, description="sha256 of each payload file")
    tool_version: str = Field(default_factory=tool_version)

    @model_validator(mode="after")
    def _frozen_within_prefix(self) -> "Manifest":
        if self.num_frozen_tokens > self.num_tokens:
            raise ValueError(f"num_frozen_tokens {self.num_frozen_tokens} is more than num_tokens {self.num_tokens}")
        return self

    @property
    def label(self) -> str:
        """`name@version` once published, else the name."""
        return f"{self.name}@{self.version}" if self.version is not None else self.name

    @property
    def kv_bytes(self) -> int:
        """Memory of the prefix when loaded: tokens x layers x (K and V) x heads x head_dim x 4. Every
        stored precision (`dtype`: float16, int8 with scales) is loaded as float32, so this is not the
        size on disk (a model that runs in 16 bits halves it when it reads the prefix)."""
        return self.num_tokens * self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4

    def to_json(self) -> str:
        """Strict JSON (no NaN/Infinity literals: jq and JavaScript reject them)."""
        return strict_json(self.model_dump(), indent=2) + "\n"

    def bound_fields(self) -> dict[str, Any]:
        """What the payload binds (format 2): every field but those set at publish or computed over the payload."""
        return self.model_dump(exclude={"name", "version", "files"})

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> "Manifest":
        try:
            raw = parse_strict_json(text)
        except ValueError as exc:
            raise CartridgeError(f"{source}: manifest is not valid JSON ({exc}); the artifact is damaged") from None
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise CartridgeError(
                f"{source}: cartridge format v{version} is newer than this tool supports (v{FORMAT_VERSION}); "
                "upgrade cartridges to read it"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise invalid_settings(exc, str(source), "manifest field") from None

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        from cartridges.regular_files import read_regular

        path = folder / MANIFEST_FILE
        if not path.exists():
            raise CartridgeError(f"{folder} is not a cartridge: {MANIFEST_FILE} is missing")
        return cls.from_json(read_regular(path), str(path))


def strict_json(data: Any, indent: int | None = None) -> str:
    """JSON that every parser accepts: a NaN or infinity raises instead of becoming a bare literal."""
    return json.dumps(data, indent=indent, sort_keys=True, allow_nan=False)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_strict_json(text: str | bytes) -> Any:
    """`json.loads` without Python's NaN/Infinity extension; a ValueError names the problem."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(exc.msg) from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None


def manifest_digest(data: bytes) -> str:
    """sha256 of a manifest file's bytes: the content key of an artifact (it holds every payload checksum)."""
    from cartridges.hashing import sha256_bytes

    return sha256_bytes(data)


def payload_files(method: str) -> tuple[str, ...]:
    """The files besides `manifest.json` that an artifact of `method` is made of: a library adds its own."""
    return (*PAYLOAD_FILES, *LIBRARY_FILES) if method == "library" else PAYLOAD_FILES


def payload_checksums(folder: Path, method: str = "init") -> dict[str, str]:
    from cartridges.hashing import sha256_file

    return {name: sha256_file(folder / name) for name in payload_files(method)}


def verify_payload(folder: Path, manifest: Manifest) -> None:
    """Raise if a payload file is missing or its sha256 differs from the manifest's."""
    from cartridges.hashing import sha256_file

    for name in payload_files(manifest.method):
        expected = manifest.files.get(name)
        path = folder / name
        if expected is None:
            raise CartridgeError(f"{folder}: manifest has no checksum for {name}; the artifact is damaged")
        if not path.exists():
            raise CartridgeError(f"{folder}: {name} is missing; the artifact is incomplete")
        if sha256_file(path) != expected:
            raise CartridgeError(
                f"{path}: checksum mismatch (file changed or corrupted since publish); re-publish or restore it"
            )
