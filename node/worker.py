"""The worker: claims inference jobs, runs the model, builds the report, hands it to the outbox.

Design (why): inference runs native code (torch, image codecs) on untrusted input. A segfault or
an out-of-memory kill there must not take the receiver down, so by default
(`model.isolation = "process"`) each worker thread drives its own *supervised child process*
that loads the checkpoint once and answers "predict these files" requests over a pipe:

- the child dies (crash, OOM kill) -> the job is failed with "inference process died" (retried
  up to `retry.max_attempts`), the child is restarted for the next job;
- a job exceeds `model.job_timeout_s` -> the child is killed, same as above;
- the node itself is killed -> the job's lease expires / `recover_on_start` requeues it.

`model.isolation = "thread"` runs the Predictor in the node process (less memory, no isolation;
useful on small machines and in unit tests).

A user-caused problem with a series (`MolreError`, e.g. SeriesError "slices have different
orientations") is final at once: retrying cannot fix it. Other errors are retried with
`retry.job_retry_delay_s` up to `retry.max_attempts`. One bad series never blocks the queue: the
failing job is recorded and the worker takes the next one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

from common.errors import MolreError
from common.log import clean_text, get_logger, redact
from node.background import BackgroundLoop
from node.config import NodeConfig
from node.interfaces import ReportSpool, WorkerMetrics, WorkerStore

log = get_logger("node.worker")


#: A job released because its files are not visible here waits this long before any node
#: claims it again (gives a node that sees them the chance; avoids a claim/release spin).
RELEASE_DELAY_S = 5.0


class InferenceCrash(RuntimeError):
    """The inference process died or timed out (retryable)."""


class UserSeriesError(MolreError):
    """The series cannot be read by the model (final; message from the reader)."""


# ---------------------------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------------------------


def _resampled_voxels(recipe: Any, volume: Any) -> int:
    """Voxels the recipe will allocate when it resamples `volume` (an upper estimate).

    3-D recipes resample to ``spacing`` (the product of extent / spacing is the same in any
    axis order); 2-D recipes pad ``n_slices`` slices to a square field of view at the pixel size.
    """
    import numpy as np

    params = getattr(recipe, "params", None) or {}
    extent = [n * s for n, s in zip(volume.shape, volume.spacing)]
    if params.get("spacing"):
        return int(np.prod(extent) / np.prod([float(v) for v in params["spacing"]]))
    if params.get("n_slices"):
        side = max(extent) / min(volume.spacing)
        return int(int(params["n_slices"]) * side * side)
    return int(np.prod(volume.shape))


def predict_files(
    predictor: Any, paths: list[str], limits: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Read the series under the node's limits, refuse what would resample into a runaway
    volume, predict; the result carries the reader's geometry corrections for the audit trail.

    Raises MolreError (SeriesError) naming the tag or limit when the series must not be read."""
    import math

    from common.errors import SeriesError
    from molre.data.volume import read_series

    max_voxels = (limits or {}).get("max_resampled_voxels")
    # pixels deferred: the 3-D recipes reduce each slice as it is decoded (a thin-slice series
    # never exists at full resolution); the size check below needs headers only
    volume = read_series([Path(p) for p in paths], max_voxels=max_voxels, defer_pixels=True)
    if max_voxels:
        est = _resampled_voxels(getattr(predictor, "recipe", None), volume)
        if est > max_voxels:
            raise SeriesError(
                f"series {volume.series_uid}: preprocessing would resample "
                f"{volume.shape} voxels of {tuple(round(s, 3) for s in volume.spacing)}"
                f" mm into about {est:,} voxels, more than model.max_resampled_voxels "
                f"({max_voxels:,}); refused (check PixelSpacing (0028,0030) and "
                "slice positions)"
            )
    pred = predictor.predict_volume(volume).to_dict()
    bad = [k for k, p in pred.get("probabilities", {}).items() if not math.isfinite(float(p))]
    if bad:
        raise SeriesError(
            f"series {volume.series_uid}: the model produced non-finite "
            f"probabilities for {len(bad)} finding(s) (e.g. {bad[0]}); no report"
        )
    pred["corrections"] = list(volume.meta.get("corrections") or [])
    pred["slice_thickness"] = volume.meta.get("slice_thickness")
    pred["slice_thickness_values"] = list(volume.meta.get("slice_thickness_values") or [])
    key_images = int((limits or {}).get("evidence_key_images") or 0)
    present = [k for k, v in pred.get("decisions", {}).items() if v]
    if key_images > 0 and present:
        # evidence images ([report] evidence): saliency of the Present findings from this
        # model; a failure here never costs the report (the worker audits "evidence_failed")
        try:
            pred["saliency"] = predictor.explain(volume, present, key_images=key_images)
        except Exception as exc:  # noqa: BLE001
            pred["saliency_error"] = f"{type(exc).__name__}: {redact(str(exc), 500)}"
    return pred


def _child_main(
    conn: Any,
    checkpoint: str | None,
    device: str,
    log_json: bool,
    threads: int,
    weights: str | None = None,
) -> None:
    """Entry point of the inference process: load once, then serve predict requests."""
    import signal

    # Ctrl-C reaches the whole process group: the parent stops this child ("stop" / kill), so
    # the child ignores SIGINT instead of printing a KeyboardInterrupt traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # OpenMP threads that wait for work spin by default: on a node whose cores are also busy
    # receiving (or shared), the model's many small ops then ran 4x slower with 2 threads than
    # with 1 (BENCHMARKS.md, thin-slice series); passive waiting yields the core instead
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from common.log import configure_logging

    configure_logging(json_output=log_json, level="WARNING")
    try:
        import torch

        torch.set_num_threads(max(1, threads))
        from molre.checkpoint import Predictor

        predictor = Predictor.from_checkpoint(
            checkpoint or None, device=device, weights=weights or None
        )
        conn.send(
            (
                "ready",
                {
                    "catalog": predictor.catalog.to_dict(),
                    "model_name": predictor.model_name,
                    "checkpoint_hash": predictor.checkpoint_hash,
                    "is_demo": predictor.is_demo,
                },
            )
        )
    except Exception as exc:  # noqa: BLE001 - report and exit; the supervisor decides
        conn.send(("load_error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "crash":  # test hook: simulate a native crash
            os._exit(139)
        if msg[0] == "predict":
            try:
                conn.send(
                    ("ok", predict_files(predictor, msg[1], msg[2] if len(msg) > 2 else None))
                )
            except MolreError as exc:
                conn.send(("user_error", clean_text(exc, 1000)))
            except Exception as exc:  # noqa: BLE001
                # the traceback goes to this process's log (frames, redacted message); the job
                # error and the series reason get one line without header values or raw bytes
                logger = get_logger("node.worker.inference")
                logger.error("inference failed", exc_info=exc)
                conn.send(("error", f"{type(exc).__name__}: {redact(str(exc))}"))


class ProcessEngine:
    """A supervised inference child process (see module docstring)."""

    def __init__(
        self,
        checkpoint: str | None,
        device: str,
        *,
        load_timeout: float = 600.0,
        log_json: bool = True,
        threads: int | None = None,
        target: Any = None,
        weights: str | None = None,
    ) -> None:
        self.target = target or _child_main  # tests substitute a fake child
        self.checkpoint = checkpoint
        self.weights = weights  # [model] weights: backbone base weights for the checkpoint
        self.device = device
        self.load_timeout = load_timeout
        self.log_json = log_json
        self.threads = threads or max(1, (os.cpu_count() or 2))
        self.info: dict[str, Any] | None = None
        self.limits: dict[str, Any] = {}  # read limits sent with every request (make_engine)
        self._proc: Any = None
        self._conn: Any = None
        self._loading: Any = None
        self._prestarted: tuple[Any, Any, float] | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        """The inference process has loaded the checkpoint and is alive."""
        proc = self._proc
        return proc is not None and proc.is_alive()

    def _spawn(self) -> tuple[Any, Any, float]:
        t0 = time.monotonic()
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=self.target,
            name="molre-inference",
            args=(child, self.checkpoint, self.device, self.log_json, self.threads),
            kwargs={"weights": self.weights} if self.weights else {},
            daemon=True,
        )
        proc.start()
        child.close()
        return proc, parent, t0

    def prestart(self) -> None:
        """Spawn the inference process now, without waiting: it imports torch and loads the
        checkpoint while the node opens its database and starts listening, instead of after
        (`ensure_started` then waits for the one already loading)."""
        with self._lock:
            if self._proc is None and self._prestarted is None:
                self._prestarted = self._spawn()

    def _start(self) -> None:
        proc, parent, t0 = self._prestarted or self._spawn()
        self._prestarted = None
        self._loading = proc
        deadline = t0 + self.load_timeout
        try:
            while not parent.poll(0.2):
                if self._cancel.is_set() or time.monotonic() > deadline or not proc.is_alive():
                    if parent.poll(0):
                        break
                    proc.kill()
                    proc.join(5)
                    if self._cancel.is_set():
                        raise InferenceCrash("inference process start cancelled (shutdown)")
                    if not proc.is_alive() and time.monotonic() <= deadline:
                        raise InferenceCrash(
                            f"inference process died while loading (exit code {proc.exitcode})"
                        )
                    raise InferenceCrash(
                        f"inference process did not load the checkpoint "
                        f"within {self.load_timeout:.0f} s"
                    )
        finally:
            self._loading = None
        try:
            kind, payload = parent.recv()
        except EOFError:
            proc.join(5)
            raise InferenceCrash(
                f"inference process died while loading (exit code {proc.exitcode})"
            ) from None
        if kind != "ready":
            proc.join(5)
            raise MolreError(f"checkpoint could not be loaded: {payload}")
        self._proc, self._conn, self.info = proc, parent, payload
        log.info(
            "inference process ready",
            pid=proc.pid,
            model=payload.get("model_name"),
            checkpoint_hash=str(payload.get("checkpoint_hash"))[:16],
            load_s=round(time.monotonic() - t0, 2),
        )

    def ensure_started(self) -> dict[str, Any]:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._discard()
                self._start()
            assert self.info is not None
            return self.info

    def _discard(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def predict(self, paths: list[str], timeout: float) -> dict[str, Any]:
        self.ensure_started()
        with self._lock:
            conn, proc = self._conn, self._proc
            try:
                conn.send(("predict", list(paths), dict(self.limits)))
                ready = conn.poll(timeout)
                if not ready:
                    self._discard()
                    raise InferenceCrash(
                        f"inference exceeded model.job_timeout_s ({timeout:.0f} s); process killed"
                    )
                kind, payload = conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                proc.join(5)
                code = proc.exitcode
                self._discard()
                raise InferenceCrash(f"inference process died (exit code {code})") from None
        if kind == "ok":
            return payload
        if kind == "user_error":
            raise UserSeriesError(payload)
        raise RuntimeError(payload)

    def cancel(self) -> None:
        """Abort a checkpoint load in progress (shutdown)."""
        self._cancel.set()

    def close(self) -> None:
        self._cancel.set()
        with self._lock:
            if self._prestarted is not None:  # spawned, never waited for
                proc, parent, _ = self._prestarted
                self._prestarted = None
                proc.kill()
                proc.join(5)
                parent.close()
            if self._conn is not None and self._proc is not None and self._proc.is_alive():
                try:
                    self._conn.send(("stop",))
                    self._proc.join(2)
                except (OSError, BrokenPipeError):
                    pass
            self._discard()


class ThreadEngine:
    """The Predictor inside the node process (no isolation)."""

    def __init__(self, checkpoint: str | None, device: str, weights: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.weights = weights
        self.device = device
        self.info: dict[str, Any] | None = None
        self.limits: dict[str, Any] = {}
        self._predictor: Any = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._predictor is not None

    def ensure_started(self) -> dict[str, Any]:
        with self._lock:
            if self._predictor is None:
                from molre.checkpoint import Predictor

                p = Predictor.from_checkpoint(
                    self.checkpoint or None, device=self.device, weights=self.weights
                )
                self._predictor = p
                self.info = {
                    "catalog": p.catalog.to_dict(),
                    "model_name": p.model_name,
                    "checkpoint_hash": p.checkpoint_hash,
                    "is_demo": p.is_demo,
                }
            return self.info  # type: ignore[return-value]

    def predict(self, paths: list[str], timeout: float) -> dict[str, Any]:
        self.ensure_started()
        with self._lock:
            try:
                return predict_files(self._predictor, paths, self.limits)
            except MolreError as exc:
                raise UserSeriesError(clean_text(exc, 1000)) from None

    def close(self) -> None:
        self._predictor = None

    def cancel(self) -> None:
        pass

    pid = None


def make_engine(config: NodeConfig, shadow: Any = None) -> ProcessEngine | ThreadEngine:
    """The primary model's engine, or a `[[model.shadow]]` entry's (same isolation/device)."""
    m = config.model
    ckpt = (shadow.checkpoint if shadow is not None else m.checkpoint) or None
    weights = (shadow.weights if shadow is not None else m.weights) or None
    engine: ProcessEngine | ThreadEngine
    if m.isolation == "thread":
        engine = ThreadEngine(ckpt, m.device, weights=weights)
    else:
        threads = max(1, (os.cpu_count() or 2) // max(1, m.workers))
        engine = ProcessEngine(
            ckpt, m.device, log_json=config.logging.json, threads=threads, weights=weights
        )
    engine.limits = {"max_resampled_voxels": m.max_resampled_voxels}
    if shadow is None and config.report.evidence:  # shadows never report, so never explain
        engine.limits["evidence_key_images"] = config.report.evidence_key_images
    return engine


# ---------------------------------------------------------------------------------------------
# the worker loop
# ---------------------------------------------------------------------------------------------


class Worker(BackgroundLoop):
    """One worker thread with its own engine; `WorkerPool` runs `model.workers` of them."""

    def __init__(
        self,
        config: NodeConfig,
        store: WorkerStore,
        spool: ReportSpool,
        *,
        index: int = 0,
        metrics: WorkerMetrics | None = None,
        wake: threading.Event | None = None,
        on_reported: Any = None,
    ) -> None:
        self.on_reported = on_reported
        self.config = config
        self.store = store
        self.spool = spool
        self.metrics = metrics
        node = getattr(store, "node", None) or os.uname().nodename
        self.worker_id = f"{node}:{os.getpid()}:w{index}"
        super().__init__(f"worker-{self.worker_id}", wake)
        self.engine = make_engine(config)
        # shadow mode: each [[model.shadow]] checkpoint in its own engine, loaded at first use
        self.shadows = [(sm, make_engine(config, sm)) for sm in config.model.shadow]
        self._catalog: Any = None
        self.busy = False
        # inference readiness, for the logs, metrics and dashboard ("loading" until the engine
        # has loaded the checkpoint; "unavailable" after a failed load, until a retry works)
        self.engine_state = "loading"
        self.engine_error: str | None = None
        self.engine_since = time.time()
        self.engine_load_s: float | None = None
        self.on_engine_state: Any = None  # WorkerPool: metrics of the whole pool

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in flight (up to `timeout`), then stop the engine."""
        self._signal_stop()
        if not self.busy:
            self.engine.cancel()  # a checkpoint load in progress need not finish
        for _, eng in self.shadows:
            eng.cancel()
        self._join(timeout)
        self.engine.close()
        for _, eng in self.shadows:
            eng.close()

    @staticmethod
    def _warm_up() -> None:
        try:  # import the report code (highdicom) while the checkpoint loads
            import node.report  # noqa: F401
        except Exception:  # noqa: BLE001
            log.exception("report module import failed")

    def _set_engine_state(self, state: str, error: str | None = None) -> None:
        if state == self.engine_state and error == self.engine_error:
            return
        now = time.time()
        if state == "ready":
            self.engine_load_s = round(now - self.engine_since, 2)
        self.engine_state, self.engine_error, self.engine_since = state, error, now
        if state == "loading":
            log.info("inference not ready: loading the checkpoint", worker=self.worker_id)
        elif state == "ready":
            log.info("inference ready", worker=self.worker_id, load_s=self.engine_load_s)
        if self.on_engine_state is not None:
            self.on_engine_state()

    def _run(self) -> None:
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        backoff = 1.0
        log.info("inference not ready: loading the checkpoint", worker=self.worker_id)
        while not self._stop.is_set():
            try:
                if not getattr(self.engine, "ready", True) and self.engine_state == "ready":
                    self._set_engine_state("loading")  # restarted after a crash
                self.engine.ensure_started()
                self._set_engine_state("ready")
                backoff = 1.0
            except Exception as exc:  # noqa: BLE001 - keep receiving; retry loading later
                log.error(
                    "inference engine not available", error=redact(str(exc)), retry_in_s=backoff
                )
                self._set_engine_state("unavailable", redact(str(exc), 300))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 300.0)
                continue
            try:
                did = self.run_once()
            except Exception:  # noqa: BLE001
                log.exception("worker loop error")
                did = False
            if not did:
                self._wake.wait(1.0)
                self._wake.clear()

    def catalog(self) -> Any:
        if self._catalog is None:
            from molre.catalog import Catalog

            info = self.engine.ensure_started()
            self._catalog = Catalog.from_dict(info["catalog"])
            from node.notify import unknown_rule_findings

            unknown = unknown_rule_findings(self.config, self._catalog.keys)
            if unknown:
                log.warning(
                    "notification rules name findings this model does not report", findings=unknown
                )
        return self._catalog

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue was empty."""
        m = self.config.model
        job = self.store.claim_job(
            self.worker_id, lease_s=m.job_lease_s, max_attempts=self.config.retry.max_attempts
        )
        if job is None:
            return False
        self.busy = True
        try:
            self.process(job)
        finally:
            self.busy = False
        return True

    def process(self, job: Any) -> None:
        from node.report import (
            NodeIdentity,
            build_sr,
            build_summary_sc,
            read_sources,
            recorded_sources,
            to_bytes,
        )
        from storage import FindingResult

        jlog = log.bind(
            job_id=job.id, series_uid=job.series_uid, version=job.version, attempt=job.attempts
        )
        t0 = time.perf_counter()
        try:
            instances = self.store.series_instances(job.series_uid)
            paths = [
                i.spool_path for i in instances if i.spool_path and Path(i.spool_path).exists()
            ]
            if instances and not paths:
                # none of the files is visible from here: they are on another node's disk (no
                # shared spool), not lost. Give the job back for a node that sees them, without
                # burning an attempt (docs/operations.md, "Several nodes").
                reason = (
                    f"instance files not visible from node {self.store.node} (e.g. "
                    f"{instances[0].spool_path})"
                )
                self.store.release_job(job.id, self.worker_id, reason, delay_s=RELEASE_DELAY_S)
                jlog.warning(
                    "job released: instance files not visible from this node",
                    instances=len(instances),
                )
                return
            if len(paths) < len(instances):
                # never read a part of a series as if it were all of it
                gone = [i for i in instances if i.spool_path not in paths]
                raise UserSeriesError(
                    f"series {job.series_uid}: {len(gone)} of {len(instances)} stored instance "
                    f"file(s) missing from the spool (e.g. SOP Instance UID "
                    f"{gone[0].sop_instance_uid}); resend the complete series"
                )
            if not paths:
                raise UserSeriesError(
                    f"series {job.series_uid}: no stored instance files in the spool"
                )
            jlog.info("inference started", instances=len(paths))
            t_inf = time.perf_counter()
            pred = self.engine.predict(paths, timeout=self.config.model.job_timeout_s)
            inference_s = time.perf_counter() - t_inf
            if self.metrics is not None:
                self.metrics.inference_seconds.observe(inference_s)
            catalog = self.catalog()
            if pred.get("corrections"):
                # the reader changed the geometry (tilt, spacing, gaps): say so in the audit trail
                self.store.log_event(
                    "series",
                    job.series_uid,
                    "geometry_corrected",
                    {"version": job.version, "job_id": job.id, "corrections": pred["corrections"]},
                    study_uid=job.study_uid,
                    series_uid=job.series_uid,
                )
            used = set(pred.get("used_sop_instance_uids") or [])
            evidence_paths = [
                i.spool_path
                for i in instances
                if i.spool_path in paths and (not used or i.sop_instance_uid in used)
            ]
            if self.config.report.evidence:  # key images need every header (positions)
                sources = read_sources(evidence_paths or paths)
            else:  # the SR needs UIDs only beyond the first header: the rows have them
                sources = recorded_sources(
                    evidence_paths or paths,
                    {i.spool_path: i for i in instances if i.spool_path is not None},
                )
            r = self.config.report
            identity = NodeIdentity(
                ae_title=self.config.network.ae_title,
                manufacturer=r.manufacturer,
                device_name=r.device_name,
                institution_name=r.institution_name,
            )
            images = self._evidence(job, sources, instances, pred, catalog, identity, jlog)
            try:
                sr = build_sr(
                    sources,
                    pred,
                    catalog,
                    version=job.version,
                    identity=identity,
                    evidence_images=images,
                )
            except Exception as exc:  # noqa: BLE001 - evidence never costs the report
                if not images:
                    raise
                self._evidence_failed(
                    job,
                    f"SR with evidence references: {type(exc).__name__}: {redact(str(exc), 500)}",
                    jlog,
                )
                images = []
                sr = build_sr(sources, pred, catalog, version=job.version, identity=identity)
            base = f"reports/{job.study_uid}/{job.series_uid}/v{job.version}-{sr.SOPInstanceUID}"
            for n, image in enumerate(images, 1):  # companions of the SR: sent with it
                self.spool.write_atomic(f"{base}.ev{n:03d}.dcm", to_bytes(image.dataset))
            if images:
                self.store.log_event(
                    "series",
                    job.series_uid,
                    "evidence_written",
                    {
                        "version": job.version,
                        "job_id": job.id,
                        "images": len(images),
                        "findings": sorted({i.finding for i in images}),
                        "sop_instance_uids": [str(i.dataset.SOPInstanceUID) for i in images],
                        "source_sop_instance_uids": [i.source_sop_instance_uid for i in images],
                    },
                    study_uid=job.study_uid,
                    series_uid=job.series_uid,
                )
            report_path = self.spool.write_atomic(base + ".dcm", to_bytes(sr))
            if r.secondary_capture:
                sc = build_summary_sc(
                    sources, pred, catalog, version=job.version, identity=identity
                )
                self.spool.write_atomic(base + ".sc.dcm", to_bytes(sc))
            results = [
                FindingResult(
                    key=k, probability=float(p), decision=bool(pred["decisions"].get(k, False))
                )
                for k, p in pred["probabilities"].items()
            ]
            from node.notify import match_rules

            # critical-finding notifications: written with the results, in one transaction
            notices = match_rules(self.config, pred["probabilities"], pred["decisions"])
            current = self.store.finish_job(
                job.id,
                results=results,
                checkpoint_hash=pred.get("checkpoint_hash"),
                model_name=pred.get("model_name"),
                report_path=str(report_path),
                report_sop_uid=str(sr.SOPInstanceUID),
                destinations=[d.name for d in self.config.destinations],
                notifications=notices,
            )
            positives = sum(1 for x in results if x.decision)
            jlog.info(
                "series reported" if current else "report superseded by newer version",
                findings=len(results),
                positives=positives,
                report_sop_uid=str(sr.SOPInstanceUID),
                inference_s=round(inference_s, 3),
                total_s=round(time.perf_counter() - t0, 3),
            )
            if self.metrics is not None and current:
                self.metrics.jobs.labels(outcome="reported").inc()
                self._observe_end_to_end(job.series_uid)
            if current and self.on_reported is not None:
                self.on_reported()
            if current and self.shadows:
                self._run_shadows(job, paths, jlog)
        except UserSeriesError as exc:
            self._fail(job, f"series not readable: {clean_text(exc, 1000)}", final=True, jlog=jlog)
        except Exception as exc:  # noqa: BLE001 - one bad series never blocks the queue
            # exception texts of libraries may quote header values: redacted, one line
            self._fail(
                job, f"{type(exc).__name__}: {redact(str(exc), 1000)}", final=False, jlog=jlog
            )

    def _evidence(
        self,
        job: Any,
        sources: list[Any],
        instances: list[Any],
        pred: dict,
        catalog: Any,
        identity: Any,
        jlog: Any,
    ) -> list[Any]:
        """Key images of the Present findings (`[report] evidence`); [] and an audit event
        "evidence_failed" when they cannot be made -- the SR goes out regardless."""
        if not self.config.report.evidence:
            return []
        if pred.get("saliency_error"):
            self._evidence_failed(job, f"saliency: {pred['saliency_error']}", jlog)
            return []
        if not pred.get("saliency"):
            return []  # nothing Present: nothing to show
        try:
            from node.evidence import build_evidence

            files = {i.sop_instance_uid: i.spool_path for i in instances if i.spool_path}
            return build_evidence(
                sources, files, pred, catalog, version=job.version, identity=identity
            )
        except Exception as exc:  # noqa: BLE001
            self._evidence_failed(job, f"{type(exc).__name__}: {redact(str(exc), 500)}", jlog)
            return []

    def _evidence_failed(self, job: Any, error: str, jlog: Any) -> None:
        jlog.warning("evidence images not made; report sent without them", error=error[:200])
        try:
            self.store.log_event(
                "series",
                job.series_uid,
                "evidence_failed",
                {"version": job.version, "job_id": job.id, "error": error},
                study_uid=job.study_uid,
                series_uid=job.series_uid,
            )
        except Exception:  # noqa: BLE001
            jlog.exception("could not record evidence failure")

    def _run_shadows(self, job: Any, paths: list[str], jlog: Any) -> None:
        """Shadow mode: every `[[model.shadow]]` checkpoint reads the same files after the
        primary reported; its results are recorded (never reported, never exported). A shadow
        that fails is an audit event, never a failure of the job."""
        from storage import FindingResult

        for sm, engine in self.shadows:
            if self._stop.is_set():
                return
            try:
                pred = engine.predict(paths, timeout=self.config.model.job_timeout_s)
                results = [
                    FindingResult(
                        key=k, probability=float(p), decision=bool(pred["decisions"].get(k, False))
                    )
                    for k, p in pred["probabilities"].items()
                ]
                self.store.record_shadow_results(
                    job_id=job.id,
                    series_uid=job.series_uid,
                    version=job.version,
                    model_name=sm.name,
                    model_version=str(pred.get("model_version") or ""),
                    checkpoint_hash=pred.get("checkpoint_hash"),
                    results=results,
                )
                jlog.info(
                    "shadow model recorded",
                    shadow=sm.name,
                    findings=len(results),
                    positives=sum(1 for r in results if r.decision),
                )
            except Exception as exc:  # noqa: BLE001 - a shadow never affects the primary
                error = f"{type(exc).__name__}: {redact(str(exc), 500)}"
                jlog.warning("shadow model failed", shadow=sm.name, error=error[:200])
                try:
                    self.store.log_event(
                        "series",
                        job.series_uid,
                        "shadow_failed",
                        {
                            "model": sm.name,
                            "job_id": job.id,
                            "version": job.version,
                            "error": error,
                        },
                        study_uid=job.study_uid,
                        series_uid=job.series_uid,
                    )
                except Exception:  # noqa: BLE001
                    jlog.exception("could not record shadow failure")

    def _fail(self, job: Any, error: str, *, final: bool, jlog: Any) -> None:
        r = self.config.retry
        if self._stop.is_set() and not final:
            # shutting down mid-inference: leave the job running; recover_on_start requeues it
            jlog.info("job interrupted by shutdown", error=error.splitlines()[0][:200])
            return
        max_attempts = job.attempts if final else r.max_attempts
        try:
            requeued = self.store.fail_job(
                job.id, error, max_attempts=max_attempts, retry_delay_s=r.job_retry_delay_s
            )
        except Exception:  # noqa: BLE001
            jlog.exception("could not record job failure")
            return
        jlog.warning("inference failed", error=error.splitlines()[0][:300], requeued=requeued)
        if self.metrics is not None:
            self.metrics.jobs.labels(outcome="retried" if requeued else "failed").inc()

    def _observe_end_to_end(self, series_uid: str) -> None:
        try:
            rec = self.store.get_series(series_uid)
            if self.metrics is not None and rec.first_instance_at and rec.reported_at:
                self.metrics.end_to_end_seconds.observe(
                    (rec.reported_at - rec.first_instance_at).total_seconds()
                )
        except Exception:  # noqa: BLE001
            pass


class WorkerPool:
    """`model.workers` workers sharing one wake-up event (set when a job is enqueued)."""

    def __init__(
        self,
        config: NodeConfig,
        store: WorkerStore,
        spool: ReportSpool,
        *,
        metrics: WorkerMetrics | None = None,
        on_reported: Any = None,
    ) -> None:
        self.wake_event = threading.Event()
        self.workers = [
            Worker(
                config,
                store,
                spool,
                index=i,
                metrics=metrics,
                wake=self.wake_event,
                on_reported=on_reported,
            )
            for i in range(config.model.workers)
        ]
        self.metrics = metrics
        for w in self.workers:
            w.on_engine_state = self._engine_state_changed
            if hasattr(w.engine, "prestart"):  # load while the rest of the node starts
                w.engine.prestart()
        self._engine_state_changed()

    @property
    def inference_ready(self) -> bool:
        """Every worker's engine has loaded the checkpoint (a series would be read now)."""
        return all(w.engine_state == "ready" for w in self.workers)

    def inference_status(self) -> dict[str, Any]:
        """ "ready", "loading" (some engine still loading the checkpoint) or "unavailable"
        (a load failed; retried with backoff), with the age of that state."""
        states = [w.engine_state for w in self.workers]
        state = (
            "ready"
            if all(s == "ready" for s in states)
            else "unavailable"
            if "unavailable" in states
            else "loading"
        )
        since = max((w.engine_since for w in self.workers), default=time.time())
        return {
            "ready": state == "ready",
            "state": state,
            "for_s": round(time.time() - since, 1),
            "load_s": [w.engine_load_s for w in self.workers],
            "error": next((w.engine_error for w in self.workers if w.engine_error), None),
        }

    def _engine_state_changed(self) -> None:
        if self.metrics is None or not hasattr(self.metrics, "inference_ready"):
            return
        self.metrics.inference_ready.set(1 if self.inference_ready else 0)
        loads = [w.engine_load_s for w in self.workers if w.engine_load_s is not None]
        if loads:
            self.metrics.inference_load_seconds.set(max(loads))

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def wake(self) -> None:
        self.wake_event.set()

    def stop(self, timeout: float = 30.0) -> None:
        for w in self.workers:
            w._stop.set()
        self.wake_event.set()
        for w in self.workers:
            w.stop(timeout)


__all__ = [
    "InferenceCrash",
    "ProcessEngine",
    "ThreadEngine",
    "UserSeriesError",
    "Worker",
    "WorkerPool",
    "make_engine",
]
