"""The model registry: versioned artifacts with stages, gated promotion and rollback.

Layout under ``root`` (``<data_dir>/registry``)::

    <kind>/<name>/versions/<N>/artifact/...   the files, copied in atomically
    <kind>/<name>/versions/<N>/meta.json      params, metrics, data window, code, checksums
    <kind>/<name>/state.json                  stage of each version + production history
    audit.log                                 one JSON line per stage change (forced ones too)

``kind`` is ``models``, ``indexes`` or ``state``, matching the spec's URIs
(``models:/feature-recommender-mf/production``, ``indexes:/feature-recommender-hnsw/latest``).
A version is written into a temporary folder and renamed into place, so a crash never leaves
a half-registered version; :meth:`Registry.resolve` re-hashes every file and refuses a corrupt
or partial artifact with :class:`ModelError`, so a server keeps the production it has.

Stages: ``staging`` (one per name: registering a new one archives the previous staging),
``production`` (one per name; promotion archives the previous production), ``archived``.
URI selectors: ``production``, ``staging``, a version number, and ``latest``. For ``models``
and ``indexes`` ``latest`` means the current production version: an index is promoted with
the models of the run that built it, so ``latest`` never hands out an index built from a model
that did not pass evaluation. ``state:/...`` (the serving snapshot, data rather than a model)
is not gated: its ``latest`` is the newest registered version.

Example::

    >>> reg = Registry(tmp_path)                                     # doctest: +SKIP
    >>> v = reg.register("feature-recommender-mf", artifact_dir, params={"factors": 64},
    ...                  metrics={}, data_window={"as_of": "2026-02-28T04:00:00"})
    >>> reg.promote(v.name, v.version, criteria={"ndcg@5": "> 0.35"}, metrics={"ndcg@5": 0.41})
    >>> reg.resolve("models:/feature-recommender-mf/production").path
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from featurerec import __version__
from featurerec.errors import ModelError
from featurerec.registry.criteria import check_criteria, failing

log = logging.getLogger(__name__)

Kind = Literal["models", "indexes", "state"]
KINDS: tuple[str, ...] = ("models", "indexes", "state")
#: Kinds whose ``latest`` means "current production" (promotion-gated). ``state`` (the online
#: snapshot, data rather than a model) is not gated: its ``latest`` is the newest version.
GATED_KINDS: tuple[str, ...] = ("models", "indexes")
STAGES: tuple[str, ...] = ("staging", "production", "archived")
_URI = re.compile(r"^(models|indexes|state):/([A-Za-z0-9][A-Za-z0-9_.\-]*)/([A-Za-z0-9_]+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="seconds")


def parse_uri(uri: str) -> tuple[str, str, str]:
    """``models:/name/selector`` -> (kind, name, selector); ModelError if malformed."""
    m = _URI.match(uri.strip())
    if not m:
        raise ModelError(
            f"invalid registry URI {uri!r}: expected models:/NAME/(production|staging|latest|N)"
            " or indexes:/NAME/..."
        )
    return m.group(1), m.group(2), m.group(3)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``folder``, keyed by POSIX relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def code_version() -> dict[str, str | None]:
    """Package version and, when the code runs from a git checkout, its commit sha."""
    sha: str | None = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            sha = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {"package": __version__, "git_sha": sha}


@dataclass
class ModelVersion:
    """One registered version. ``path`` is its artifact folder (verified by ``resolve``)."""

    kind: str
    name: str
    version: int
    stage: str
    path: Path
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    data_window: dict[str, Any] = field(default_factory=dict)
    code_version: dict[str, Any] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    run_id: str | None = None
    #: Stage changes: {"at", "from", "to", "reason", "forced"}.
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"{self.kind}:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["uri"] = self.uri
        return d


class Registry:
    """File-system model registry (see the module docstring). Safe across threads and
    processes: every change happens under a lock file."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._tlock = threading.RLock()

    # -- locking / state -----------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._tlock, open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _dir(self, kind: str, name: str) -> Path:
        if kind not in KINDS:
            raise ModelError(f"unknown registry kind {kind!r} (expected one of {KINDS})")
        if not _NAME.match(name):
            raise ModelError(f"invalid model name {name!r}")
        return self.root / kind / name

    def _state(self, kind: str, name: str) -> dict[str, Any]:
        p = self._dir(kind, name) / "state.json"
        if not p.exists():
            return {"stages": {}, "production_history": []}
        state: dict[str, Any] = orjson.loads(p.read_bytes())
        return state

    def _write_json(self, path: Path, obj: Any) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with tmp.open("wb") as f:
            f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _audit(self, entry: dict[str, Any]) -> None:
        with (self.root / "audit.log").open("ab") as f:
            f.write(orjson.dumps(entry) + b"\n")

    def _version_dir(self, kind: str, name: str, version: int) -> Path:
        return self._dir(kind, name) / "versions" / str(version)

    # -- reading --------------------------------------------------------------------------
    def names(self, kind: str = "models") -> list[str]:
        base = self.root / kind
        if not base.exists():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "versions").is_dir())

    def versions(self, name: str, kind: str = "models") -> list[ModelVersion]:
        vdir = self._dir(kind, name) / "versions"
        if not vdir.exists():
            return []
        nums = sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit())
        return [self.get(name, n, kind=kind) for n in nums]

    def all_versions(self) -> list[ModelVersion]:
        return [v for kind in KINDS for n in self.names(kind) for v in self.versions(n, kind)]

    def get(self, name: str, version: int, kind: str = "models") -> ModelVersion:
        """Metadata of one version (no checksum verification; see :meth:`resolve`)."""
        vdir = self._version_dir(kind, name, version)
        meta_path = vdir / "meta.json"
        if not meta_path.exists():
            known = [v.version for v in self.versions(name, kind)] if vdir.parent.exists() else []
            raise ModelError(
                f"{kind}:/{name}/{version} is not registered"
                + (f" (versions: {known})" if known else f" (no versions of {name!r})")
            )
        meta = orjson.loads(meta_path.read_bytes())
        state = self._state(kind, name)
        stage = state["stages"].get(str(version), "archived")
        return ModelVersion(
            kind=kind,
            name=name,
            version=version,
            stage=stage,
            path=vdir / "artifact",
            params=meta.get("params", {}),
            metrics=meta.get("metrics", {}),
            data_window=meta.get("data_window", {}),
            code_version=meta.get("code_version", {}),
            checksums=meta.get("checksums", {}),
            created_at=meta.get("created_at", ""),
            run_id=meta.get("run_id"),
            history=meta.get("history", []),
        )

    def current(self, name: str, stage: str, kind: str = "models") -> ModelVersion | None:
        """The newest version of ``name`` in ``stage`` (None if there is none)."""
        state = self._state(kind, name)
        nums = [int(v) for v, s in state["stages"].items() if s == stage]
        return self.get(name, max(nums), kind) if nums else None

    def lookup(self, uri: str) -> ModelVersion:
        """The version a URI names, without verifying its files."""
        kind, name, sel = parse_uri(uri)
        if sel.isdigit():
            return self.get(name, int(sel), kind)
        if sel == "latest" and kind not in GATED_KINDS:
            versions = self.versions(name, kind)
            if not versions:
                raise ModelError(f"{uri}: nothing registered yet")
            return versions[-1]
        stage = "production" if sel == "latest" else sel
        if stage not in ("production", "staging"):
            raise ModelError(
                f"{uri}: unknown selector {sel!r} (production, staging, latest or a number)"
            )
        mv = self.current(name, stage, kind)
        if mv is None:
            have = [f"v{v.version} ({v.stage})" for v in self.versions(name, kind)]
            raise ModelError(
                f"{uri}: no {stage} version of {kind}:/{name}"
                + (f" (have: {', '.join(have)})" if have else " (nothing registered yet)")
            )
        return mv

    def resolve(self, uri: str) -> ModelVersion:
        """The version a URI names, with every artifact file re-hashed against its checksum.

        Raises ModelError (naming the file) for a missing, extra, or changed file.
        """
        mv = self.lookup(uri)
        self.verify(mv)
        return mv

    def verify(self, mv: ModelVersion) -> None:
        if not mv.path.is_dir():
            raise ModelError(f"{mv.uri}: artifact folder {mv.path} is missing")
        actual = {p.relative_to(mv.path).as_posix() for p in mv.path.rglob("*") if p.is_file()}
        expected = set(mv.checksums)
        missing = sorted(expected - actual)
        if missing:
            raise ModelError(f"{mv.uri}: artifact is partial, missing {', '.join(missing)}")
        extra = sorted(actual - expected)
        if extra:
            raise ModelError(f"{mv.uri}: artifact has unexpected file(s) {', '.join(extra)}")
        for rel, digest in mv.checksums.items():
            if sha256_file(mv.path / rel) != digest:
                raise ModelError(f"{mv.uri}: checksum mismatch in {rel}: artifact is corrupt")

    # -- writing --------------------------------------------------------------------------
    def register(
        self,
        name: str,
        artifact_dir: str | os.PathLike[str],
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        data_window: Mapping[str, Any] | None = None,
        stage: str = "staging",
        *,
        kind: str = "models",
        run_id: str | None = None,
    ) -> ModelVersion:
        """Copy ``artifact_dir`` in as the next version of ``name``, in ``stage``.

        Registering straight into production is not allowed (use :meth:`promote`, which checks
        criteria). A new staging version archives the previous staging one.
        """
        src = Path(artifact_dir)
        if not src.is_dir():
            raise ModelError(f"cannot register {name}: artifact folder {src} does not exist")
        if stage not in ("staging", "archived"):
            raise ModelError(
                f"cannot register {name} directly into {stage!r}: register to staging, then"
                " promote (promotion checks the criteria)"
            )
        base = self._dir(kind, name)
        with self._locked():
            vroot = base / "versions"
            vroot.mkdir(parents=True, exist_ok=True)
            existing = [int(p.name) for p in vroot.iterdir() if p.name.isdigit()]
            version = max(existing, default=0) + 1
            tmp = vroot / f".tmp-{uuid.uuid4().hex}"
            try:
                shutil.copytree(src, tmp / "artifact")
                sums = checksums(tmp / "artifact")
                meta = {
                    "params": dict(params or {}),
                    "metrics": {k: float(v) for k, v in (metrics or {}).items()},
                    "data_window": dict(data_window or {}),
                    "code_version": code_version(),
                    "checksums": sums,
                    "created_at": _now(),
                    "run_id": run_id,
                    "history": [{"at": _now(), "from": None, "to": stage, "reason": "registered"}],
                }
                self._write_json(tmp / "meta.json", meta)
                os.rename(tmp, vroot / str(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            state = self._state(kind, name)
            if stage == "staging":
                for v, s in state["stages"].items():
                    if s == "staging":
                        state["stages"][v] = "archived"
            state["stages"][str(version)] = stage
            self._write_json(base / "state.json", state)
            self._audit(
                {"at": _now(), "uri": f"{kind}:/{name}/{version}", "to": stage, "op": "register"}
            )
        return self.get(name, version, kind)

    def update_metrics(
        self, name: str, version: int, metrics: Mapping[str, float], kind: str = "models"
    ) -> ModelVersion:
        """Merge evaluation metrics into a version's recorded metrics (artifact untouched)."""
        with self._locked():
            path = self._version_dir(kind, name, version) / "meta.json"
            if not path.exists():
                raise ModelError(f"{kind}:/{name}/{version} is not registered")
            meta = orjson.loads(path.read_bytes())
            meta.setdefault("metrics", {}).update({k: float(v) for k, v in metrics.items()})
            self._write_json(path, meta)
        return self.get(name, version, kind)

    def promote(
        self,
        name: str,
        version: int,
        *,
        criteria: Mapping[str, str] | None,
        metrics: Mapping[str, float] | None = None,
        to: str = "production",
        kind: str = "models",
        force: bool = False,
        reason: str = "",
    ) -> ModelVersion:
        """Move ``version`` to ``to`` (default production) if ``metrics`` pass ``criteria``.

        ``metrics`` defaults to the version's recorded metrics. ``criteria=None`` means no
        criteria are configured, which is only accepted with ``force=True``: the registry never
        promotes an unchecked model silently. A forced promotion is logged (warning + audit).
        The artifact is verified first; a corrupt one is never promoted.
        """
        if to not in ("production", "staging"):
            raise ModelError(f"cannot promote to {to!r} (production or staging)")
        with self._locked():
            mv = self.get(name, version, kind)
            self.verify(mv)
            used = dict(mv.metrics if metrics is None else metrics)
            fails: list[str]
            if criteria is None:
                fails = ["no promotion criteria configured"]
            else:
                fails = failing(check_criteria(criteria, used))
            if fails and not force:
                raise ModelError(f"refusing to promote {mv.uri} to {to}: " + "; ".join(fails))
            if fails:
                log.warning("forced promotion of %s to %s despite: %s", mv.uri, to, fails)
            state = self._state(kind, name)
            prev = [int(v) for v, s in state["stages"].items() if s == to and int(v) != version]
            for v in prev:
                state["stages"][str(v)] = "archived"
                self._append_history(kind, name, v, to, "archived", f"replaced by v{version}")
            old_stage = state["stages"].get(str(version), "archived")
            state["stages"][str(version)] = to
            if to == "production":
                hist = state.setdefault("production_history", [])
                if not hist or hist[-1] != version:
                    hist.append(version)
            self._write_json(self._dir(kind, name) / "state.json", state)
            why = reason or ("forced: " + "; ".join(fails) if fails else "criteria passed")
            self._append_history(kind, name, version, old_stage, to, why, forced=bool(fails))
            self._audit(
                {
                    "at": _now(),
                    "uri": mv.uri,
                    "op": "promote",
                    "from": old_stage,
                    "to": to,
                    "forced": bool(fails),
                    "reason": why,
                    "metrics": used,
                }
            )
        return self.get(name, version, kind)

    def rollback(self, name: str, kind: str = "models") -> ModelVersion:
        """Make the previous production version production again; returns it.

        The current production version is archived. The previous one is verified first, so a
        rollback never lands on a corrupt artifact.
        """
        with self._locked():
            state = self._state(kind, name)
            hist: list[int] = state.get("production_history", [])
            current = [int(v) for v, s in state["stages"].items() if s == "production"]
            if not current:
                raise ModelError(f"{kind}:/{name} has no production version to roll back")
            cur = max(current)
            earlier = [v for v in hist if v != cur]
            if not earlier:
                raise ModelError(
                    f"{kind}:/{name}/{cur} is the only version ever in production: nothing to"
                    " roll back to"
                )
            target = earlier[-1]
            self.verify(self.get(name, target, kind))
            state["stages"][str(cur)] = "archived"
            state["stages"][str(target)] = "production"
            # drop the rolled-back version from the history so a second rollback goes further
            state["production_history"] = [v for v in hist if v != cur]
            self._write_json(self._dir(kind, name) / "state.json", state)
            self._append_history(kind, name, cur, "production", "archived", "rolled back")
            self._append_history(
                kind, name, target, "archived", "production", f"rollback from v{cur}"
            )
            self._audit(
                {"at": _now(), "op": "rollback", "uri": f"{kind}:/{name}", "from": cur,
                 "to": target}
            )  # fmt: skip
        return self.get(name, target, kind)

    def rollback_run(self, run_id: str) -> list[ModelVersion]:
        """Roll back every model and index whose production version came from ``run_id``.

        A pipeline run promotes its models and the index built from them together; this undoes
        them together, so the index never points at item factors of a different model.
        ModelError if ``run_id`` owns no production version. Each target is verified first.
        """
        owned = [
            (kind, name)
            for kind in GATED_KINDS
            for name in self.names(kind)
            if (cur := self.current(name, "production", kind)) is not None and cur.run_id == run_id
        ]
        if not owned:
            raise ModelError(f"no production model or index comes from run {run_id!r}")
        for kind, name in owned:  # check every target before changing anything
            state = self._state(kind, name)
            cur_v = max(int(v) for v, st in state["stages"].items() if st == "production")
            earlier = [v for v in state.get("production_history", []) if v != cur_v]
            if not earlier:
                raise ModelError(
                    f"cannot roll back run {run_id}: {kind}:/{name}/{cur_v} has no earlier"
                    " production version"
                )
            self.verify(self.get(name, earlier[-1], kind))
        return [self.rollback(name, kind) for kind, name in owned]

    def _append_history(
        self,
        kind: str,
        name: str,
        version: int,
        frm: str | None,
        to: str,
        reason: str,
        *,
        forced: bool = False,
    ) -> None:
        path = self._version_dir(kind, name, version) / "meta.json"
        meta = orjson.loads(path.read_bytes())
        meta.setdefault("history", []).append(
            {"at": _now(), "from": frm, "to": to, "reason": reason, "forced": forced}
        )
        self._write_json(path, meta)
