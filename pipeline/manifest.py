"""The job manifest: YAML in, a validated `Manifest` and its `Item`s out.

Every problem is found before the first request and reported with its place,
`FILE: jobs[3].aspect_ratio: "7:3" is not one of ... (line 12)`, all at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import sqlite3
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.catalog import RATIO, Catalog, Model, ModelEntry, parse_ratio, shipped
from pipeline.errors import ManifestError
from pipeline.ids import ID_PATTERN, ID_RE, ID_RULE
from pipeline.item import Item, item_fingerprint
from pipeline.locations import check_state_url, credentials_in, is_local, local_path
from pipeline.sources import SourceRow, decode_text, read_rows

AspectRatio = Annotated[str, Field(pattern=RATIO)]  # W:H; which ones, the model's catalog entry says
ImageSize = Annotated[str, Field(pattern=r"^[0-9]+K?$")]  # 512, 1K, 2K, 4K...: as the model takes them
SHUTDOWN_WARNING_DAYS = 30
Quality = Literal["auto", "low", "medium", "high"]
OutputFormat = Literal["png", "jpeg", "webp"]
Background = Literal["auto", "opaque", "transparent"]
Moderation = Literal["auto", "low"]
FLEX_TIMEOUT_S = 1200.0

MatrixValues = Annotated[list[str | int | float], Field(min_length=1)]
Reference = Annotated[str, Field(min_length=1)]  # a reference image: a path or an http(s) URL
MAX_MANIFEST_BYTES = 5_000_000
MAX_DEPTH = 20
MAX_PROBLEMS = 50
MAX_REFERENCE_BYTES = 20_000_000
SECRET_KEYS = {"api_key", "key", "token", "apikey", "authorization", "secret"}


def _http_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/") if value else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Api(_Strict):
    base_url: str | None = None
    api_key_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "IMAGE_API_KEY"
    model: Annotated[str, Field(min_length=1)] = "gemini-2.5-flash-image"
    timeout_s: Annotated[float, Field(gt=0)] = 180.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    stream: bool = False

    _http = field_validator("base_url")(lambda value: _http_url(value))


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = {
    "openai-chat": "IMAGE_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "openai-images": "OPENAI_API_KEY",
}
IMAGES_OPTIONS = ("quality", "output_format", "background", "moderation")


class ProviderSpec(_Strict):
    """One endpoint and key of the pool: an OpenAI-compatible gateway or Google's native API."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,40}$")]
    protocol: Literal["openai-chat", "gemini", "openai-images"] = "openai-chat"
    mode: Literal["online", "batch"] = "online"  # batch: Google's Batch Mode (protocol gemini), half price
    base_url: str | None = None  # openai-chat: env IMAGE_API_BASE_URL; gemini: Google's endpoint
    api_key_env: EnvName | None = None  # default: IMAGE_API_KEY (openai-chat), GEMINI_API_KEY (gemini)
    model: Annotated[str, Field(min_length=1)] | None = None  # this provider's name for the model
    concurrency: Annotated[int, Field(ge=1, le=1024)] = 8  # most requests in flight to this provider
    requests_per_minute: Annotated[float, Field(gt=0)] | None = None
    price_per_image: Annotated[float, Field(ge=0)] | None = None  # USD; default: the manifest's
    priority: Annotated[int, Field(ge=0)] = 1  # lower is used first; equal priorities share the load
    timeout_s: Annotated[float, Field(gt=0)] = 180.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    stream: bool = False  # openai-chat only: ask for server-sent events
    on_size_mismatch: Literal["keep", "fail"] | None = None  # default: the manifest's
    service_tier: Literal["standard", "flex"] | None = None  # gemini: flex is half price, in minutes
    quality: Quality | None = None  # openai-images: as the API takes them; a job may set its own
    output_format: OutputFormat | None = None
    background: Background | None = None
    moderation: Moderation | None = None

    @property
    def read_timeout_s(self) -> float:
        """`timeout_s`, or 20 minutes for a flex provider that sets none (flex answers in 1-15 min)."""
        flex = self.service_tier == "flex" and "timeout_s" not in self.model_fields_set
        return FLEX_TIMEOUT_S if flex else self.timeout_s

    _http = field_validator("base_url")(lambda value: _http_url(value))

    @property
    def key_env(self) -> str:
        return self.api_key_env or DEFAULT_KEY_ENV[self.protocol]

    @property
    def default_base_url(self) -> str | None:
        defaults = {"gemini": GEMINI_BASE_URL, "openai-images": OPENAI_BASE_URL}
        return self.base_url or defaults.get(self.protocol)


class BatchSettings(_Strict):
    """How batch jobs are made and waited for (providers with `mode: batch`)."""

    max_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000  # items per job
    poll_interval_s: Annotated[float, Field(gt=0)] = 30.0  # the first poll; backs off to 5 minutes
    max_wait_s: Annotated[float, Field(gt=0)] = 86_400.0  # stop waiting (jobs stay recorded)
    workers: Annotated[int, Field(ge=1, le=256)] | None = (
        None  # processes decoding results; default: one a core
    )


class Defaults(_Strict):
    aspect_ratio: AspectRatio = "1:1"
    image_size: ImageSize | None = None  # models that take one (gemini-3-pro-image-preview): 1K, 2K, 4K
    count: Annotated[int, Field(ge=1)] = 1


class Job(_Strict):
    """One prompt (`prompt`), one per combination of a `matrix`, or one per row of a file
    (`prompts_file`); `count` images of each."""

    # `matrix` comes first: `id` and `prompt` are checked against its names as they are validated.
    matrix: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], MatrixValues] | None = None
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._{}-]{1,100}$")] | None = None
    prompt: Annotated[str, Field(min_length=1, max_length=32_000)] | None = None
    images: Annotated[list[Reference], Field(min_length=1, max_length=16)] | None = None
    prompts_file: Annotated[str, Field(pattern=r"\.(txt|csv|jsonl)$")] | None = None
    id_field: Annotated[str, Field(min_length=1)] | None = None
    prompt_field: Annotated[str, Field(min_length=1)] | None = None
    aspect_ratio: AspectRatio | None = None
    image_size: ImageSize | None = None
    count: Annotated[int, Field(ge=1)] | None = None
    quality: Quality | None = None  # openai-images: over the provider's (a new value is a new image)
    output_format: OutputFormat | None = None
    background: Background | None = None
    moderation: Moderation | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("id", "prompt")
    @classmethod
    def _known_placeholders(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and "matrix" in info.data:  # absent: the matrix itself is wrong
            unknown = placeholders(value) - set(info.data["matrix"] or {})
            if unknown:
                raise ValueError(f"uses {', '.join(sorted(unknown))}, not in `matrix`")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Job:
        if (self.prompt is None) == (self.prompts_file is None):
            raise ValueError("needs either `prompt` or `prompts_file`, not both")
        if self.prompts_file is None and (self.id_field or self.prompt_field):
            raise ValueError("`id_field` and `prompt_field` go with `prompts_file`")
        if self.prompts_file is not None and self.images is not None:
            raise ValueError("`images` go with `prompt` jobs, not `prompts_file`")
        if self.prompts_file is not None and (self.id is not None or self.matrix is not None):
            raise ValueError("a `prompts_file` job takes its ids from `id_field` (or the prompts), not `id`")
        return self


def placeholders(template: str) -> set[str]:
    """The `{name}` placeholders of a template (`{{` is a literal brace)."""
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None


def expand_matrix(job: Job) -> Iterator[tuple[str | None, str]]:
    """(id, prompt) for each combination of the job's matrix; values are slugged in ids."""
    if not job.matrix:
        yield job.id, str(job.prompt)
        return
    names = list(job.matrix)
    for values in itertools.product(*(job.matrix[name] for name in names)):
        words = {name: str(value) for name, value in zip(names, values, strict=True)}
        slugs = {name: re.sub(r"[^A-Za-z0-9._-]+", "-", word).strip("-") for name, word in words.items()}
        yield (job.id.format_map(slugs) if job.id else None), str(job.prompt).format_map(words)


class Manifest(_Strict):
    name: Annotated[str, Field(pattern=ID_PATTERN)] | None = None
    output: Annotated[str, Field(min_length=1)] | None = None
    api: Api = Api()  # one provider, named `default`; or:
    providers: Annotated[list[ProviderSpec], Field(min_length=1)] | None = None
    model: Annotated[str, Field(min_length=1)] | None = None  # the items' model (default: the providers')
    batch: BatchSettings = BatchSettings()
    concurrency: Annotated[int, Field(ge=1, le=4096)] | None = None  # default: 8, or the providers' sum
    download_concurrency: Annotated[int, Field(ge=1, le=1024)] | None = None
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    max_outage_s: Annotated[float, Field(gt=0)] = 600.0  # a provider with no success this long is down
    backoff_base_s: Annotated[float, Field(gt=0)] = 1.0
    backoff_cap_s: Annotated[float, Field(gt=0)] = 60.0
    url_ttl_s: Annotated[float, Field(gt=0)] = 3600.0
    download_max_mb: Annotated[float, Field(gt=0)] = 50.0
    requests_per_minute: Annotated[float, Field(gt=0)] | None = None
    max_requests: Annotated[int, Field(ge=1)] | None = None
    healthcheck_url: str | None = None
    price_per_image: Annotated[float, Field(ge=0)] | None = None  # USD; default: the model's list price
    state: Annotated[str, Field(min_length=1)] | None = None  # postgresql://... (default: SQLite in output)
    storage_options: dict[str, Any] = {}  # passed to the output's fsspec filesystem (endpoint_url, ...)
    lease_s: Annotated[float, Field(ge=1, le=86400)] = 120.0  # a shared state's item leases
    models: dict[Annotated[str, Field(min_length=1, max_length=200)], ModelEntry] | None = None  # over ours
    on_size_mismatch: Literal["keep", "fail"] = "keep"  # an image of another size than asked
    defaults: Defaults = Defaults()
    jobs: Annotated[list[Job], Field(min_length=1)]
    _base: Path = PrivateAttr(default=Path())  # prompts files are relative to the manifest
    _total: int = PrivateAttr(default=0)  # items, counted by the validation pass
    _prompts: int = PrivateAttr(default=0)  # jobs as expanded: one per prompt, matrix combination or row
    _places: list[int] | None = PrivateAttr(default=None)  # jobs[i] of each job, when some were dropped
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _image_hashes: dict[str, str] = PrivateAttr(default_factory=dict)  # reference file -> sha256

    @property
    def total_items(self) -> int:
        return self._total

    @property
    def expanded_jobs(self) -> int:
        """Jobs as `status` and the report count them: one per prompt, matrix combination or row."""
        return self._prompts

    @property
    def warnings(self) -> list[str]:
        """What is allowed but worth saying (an unknown model), for the CLI to show."""
        return self._warnings

    def numbered_jobs(self) -> Iterator[tuple[int, Job]]:
        """(i, job) of `jobs[i]` in the manifest file."""
        return zip(self._places or range(len(self.jobs)), self.jobs, strict=True)

    _http = field_validator("healthcheck_url")(lambda value: _http_url(value))

    @field_validator("state")
    @classmethod
    def _state_url(cls, value: str | None) -> str | None:
        problem = check_state_url(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = credentials_in(value)
        if found:
            raise ValueError(
                f"{', '.join(found)}: credentials come from the environment (or the store's"
                " own config files and roles), not the manifest"
            )
        return value

    def output_url(self, source: Path) -> str:
        """Where the output goes: a local folder (relative to the working directory) or an fsspec URL."""
        if self.output and not is_local(self.output):
            return self.output.rstrip("/")
        return str(
            Path(local_path(self.output)) if self.output else Path("output") / (self.name or source.stem)
        )

    @property
    def generation_limit(self) -> int:
        """Generation requests in flight at most, over the whole pool."""
        if self.concurrency is not None:
            return self.concurrency
        return sum(p.concurrency for p in self.providers) if self.providers else 8

    @property
    def items_in_flight(self) -> int:
        """Items being generated or downloaded at once: the downloads allowed in flight, and never
        fewer than the generation limit."""
        limit = self.generation_limit
        return max(self.download_concurrency or 2 * limit, limit)

    @property
    def catalog(self) -> Catalog:
        """The models known to this manifest: the shipped catalog, with its `models:` over it."""
        return shipped().extended(self.models)

    @property
    def model_entry(self) -> Model | None:
        """The catalog's entry for the items' model (None: unknown, nothing checked)."""
        return self.catalog.find(self.item_model)

    @property
    def item_model(self) -> str:
        """The model in every item's fingerprint: the same through any provider of the pool."""
        if self.model:
            return self.model
        if self.providers:
            return self.providers[0].model or Api().model
        return self.api.model

    def pool(self) -> list[ProviderSpec]:
        """The providers: `providers:`, or `api:` as one provider named `default`."""
        if self.providers:
            return list(self.providers)
        api = self.api
        return [
            ProviderSpec(
                name="default",
                base_url=api.base_url,
                api_key_env=api.api_key_env,
                model=api.model,
                concurrency=min(self.generation_limit, 1024),
                timeout_s=api.timeout_s,
                connect_timeout_s=api.connect_timeout_s,
                stream=api.stream,
                price_per_image=self.price_per_image,
                requests_per_minute=self.requests_per_minute,
            )
        ]


def derive_id(prompt: str) -> str:
    """A readable, stable id from a prompt: a short slug plus a hash of the whole prompt."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-")
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else f"p-{digest}"


def iter_items(manifest: Manifest) -> Iterator[Item]:
    """Every item of the manifest, in manifest order, one at a time (prompt files read lazily)."""
    model = manifest.item_model
    for prompt in _prompts(manifest):
        inputs = tuple(manifest._image_hashes.get(ref, ref) for ref in prompt.images)
        size, options = prompt.image_size, prompt.options
        fingerprint = item_fingerprint(prompt.prompt, prompt.aspect_ratio, model, inputs, size, options)
        for index in range(prompt.count):
            yield Item(
                prompt.id,
                index,
                prompt.prompt,
                prompt.aspect_ratio,
                model,
                fingerprint,
                prompt.images,
                size,
                options,
            )


@dataclass(frozen=True, slots=True)
class _Prompt:
    """One expanded job: a prompt with its settings, and its place for error messages."""

    place: str
    id: str
    prompt: str
    aspect_ratio: str | None
    image_size: str | None
    count: int
    images: tuple[str, ...]
    row_ratio: bool = False  # the aspect ratio is a prompt-file row's own
    options: tuple[tuple[str, str], ...] = ()  # the job's images API settings


def _prompts(manifest: Manifest, problems: list[str] | None = None) -> Iterator[_Prompt]:
    """Every prompt with its settings; rows with problems are skipped (and described in `problems`
    when given)."""
    defaults = manifest.defaults
    default_ratio_set = "aspect_ratio" in defaults.model_fields_set
    for i, job in manifest.numbered_jobs():
        images = tuple(_reference(manifest._base, ref) for ref in job.images or ())
        # Without an aspect ratio of its own, an edit keeps its input's size (provider contract).
        keep_size = images and not default_ratio_set
        ratio = job.aspect_ratio or (None if keep_size else defaults.aspect_ratio)
        size = job.image_size or defaults.image_size
        count = job.count or defaults.count
        options = tuple((name, str(getattr(job, name))) for name in IMAGES_OPTIONS if getattr(job, name))
        if job.prompt is not None:
            for ident, prompt in expand_matrix(job):
                yield _Prompt(
                    f"jobs[{i}]",
                    ident or derive_id(prompt),
                    prompt,
                    ratio,
                    size,
                    count,
                    images,
                    options=options,
                )
            continue
        path = manifest._base / str(job.prompts_file)
        if not path.is_file():
            continue  # reported by the validation pass
        for row in read_rows(path, job.id_field, job.prompt_field or "prompt"):
            if isinstance(row, SourceRow):
                ident = row.id or derive_id(row.prompt)
                place = f"{path}: line {row.line}"
                yield _Prompt(
                    place,
                    ident,
                    row.prompt,
                    row.aspect_ratio or ratio,
                    size,
                    row.count or count,
                    (),
                    row.aspect_ratio is not None,
                    options,
                )
            elif problems is not None:
                problems.append(f"{path}: {row}")


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema, for editors (yaml-language-server) and other tools."""
    schema = Manifest.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "imagegen pipeline job manifest",
    }


@dataclass(frozen=True)
class Keys:
    """Check that the providers a run will use have their key in the environment: those named (all
    when none is), of the run's mode (default: batch when any provider is a batch one)."""

    environ: Mapping[str, str]
    providers: tuple[str, ...] = ()
    mode: str | None = None


def load_manifest(path: Path, keys: Keys | None = None) -> Manifest:
    """Read, parse and validate a manifest, or raise ManifestError listing every problem (with `keys`,
    the providers' keys missing from the environment too)."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ManifestError([f"{path}: is a directory, not a manifest"]) from None
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError([f"{path}: too large ({len(raw)} bytes, limit {MAX_MANIFEST_BYTES})"])
    try:
        text = decode_text(raw)
    except ValueError as exc:
        raise ManifestError([f"{path}: {exc}"]) from None
    data, lines = _parse_yaml(path, text)
    if not isinstance(data, dict):
        raise ManifestError([f"{path}: must be a mapping with a `jobs` list, got {_kind(data)}"])
    problems: list[str] = []
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(path, lines, _loc(e["loc"]), _describe(e)) for e in exc.errors()]
        manifest = _salvage(data)
    manifest._base = path.parent
    problems += _check_providers(data, path, lines)
    problems += _check_keys(data, path, lines, keys) if keys else []
    problems += _check_model(manifest, data, path, lines, date.today())
    problems += _check_files(manifest, path, lines)
    if len(problems) < MAX_PROBLEMS:
        problems += _check_prompts(manifest, path, lines, MAX_PROBLEMS - len(problems))
    if problems:
        raise ManifestError(problems)
    return manifest


def _salvage(data: dict[str, Any]) -> Manifest:
    """The parts of an invalid manifest that do validate, so that the checks across jobs (duplicate
    ids, reference images, prompt files) still run and come out in the same report."""
    jobs, places = [], []
    raw_jobs = data.get("jobs")
    for i, raw in enumerate(raw_jobs if isinstance(raw_jobs, list) else []):
        with contextlib.suppress(ValidationError):
            jobs.append(Job.model_validate(raw))
            places.append(i)
    fields: dict[str, Any] = {"jobs": jobs}
    for name, model in (("defaults", Defaults), ("api", Api)):
        with contextlib.suppress(ValidationError):
            fields[name] = model.model_validate(data.get(name, {}))
    providers = []
    for raw in _raw_providers(data):
        with contextlib.suppress(ValidationError):
            providers.append(ProviderSpec.model_validate(raw))
    fields["providers"] = providers or None
    manifest = Manifest.model_construct(**fields)
    manifest._places = places
    return manifest


def _check_providers(data: dict[str, Any], path: Path, lines: dict[str, int]) -> list[str]:
    """`api:` or `providers:`, not both; provider names unique; each setting only where it means
    something (for a provider's protocol and mode, or a job's images options)."""
    problems = []
    if "api" in data and "providers" in data:
        problems.append(_problem(path, lines, "providers", "a manifest has `api:` or `providers:`, not both"))
    seen: dict[str, int] = {}
    for i, raw in enumerate(_raw_providers(data)):
        name = raw.get("name")
        if isinstance(name, str) and name in seen:
            text = f'"{name}" is also the name of providers[{seen[name]}]'
            problems.append(_problem(path, lines, f"providers[{i}].name", text))
        if isinstance(name, str):
            seen.setdefault(name, i)
        with contextlib.suppress(ValidationError):  # an invalid one is reported with the fields
            problems += [
                _problem(path, lines, f"providers[{i}].{place}", text)
                for place, text in _misplaced(ProviderSpec.model_validate(raw), _any_references(data))
            ]
    if not any(raw.get("protocol") == "openai-images" for raw in _raw_providers(data)):
        given = data.get("jobs")
        for i, job in enumerate(given if isinstance(given, list) else []):
            for option in [name for name in IMAGES_OPTIONS if isinstance(job, dict) and name in job]:
                text = "only for providers of protocol openai-images (none in this manifest)"
                problems.append(_problem(path, lines, f"jobs[{i}].{option}", text))
    return problems


def _misplaced(provider: ProviderSpec, references: bool) -> list[tuple[str, str]]:
    """A provider's settings its protocol or mode does not take: (place, why)."""
    found = []
    if provider.stream and provider.protocol != "openai-chat":
        found.append(("stream", "only for protocol openai-chat"))
    if provider.mode == "batch" and provider.protocol == "openai-chat":
        found.append(("mode", "batch needs protocol gemini or openai-images"))
    if provider.mode == "batch" and provider.protocol == "openai-images" and references:
        found.append(
            ("mode", "OpenAI's batch takes no reference images (edits are multipart): use mode online")
        )
    if provider.service_tier and provider.protocol != "gemini":
        found.append(("service_tier", "only for protocol gemini"))
    if provider.protocol != "openai-images":
        found += [
            (option, "only for protocol openai-images")
            for option in IMAGES_OPTIONS
            if getattr(provider, option)
        ]
    return found


def _any_references(data: dict[str, Any]) -> bool:
    jobs = data.get("jobs")
    return (
        any(isinstance(job, dict) and job.get("images") for job in jobs) if isinstance(jobs, list) else False
    )


def _raw_providers(data: dict[str, Any]) -> list[dict[str, Any]]:
    raw = data.get("providers")
    return [p for p in raw if isinstance(p, dict)] if isinstance(raw, list) else []


def _check_keys(data: dict[str, Any], path: Path, lines: dict[str, int], keys: Keys) -> list[str]:
    """The key variables, of the providers the run will use, that are not set (read as written, so
    that a provider with other problems is checked too)."""
    raw_api = data.get("api")
    api = raw_api if isinstance(raw_api, dict) else {}
    providers = _raw_providers(data)
    places = [(f"providers[{i}]", raw) for i, raw in enumerate(providers)] if "providers" in data else []
    places = places or [("api", {"name": "default", "api_key_env": api.get("api_key_env")})]
    mode = keys.mode or ("batch" if any(raw.get("mode") == "batch" for _, raw in places) else "online")
    problems = []
    for place, raw in places:
        if (keys.providers and raw.get("name") not in keys.providers) or raw.get("mode", "online") != mode:
            continue
        variable = raw.get("api_key_env") or DEFAULT_KEY_ENV.get(str(raw.get("protocol")), "IMAGE_API_KEY")
        if isinstance(variable, str) and not keys.environ.get(variable):
            text = f"environment variable {variable} is not set (or use --simulate)"
            problems.append(_problem(path, lines, f"{place}.api_key_env", text))
    return problems


def _check_model(
    manifest: Manifest, data: dict[str, Any], path: Path, lines: dict[str, int], today: date
) -> list[str]:
    """Aspect ratios and image sizes the items' model takes, by its catalog entry; an unknown model,
    or one whose announced shutdown has passed or is near, is a warning."""
    model = manifest.model_entry
    place = "model" if manifest.model else "providers[0].model" if manifest.providers else "api.model"
    if model is None:
        priced = manifest.price_per_image is not None or any(
            p.price_per_image is not None for p in manifest.providers or []
        )
        manifest._warnings.append(
            f"{path}: {place}: {manifest.item_model} is not in the model catalog (`pipeline models`):"
            " any W:H ratio and image size are passed through, sizes are not checked"
            + (
                ""
                if priced
                else ", and its price is unknown: set price_per_image, or describe it under models:"
            )
        )
        return []
    manifest._warnings += lifecycle_warnings(f"{path}: {place}", model, today)
    problems: dict[str, str] = {}  # place -> problem, each once
    raw_jobs = data.get("jobs")
    # As written, so that a job with other problems is checked too.
    settings = [("defaults", data.get("defaults"))] + [
        (f"jobs[{i}]", job) for i, job in enumerate(raw_jobs if isinstance(raw_jobs, list) else [])
    ]
    for where, raw in settings:
        raw = raw if isinstance(raw, dict) else {}
        ratio, size = raw.get("aspect_ratio"), raw.get("image_size")
        ratio = ratio if isinstance(ratio, str) and parse_ratio(ratio) else None  # else a field problem
        size = size if isinstance(size, str) and re.fullmatch(r"[0-9]+K?", size) else None
        size_problem = _size_problem(model, size)
        if size_problem:
            problems[f"{where}.image_size"] = size_problem
        elif ratio is not None and not model.takes_ratio(ratio):
            problems[f"{where}.aspect_ratio"] = _ratio_problem(model, ratio)
    return [_problem(path, lines, where, text) for where, text in problems.items()]


def lifecycle_warnings(place: str, model: Model, today: date) -> list[str]:
    """A warning when the model's announced shutdown has passed or is within 30 days (pure)."""
    shutdown = model.entry.shutdown
    if shutdown is None or (shutdown - today).days > SHUTDOWN_WARNING_DAYS:
        return []
    when = "has passed" if shutdown <= today else "is within 30 days"
    instead = f": use {model.entry.replacement}" if model.entry.replacement else ""
    return [f"{place}: {model.name}'s announced shutdown ({shutdown.isoformat()}) {when}{instead}"]


def _size_problem(model: Model, size: str | None) -> str | None:
    if size is None or size in model.image_sizes:
        return None
    if not model.image_sizes:
        return f'"{size}": {model.name} takes no image_size'
    return f'"{size}" is not one of {", ".join(model.image_sizes)} for {model.name}'


def _ratio_problem(model: Model, ratio: str) -> str:
    bounds = model.entry.any_ratio
    if bounds:
        return (
            f'"{ratio}" is outside {model.name}\'s ratios ({bounds.min_ratio:.3g} to {bounds.max_ratio:.3g})'
        )
    return f'"{ratio}" is not offered by {model.name} (it takes {", ".join(model.aspect_ratios)})'


def _check_files(manifest: Manifest, path: Path, lines: dict[str, int]) -> list[str]:
    """Prompt files and reference images exist and are usable; files that are not are dropped."""
    problems = []
    for i, job in manifest.numbered_jobs():
        if job.prompts_file:
            prompts = path.parent / job.prompts_file
            if not prompts.exists() or prompts.is_dir():
                what = "is a directory" if prompts.is_dir() else "no such file"
                problems.append(_problem(path, lines, f"jobs[{i}].prompts_file", f"{what}: {prompts}"))
    return problems + _check_images(manifest, path, lines)


def _reference(base: Path, ref: str) -> str:
    """A reference image as used: an http(s) URL as is, a file as an absolute path."""
    return ref if ref.startswith(("http://", "https://")) else str((base / ref).resolve())


def _check_images(manifest: Manifest, path: Path, lines: dict[str, int]) -> list[str]:
    """Reference files exist, are small enough and decode; their sha256 goes into item keys."""
    problems = []
    for i, job in manifest.numbered_jobs():
        for k, ref in enumerate(job.images or ()):
            place = f"jobs[{i}].images[{k}]"
            resolved = _reference(manifest._base, ref)
            if resolved.startswith("http") or resolved in manifest._image_hashes:
                continue
            try:
                manifest._image_hashes[resolved] = check_reference_image(Path(resolved))
            except ValueError as exc:
                problems.append(_problem(path, lines, place, str(exc)))
    return problems


def check_reference_image(path: Path) -> str:
    """The sha256 of a usable reference image file, or ValueError saying why it is not."""
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    size = path.stat().st_size
    if size > MAX_REFERENCE_BYTES:
        raise ValueError(f"{size} bytes is over the {MAX_REFERENCE_BYTES} byte limit for a reference image")
    from pipeline.imagefile import file_digest, inspect_image  # Pillow, only for manifests with images

    inspect_image(path)
    return file_digest(path)[0]


def _check_prompts(manifest: Manifest, path: Path, lines: dict[str, int], limit: int) -> list[str]:
    """One streaming pass over every prompt: row problems and duplicate ids, in flat memory.

    Counts the items and the expanded jobs. Ids go to a temporary on-disk SQLite table, not a
    Python set, so a million-row prompts file costs no more memory than a ten-row one. Jobs whose
    prompt file is missing were reported already and are skipped.
    """
    problems: list[str] = []
    model = manifest.model_entry
    seen = sqlite3.connect("")  # "" is a private temporary database on disk, deleted on close
    try:
        seen.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, place TEXT) WITHOUT ROWID")
        seen.execute("BEGIN")
        for expanded in _prompts(manifest, problems):
            place, ident, prompt = expanded.place, expanded.id, expanded.prompt
            manifest._total += expanded.count
            manifest._prompts += 1
            ratio = expanded.aspect_ratio
            if expanded.row_ratio and model and ratio and not model.takes_ratio(ratio):
                problems.append(f"{place}: aspect_ratio: {_ratio_problem(model, ratio)}")
            if not ID_RE.fullmatch(ident):
                problems.append(_problem(path, lines, f"{place}.id", f'"{ident}" {ID_RULE}'))
                continue
            try:
                seen.execute("INSERT INTO ids VALUES (?, ?)", (ident, place))
            except sqlite3.IntegrityError:
                (first,) = seen.execute("SELECT place FROM ids WHERE id = ?", (ident,)).fetchone()
                derived = ident == derive_id(prompt)
                problems.append(_duplicate(path, lines, place, ident, first, derived))
            if len(problems) >= limit:
                problems.append("... stopped after that many problems")
                break
    finally:
        seen.close()
    return problems


def _duplicate(path: Path, lines: dict[str, int], place: str, ident: str, first: str, derived: bool) -> str:
    text = f'"{ident}" is also the id of {first}'
    if derived:
        text += " (derived from the prompt: give one of them an id)"
    if place.startswith("jobs["):
        return _problem(path, lines, f"{place}.id", text)
    return f"{place}: id {text}"


def _parse_yaml(path: Path, text: str) -> tuple[Any, dict[str, int]]:
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character already
        node = loader.get_single_node()
        if node is None:
            raise ManifestError(["is empty"])
        lines: dict[str, int] = {}
        _index_lines(node, "", lines, set(), 0)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f" (line {mark.line + 1})" if mark else ""
        raise ManifestError([f"{path}: not valid YAML: {exc.problem}{line}"]) from None
    except yaml.reader.ReaderError as exc:
        char = ord(exc.character) if isinstance(exc.character, str) else exc.character
        where = text[: exc.position].count("\n") + 1
        problem = f"character #x{char:04x} is not allowed in YAML (line {where})"
        raise ManifestError([f"{path}: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([f"{path}: not valid YAML: {exc}"]) from None
    except RecursionError:
        raise ManifestError([f"{path}: nested too deeply"]) from None
    except ManifestError as exc:
        raise ManifestError([f"{path}: {problem}" for problem in exc.problems]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _index_lines(node: yaml.Node, place: str, lines: dict[str, int], seen: set[int], depth: int) -> None:
    """Map each place (`jobs[3].prompt`) to its 1-based line; refuse aliases and deep nesting."""
    if id(node) in seen:
        raise ManifestError([f"YAML aliases are not allowed (line {node.start_mark.line + 1})"])
    if depth > MAX_DEPTH:
        raise ManifestError([f"nested deeper than {MAX_DEPTH} levels (line {node.start_mark.line + 1})"])
    seen.add(id(node))
    lines[place] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = f"{place}.{key.value}" if place else str(key.value)
            _index_lines(value, child, lines, seen, depth + 1)
            lines.setdefault(child, key.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _index_lines(value, f"{place}[{i}]", lines, seen, depth + 1)


def _loc(loc: tuple[int | str, ...]) -> str:
    place = ""
    for part in loc:
        place += f"[{part}]" if isinstance(part, int) else (f".{part}" if place else str(part))
    return place


def _problem(path: Path, lines: dict[str, int], place: str, text: str) -> str:
    """`FILE: place: what is wrong (line N)`, the line of the place or of its nearest parent."""
    parent = place
    while parent and parent not in lines:
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", parent)
    line = f" (line {lines[parent]})" if parent in lines else ""
    return f"{path}: {place}: {text}{line}" if place else f"{path}: {text}{line}"


def _describe(error: Any) -> str:
    kind, value, place = error["type"], error.get("input"), _loc(error["loc"])
    last = str(error["loc"][-1]) if error["loc"] else ""
    if kind == "extra_forbidden":
        if last.lower() in SECRET_KEYS:
            return (
                "API keys do not belong in the manifest: put the key in an environment variable"
                " and name it in api.api_key_env"
            )
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind in ("string_pattern_mismatch", "string_type") and last in ("aspect_ratio", "image_size"):
        wanted = 'a W:H ratio such as "16:9"' if last == "aspect_ratio" else 'a size such as "1K"'
        hint = " (quote it: YAML reads 16:9 unquoted as a number)" if isinstance(value, int) else ""
        return f"{_show(value)} is not {wanted}{hint}"
    if kind == "literal_error":
        return f"{_show(value)} is not one of {error['ctx']['expected']}"
    if kind == "string_pattern_mismatch" and last == "id":
        return f"{_show(value)} {ID_RULE}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{message}, got {_show(value)}" if place and not isinstance(value, dict) else message


def _show(value: Any) -> str:
    text = (
        f'"{value}"'
        if isinstance(value, str)
        else _kind(value)
        if isinstance(value, dict | list)
        else repr(value)
    )
    return text if len(text) <= 80 else text[:77] + "..."


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "nothing"}.get(type(value), type(value).__name__)
