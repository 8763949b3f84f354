"""kopf handlers for FLJobs: thin glue between kopf, the builders, the pure lifecycle rules and the API calls.

* create/resume: check the spec (invalid -> Invalid condition, an Event,
  ``kopf.PermanentError``: this job stops, no other job is affected), reuse or
  generate per-site tokens, build every child with an owner reference to the
  FLJob, create-or-patch them.
* ``spec.suspend`` changes: delete the pods (Secrets, ConfigMap and checkpoint
  claim stay) or recreate them.
* a timer per FLJob: list the job's pods by label, poll the server's status
  endpoint (bounded), let :func:`fedkube.operator.status.decide` say what the
  status is, post its Events and delete what it says; after the job finished,
  apply ``ttlSecondsAfterFinished``.

Handlers are registered on a given registry (``register``) so tests run them
against an emulated API in-process. What a handler needs from outside comes
through kopf's ``memo`` (see :class:`Memo`); that is also the seam tests use to
point the status poll at the locally running server.
"""

from __future__ import annotations

import datetime
import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn

import kopf

from fedkube.metrics import OperatorMetrics
from fedkube.metrics.operator import PHASES
from fedkube.operator import builders, certificates, edits, joins, kube, naming, restarts, revoking, views
from fedkube.operator import status as lifecycle
from fedkube.operator.podspec import PodDefaults
from fedkube.operator.policy import AdminPolicy
from fedkube.security.material import JobTls
from fedkube.spec import API_GROUP, PLURAL, FLJob, SpecError, parse_job
from fedkube.spec.model import API_VERSION_NAME
from fedkube.status import JobStatus, Phase

logger = logging.getLogger(__name__)

RESOURCE = (API_GROUP, API_VERSION_NAME, PLURAL)
DEFAULT_INTERVAL = 5.0  # seconds between two looks at a running job
RETRY_DELAY = 5.0  # seconds before retrying a create/resume the API server refused
MAX_RETRY_DELAY = 300.0  # a refusal (quota, policy) retried with exponential backoff up to this
EVENT_MESSAGE_LIMIT = 1000  # Kubernetes keeps about 1 KiB of an Event's message

Clock = Callable[[], float]
StatusUrl = Callable[[Mapping[str, Any]], "str | None"]
StatusFetch = Callable[[str, float], "JobStatus | None"]


class Memo:
    """The names the handlers read from kopf's memo (set them before ``kopf.run``, or let startup fill them).

    * ``api_client``: a ``kubernetes.client.ApiClient`` (default: in-cluster config, else kubeconfig).
    * ``status_url``: server pod -> URL of its /status (default :func:`kube.default_status_url`).
    * ``status_timeout``: seconds per status poll.
    * ``clock``: seconds since the epoch (tests may inject one).
    * ``metrics``: an :class:`fedkube.metrics.OperatorMetrics` to count phases, errors and timeouts (optional).
    * ``log_format``: FEDKUBE_LOG_FORMAT given to the pods (text or json; default text).
    * ``policy``: the admin's :class:`fedkube.operator.policy.AdminPolicy` (default: the safe one).
    * ``network``: a :class:`fedkube.operator.netpol.NetworkPolicyConfig`, or None for no NetworkPolicies.
    * ``retry_delay``, ``max_retry_delay``: seconds before the first retry of a refused create, and the most the
      backoff grows to (default :data:`RETRY_DELAY`, :data:`MAX_RETRY_DELAY`).
    * ``job_defaults``: the chart's :class:`fedkube.operator.podspec.PodDefaults` (default: fedkube's own).
    """

    API_CLIENT = "api_client"
    STATUS_URL = "status_url"
    STATUS_TIMEOUT = "status_timeout"
    CLOCK = "clock"
    METRICS = "metrics"
    LOG_FORMAT = "log_format"
    POLICY = "policy"
    NETWORK = "network"
    RETRY_DELAY = "retry_delay"
    MAX_RETRY_DELAY = "max_retry_delay"
    JOB_DEFAULTS = "job_defaults"


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Startup: kopf's settings, once, and the defaults of everything the handlers take from memo."""
    # kopf's own INFO lines ("Handler ... succeeded") would bury our Events in `kubectl describe flj`.
    settings.posting.level = logging.WARNING
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.networking.request_timeout = 60.0
    settings.networking.connect_timeout = 10.0
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    if memo.get(Memo.API_CLIENT) is None:
        memo[Memo.API_CLIENT] = _default_api_client()
    memo.setdefault(Memo.STATUS_URL, kube.default_status_url)
    memo.setdefault(Memo.STATUS_TIMEOUT, kube.STATUS_TIMEOUT)
    memo.setdefault(Memo.CLOCK, time.time)
    memo.setdefault(Memo.POLICY, AdminPolicy())


def _default_api_client() -> Any:
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


def _kube(memo: kopf.Memo) -> kube.Kube:
    return kube.Kube(memo[Memo.API_CLIENT])


def _now(memo: kopf.Memo) -> float:
    clock: Clock = memo.get(Memo.CLOCK) or time.time
    return clock()


_GONE = "fedkube_job_gone"


def _metrics(memo: Mapping[str, Any]) -> OperatorMetrics | None:
    return memo.get(Memo.METRICS)


def _instrumented(handler: Callable[..., None], handler_id: str | None = None) -> Callable[..., None]:
    """Count ``handler``'s failures by kind, record the job's phase after each call and, given the handler's id
    (a label of fedkube_operator_reconcile_seconds), time the call; all only when metrics are on."""

    @functools.wraps(handler)
    def wrapper(*, memo: kopf.Memo, status: kopf.Status, patch: kopf.Patch, name: str | None,
                namespace: str | None, **kwargs: Any) -> None:
        metrics = _metrics(memo)
        started = time.monotonic()
        try:
            handler(memo=memo, status=status, patch=patch, name=name, namespace=namespace, **kwargs)
        except Exception as exc:
            if metrics is not None:
                # The cause says what went wrong (e.g. ApiException); kopf's own wrapper only how to go on.
                metrics.reconcile_error(type(exc.__cause__ or exc).__name__)
            raise
        finally:
            if metrics is not None and handler_id is not None:
                metrics.reconcile_seconds(handler_id, time.monotonic() - started)
            # A job seen gone keeps out of the gauge: a late call with its stale status must not bring it back.
            if metrics is not None and name and not memo.get(_GONE):
                phase = patch.status.get("phase") or dict(status).get("phase")
                if phase in PHASES:
                    metrics.job_phase(str(namespace or ""), name, str(phase))

    return wrapper


def _timeouts_fired(memo: Mapping[str, Any], previous: Mapping[str, Any], status: Mapping[str, Any]) -> None:
    metrics = _metrics(memo)
    if metrics is None or "clients" not in status:
        return
    for site in lifecycle.operator_failed_sites(status) - lifecycle.operator_failed_sites(previous):
        metrics.timeout_fired(str((status["clients"].get(site) or {}).get("reason")))


def forget(memo: kopf.Memo, name: str | None, namespace: str | None, **_: Any) -> None:
    """The FLJob is gone: it no longer counts in the FLJobs-by-phase gauge."""
    memo[_GONE] = True  # kopf gives each object its own memo; a new job of the same name has a new uid and memo
    metrics = _metrics(memo)
    if metrics is not None and name:
        metrics.job_deleted(str(namespace or ""), name)


def watched(memo: kopf.Memo, type: str | None, name: str | None, namespace: str | None, **_: Any) -> None:
    """Every watch event of an FLJob; a DELETED one drops the job from the metrics.

    An event handler rather than ``on.delete``: FLJobs carry no finalizer, so
    a delete handler only runs when kopf happens to see the object while its
    deletion is pending; the watch's DELETED event always arrives.
    """
    if type == "DELETED":
        forget(memo, name, namespace)


def _post(body: kopf.Body, events: list[lifecycle.Event]) -> None:
    for event in events:
        message = event.message if len(event.message) <= EVENT_MESSAGE_LIMIT else (
            event.message[: EVENT_MESSAGE_LIMIT - 1] + "\u2026")
        kopf.event(body, type=event.type, reason=event.reason, message=message)


def _write(patch: kopf.Patch, previous: Mapping[str, Any], fields: Mapping[str, Any], *,
           only_changed: bool = False) -> None:
    """Merge ``fields`` into the status patch; a client site that disappeared is removed (null in a merge patch).

    With ``only_changed`` (for a ``previous`` read fresh from the API, not kopf's possibly older body) a field
    equal to the stored one stays out: a look that changed nothing sends no request at all (kopf skips an empty
    patch), and conditions keep their lastTransitionTime because set_condition kept it.
    """
    for key, value in fields.items():
        if only_changed and previous.get(key) == value:
            continue
        if key == "clients":
            old = previous.get("clients") or {}
            merged: dict[str, Any] = {site: None for site in old if site not in value}
            for site, entry in value.items():
                # A merge patch keeps keys it does not mention: a message of an earlier state must be nulled.
                earlier = old.get(site)
                before: Mapping[str, Any] = earlier if isinstance(earlier, Mapping) else {}
                merged[site] = {**{k: None for k in before if k not in entry}, **entry}
            value = merged
        patch.status[key] = value


def _parse(body: Mapping[str, Any]) -> FLJob:
    meta = dict(body.get("metadata") or {})
    # The spec the job runs on: an edit of a live job is refused (spec_changed), not half-applied.
    spec = edits.effective_spec(body.get("spec") or {}, body.get("status") or {})
    # The status rides along for what was fixed at creation (fedkube.operator.revoking.at_creation).
    doc = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": meta, "spec": spec,
           "status": dict(body.get("status") or {})}
    return parse_job(doc, source=f"FLJob {meta.get('namespace')}/{meta.get('name')}")


def _admitted(body: Mapping[str, Any], memo: Mapping[str, Any]) -> FLJob:
    """The job, parsed and within the admin policy; SpecError names every problem of either kind.

    Every path that builds pods goes through here (create, resume, a fixed
    spec, un-suspending, recreating the server), so editing a running job's
    spec cannot slip past the policy at the next pod creation.
    """
    job = _parse(body)
    policy: AdminPolicy = memo.get(Memo.POLICY) or AdminPolicy()
    policy.check(job)
    return job


def _refuse(body: kopf.Body, patch: kopf.Patch, previous: Mapping[str, Any], exc: SpecError, now: float) -> str:
    """Write the Invalid condition and its Events for ``exc``; returns the text for kopf's PermanentError."""
    fields, events = lifecycle.invalid(previous, exc.problems, now)
    _write(patch, previous, fields)
    _post(body, events)
    meta = body.get("metadata") or {}
    logger.warning("job %s/%s: invalid spec: %s", meta.get("namespace"), meta.get("name"), exc)
    return f"invalid FLJob: {'; '.join(str(p) for p in exc.problems)}"


# --- create / resume ------------------------------------------------------------------------------


def reconcile(
    body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, name: str | None, namespace: str | None,
    retry: int = 0, **_: Any,
) -> None:
    """Create or resume: check the spec, then make sure every child exists (pods unless suspended)."""
    previous = dict(status)
    now = _now(memo)
    try:
        job = _admitted(body, memo)
    except SpecError as exc:
        raise kopf.PermanentError(_refuse(body, patch, previous, exc, now)) from None
    phase = previous.get("phase")
    if phase in lifecycle.TERMINAL:
        logger.info("job %s/%s: already %s; nothing to do", namespace, name, phase)
        return
    # What this reconcile writes besides the certificates: nothing, unless below.
    fields: dict[str, Any] = {}
    events: list[lifecycle.Event] = []
    if job.spec.suspend:
        tls = _ensure(job, body, memo, patch, pods=False, retry=retry)
        if phase != Phase.SUSPENDED:
            # Suspended while the operator was away: its pods may still run.
            api, ref = _kube(memo), kube.JobRef.of(body)
            api.delete_pods(ref, api.job_pods(ref))
            fields, events = lifecycle.suspended(previous, now)
    else:
        # An operator restart finds a job in progress: clients the operator already failed stay without a pod.
        failed = set() if phase in (None, Phase.SUSPENDED) else lifecycle.operator_failed_sites(previous)
        # Resumed while the operator was away: new pods, so new leaf certificates (as in suspend_changed).
        tls = _ensure(job, body, memo, patch, pods=True, skip_sites=failed, rotate=phase == Phase.SUSPENDED,
                      retry=retry)
        if phase in (None, Phase.SUSPENDED):
            fields, events = lifecycle.resumed(previous, job, now)
    fields = {**(fields or lifecycle.create_succeeded(previous, now)), **_accepted(body, previous)}
    _write(patch, previous, certificates.with_tls_status(job, previous, fields, tls, lifecycle.format_time(now)))
    _post(body, events)


def _accepted(body: kopf.Body, previous: Mapping[str, Any]) -> dict[str, Any]:
    """Status fields recording that the job's children now come from its current spec (see fedkube.operator.edits)."""
    if edits.accepted_spec(previous) is not None:
        return {}
    generation = (body.get("metadata") or {}).get("generation")
    fields: dict[str, Any] = {edits.ACCEPTED_SPEC: dict(body.get("spec") or {})}
    if isinstance(generation, int):
        fields["observedGeneration"] = generation
    return fields


def _ensure(
    job: FLJob, body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, *, pods: bool,
    skip_sites: Collection[str] = frozenset(), rotate: bool = False, retry: int = 0,
) -> JobTls | None:
    """Create-or-patch the job's children, reusing the tokens and certificates already stored for it.

    ``rotate`` (the pods are new: resume after suspend) issues new leaf certificates. Returns the job's TLS
    material (None when TLS is disabled or cert-manager issues), for the status. A child's name taken by an
    object that is not this FLJob's fails the job (:func:`_name_conflict`) before that object is read, patched
    or mounted. A child the API server refuses (quota, policy) is :func:`_create_refused`; ``retry`` is kopf's
    count of earlier tries, for the backoff.
    """
    from kubernetes.client.exceptions import ApiException

    api, ref = _kube(memo), kube.JobRef.of(body)
    skip_sites = {*skip_sites, *(job.spec.revoked_sites or ())}  # a revoked site gets no pod again
    try:
        stored = api.job_secret_data(ref, naming.server_tokens_secret_name(job.name))
        tokens = kube.job_tokens(stored, [site.name for site in job.spec.clients])
        tls = _job_tls(job, api, ref, _now(memo), rotate=rotate)
        objs = builders.build_all(job, tokens=tokens, tls=tls, owner=body,
                                  log_format=memo.get(Memo.LOG_FORMAT) or "text", network=memo.get(Memo.NETWORK),
                                  defaults=memo.get(Memo.JOB_DEFAULTS))
        ports = _node_ports(job, api, ref)
        for obj in objs:
            labels = obj["metadata"].get("labels") or {}
            if obj["kind"] == "Pod" and (not pods or labels.get(naming.LABEL_SITE) in skip_sites):
                continue
            # No kopf.adopt(): the builders set the owner reference, and adopt would also copy the FLJob's labels
            # onto the pods, so an author could label them into someone else's Service (app=payments).
            result = api.create_or_patch(joins.with_node_ports(obj, job, ports) if ports else obj, ref)
            logger.debug("job %s/%s: %s %s %s", job.namespace, job.name, obj["kind"], obj["metadata"]["name"], result)
        if ports is None and (ports := _node_ports(job, api, ref)):  # the NodePort Service was made just now
            for obj in objs:
                if (updated := joins.with_node_ports(obj, job, ports)) is not obj:
                    api.create_or_patch(updated, ref)
    except kube.NameConflict as exc:
        _name_conflict(api, ref, body, patch, dict(body.get("status") or {}), _now(memo), exc)
    except kube.CreateRefused as exc:
        _create_refused(body, patch, memo, exc, retry)
    except ApiException as exc:
        # Creation is idempotent, so trying again soon is safe; kopf's default backoff would be a minute.
        raise kopf.TemporaryError(
            f"job {job.namespace}/{job.name}: the API server refused a child ({exc.status} {exc.reason}); retrying",
            delay=RETRY_DELAY,
        ) from exc
    return tls


def _node_ports(job: FLJob, api: kube.Kube, ref: kube.JobRef) -> dict[str, int] | None:
    """The nodePorts of the job's NodePort ``{job}-remote`` Service, for the join bundles (None: not one, or not
    made yet)."""
    if job.spec.server.expose.type != "NodePort" or not joins.enrolls(job):
        return None
    return joins.node_ports(job, api.job_service(ref, joins.remote_service_name(job.name)))


def _create_refused(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, exc: kube.CreateRefused,
                    retry: int) -> NoReturn:
    """Show a refused child on the job (FailedCreate, a Warning Event) and retry with backoff: quotas get freed."""
    meta = body.get("metadata") or {}
    logger.warning("job %s/%s: %s", meta.get("namespace"), meta.get("name"), exc)
    previous = dict(body.get("status") or {})
    fields, events = lifecycle.failed_create(previous, str(exc), _now(memo))
    _write(patch, previous, fields)
    _post(body, events)
    first = float(memo.get(Memo.RETRY_DELAY) or RETRY_DELAY)
    most = float(memo.get(Memo.MAX_RETRY_DELAY) or MAX_RETRY_DELAY)
    raise kopf.TemporaryError(str(exc), delay=min(first * 2 ** min(retry, 16), most)) from exc


def _job_tls(job: FLJob, api: kube.Kube, ref: kube.JobRef, now: float, *, rotate: bool) -> JobTls | None:
    """The job's own CA and certificates: the stored ones while good, new ones where not (or on ``rotate``).

    Read through the ownership check: a look-alike `<job>-ca` Secret of someone else is a NameConflict, never
    the job's CA (whoever holds its key could mint every identity of the job).
    """
    if not certificates.tls_enabled(job) or certificates.uses_issuer(job):
        return None
    ca, server, sites = certificates.stored_names(job)
    stored = certificates.StoredTls(
        ca=api.job_secret_data(ref, ca),
        server=api.job_secret_data(ref, server),
        sites={site: api.job_secret_data(ref, name) for site, name in sites.items()},
    )
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    return certificates.provision(job, stored, now=moment, rotate=rotate)


def _name_conflict(api: kube.Kube, ref: kube.JobRef, body: kopf.Body, patch: kopf.Patch,
                   previous: Mapping[str, Any], now: float, exc: kube.NameConflict) -> NoReturn:
    """Fail the job for a name it cannot have: NameConflict condition, a Warning Event, none of its pods left."""
    logger.warning("job %s/%s: %s", ref.namespace, ref.name, exc)
    # Pods come last, but a conflict on a client pod's name comes after the server pod was created.
    api.delete_pods(ref, api.job_pods(ref))
    fields, events = lifecycle.name_conflict(previous, str(exc), now)
    _write(patch, previous, fields)
    _post(body, events)
    raise kopf.PermanentError(str(exc)) from None


def _children(job: FLJob) -> list[tuple[str, str]]:
    """(kind, name) of every child but the pods, as :func:`_ensure` creates them (TTL cleanup deletes these)."""
    placeholders = {site.name: naming.TOKEN_PLACEHOLDER for site in job.spec.clients}
    tls = None if certificates.uses_issuer(job) else certificates.TlsPlaceholder()
    built = [o for o in builders.build_all(job, tokens=placeholders, tls=tls) if o["kind"] != "Pod"]
    # cert-manager Certificates before Secrets: a Certificate left behind has cert-manager write its Secret again.
    built.sort(key=lambda o: o["kind"] != certificates.CERTIFICATE_KIND)
    return [(str(o["kind"]), str(o["metadata"]["name"])) for o in built]


# --- suspend / resume ---------------------------------------------------------------------------------


def suspend_changed(
    body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, old: Any, new: Any,
    name: str | None, namespace: str | None, **_: Any,
) -> None:
    """``spec.suspend`` flipped: delete the pods (true) or recreate them so the server resumes (false)."""
    previous = dict(status)
    if previous.get("phase") in lifecycle.TERMINAL:
        return
    now = _now(memo)
    try:
        # Suspending needs no admission (it only deletes); resuming creates pods from the spec as it is now.
        job = _parse(body) if new else _admitted(body, memo)
    except SpecError as exc:
        if new:
            return  # the create/resume handler reports it
        raise kopf.PermanentError(_refuse(body, patch, previous, exc, now)) from None
    api, ref = _kube(memo), kube.JobRef.of(body)
    if new:
        pods = api.job_pods(ref)
        api.delete_pods(ref, pods)
        logger.info("job %s/%s: suspended; deleted pods %s", namespace, name, [p["metadata"]["name"] for p in pods])
        fields, events = lifecycle.suspended(previous, now)
    else:
        tls = _ensure(job, body, memo, patch, pods=True, rotate=True)  # new pods get new keys: rotation on resume
        logger.info("job %s/%s: resumed; pods recreated with new certificates", namespace, name)
        fields, events = lifecycle.resumed(previous, job, now)
        fields = certificates.with_tls_status(job, previous, fields, tls, lifecycle.format_time(now))
    _write(patch, previous, fields)
    _post(body, events)


def spec_changed(
    body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, old: Any, new: Any,
    name: str | None, namespace: str | None, **_: Any,
) -> None:
    """The spec changed: an Invalid job that is valid now starts; other changes wait for the pods' next creation."""
    previous = dict(status)
    now = _now(memo)
    if lifecycle.is_invalid(previous):
        try:
            job = _admitted(body, memo)
        except SpecError as exc:
            raise kopf.PermanentError(_refuse(body, patch, previous, exc, now)) from None
        tls = _ensure(job, body, memo, patch, pods=not job.spec.suspend)
        fields, events = (lifecycle.suspended(previous, now) if job.spec.suspend else
                          lifecycle.revalidated(previous, job, now))
        fields = {**fields, **_accepted(body, previous)}
        _write(patch, previous, certificates.with_tls_status(job, previous, fields, tls, lifecycle.format_time(now)))
        _post(body, events)
        logger.info("job %s/%s: spec fixed; job created", namespace, name)
        return
    if previous.get("phase") in lifecycle.TERMINAL:
        return
    # Running pods cannot change in place (and a new model shape mid-job would break the checkpoint): the job
    # keeps the spec it started with, and says so, when the API server did not refuse the edit (CEL) itself.
    generation = (body.get("metadata") or {}).get("generation")
    fields, events = edits.spec_edit(previous, edits.rejected_fields(new or {}, previous), generation, now)
    _write(patch, previous, fields)
    _post(body, events)


# --- watching a running job -------------------------------------------------------------------------


def observe(
    body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo, name: str | None,
    namespace: str | None, **_: Any,
) -> None:
    """One look at a job: pods, the server's status, timeouts, outcome; or the TTL once it finished."""
    api = _kube(memo)
    fresh = api.fljob(str(namespace), str(name))
    if fresh is None:
        forget(memo, name, namespace)
        return  # deleted meanwhile; owner references take its children
    # Decide from the status as stored now: kopf's body may not show our previous patch yet, and a decision on a
    # stale status would undo it (e.g. Running -> Deploying).
    previous = dict(fresh.get("status") or {})
    phase = previous.get("phase")
    if phase is None or phase == Phase.SUSPENDED:
        return  # not reconciled yet, or nothing runs
    try:
        job = _parse(fresh)
    except SpecError:
        return
    if job.spec.suspend:
        return  # the suspend handler is about to act
    now = _now(memo)
    ref = kube.JobRef.of(fresh)
    if phase not in lifecycle.TERMINAL:
        try:
            _admitted(fresh, memo)
        except SpecError as exc:
            # The spec was edited past the policy (or the admin tightened it) while the job ran: the next pod it
            # would create (a lost server) must not come from it, so the job stops here, visibly.
            api.delete_pods(ref, api.job_pods(ref))
            _refuse(body, patch, previous, exc, now)
            return
    if phase in lifecycle.TERMINAL:
        if lifecycle.ttl_expired(job, previous, now):
            count = api.delete_children(ref, _children(job))
            logger.info("job %s/%s: TTL expired; deleted %s children", namespace, name, count)
            fields, events = lifecycle.cleaned_up(previous, job.spec.ttl_seconds_after_finished or 0, now)
            _write(patch, previous, fields)
            _post(body, events)
        return
    pods = api.job_pods(ref)
    server_raw: Mapping[str, Any] | None = None
    client_raw: dict[str, Mapping[str, Any]] = {}
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if labels.get(naming.LABEL_ROLE) == naming.ROLE_SERVER:
            server_raw = pod
        elif labels.get(naming.LABEL_ROLE) == naming.ROLE_CLIENT and labels.get(naming.LABEL_SITE):
            client_raw[str(labels[naming.LABEL_SITE])] = pod
    server = views.pod_view(server_raw, naming.SERVER_CONTAINER) if server_raw is not None else None
    server_status = None
    if server_raw is not None and server is not None and server.phase == views.POD_RUNNING:
        url = memo[Memo.STATUS_URL](server_raw)
        if url:
            server_status = kube.fetch_server_status(url, float(memo[Memo.STATUS_TIMEOUT]))
    todo = restarts.plan(job, previous, client_raw, views.ServerWord.of(views.server_outcome(server), server_status))
    clients = {site: views.pod_view(pod, naming.TRAINER_CONTAINER) for site, pod in client_raw.items()
               if site not in todo.replaced}
    decision = lifecycle.decide(job, todo.previous, lifecycle.Observation(now, server, clients, server_status))
    _timeouts_fired(memo, todo.previous, decision.status)
    generation = (fresh.get("metadata") or {}).get("generation")
    if isinstance(generation, int) and not edits.rejected_fields(fresh.get("spec") or {}, previous):
        decision.status["observedGeneration"] = generation
    if decision.delete_pods:
        api.delete_pods(ref, [p for p in pods if p["metadata"]["name"] in decision.delete_pods])
    if server_raw is None and decision.status.get("phase") not in lifecycle.TERMINAL:
        try:
            _recreate_server(job, api, body, namespace, name, memo.get(Memo.LOG_FORMAT) or "text",
                             memo.get(Memo.JOB_DEFAULTS))
        except kube.NameConflict as exc:
            _name_conflict(api, ref, body, patch, previous, now, exc)
        except kube.CreateRefused as exc:  # the timer's next look tries again; the refusal shows meanwhile
            _refused_in_look(decision, previous, exc, now)
    elif server_raw is not None:
        decision.status.update(lifecycle.create_succeeded({**previous, **decision.status}, now))
    try:
        todo.events += restarts.recreate(api, ref, job, fresh, todo, memo.get(Memo.LOG_FORMAT) or "text",
                                         create=decision.status.get("phase") not in lifecycle.TERMINAL,
                                         defaults=memo.get(Memo.JOB_DEFAULTS))
    except kube.NameConflict as exc:
        _name_conflict(api, ref, body, patch, previous, now, exc)
    except kube.CreateRefused as exc:  # a refused re-creation (quota, admission) shows like any refused child
        _refused_in_look(decision, previous, exc, now)
    restarts.stamp(decision.status, todo.counts)
    revoked, revoked_events = revoking.update(job, previous)
    if revoked:  # the server re-reads its spec ConfigMap (fedkube.operator.revoking)
        api.create_or_patch(builders.build_spec_configmap(job, owner=fresh), ref)
        decision.status.update(revoked)
    _write(patch, previous, decision.status, only_changed=True)
    _post(body, [*decision.events, *todo.events, *revoked_events])
    if decision.status.get("phase") != phase:
        logger.info("job %s/%s: %s -> %s (round %s/%s)", namespace, name, phase, decision.status.get("phase"),
                    decision.status.get("round"), job.spec.rounds)


def _refused_in_look(decision: lifecycle.Decision, previous: Mapping[str, Any], exc: kube.CreateRefused,
                     now: float) -> None:
    """A create the timer's look made was refused: FailedCreate and its Event join this look's decision."""
    refused, refusal_events = lifecycle.failed_create({**previous, **decision.status}, str(exc), now)
    decision.status.update(refused)
    decision.events.extend(refusal_events)


def _recreate_server(job: FLJob, api: kube.Kube, body: kopf.Body, namespace: str | None, name: str | None,
                     log_format: str, defaults: PodDefaults | None = None) -> None:
    """The server pod of a live job is gone (deleted, evicted): start it again; it resumes from its checkpoint."""
    latest = api.fljob(job.namespace, job.name)
    if latest is None or (latest.get("spec") or {}).get("suspend"):
        return  # deleted or suspended meanwhile: no server wanted
    pod = builders.build_server_pod(job, owner=latest, log_format=log_format, defaults=defaults)
    if api.create_or_patch(pod, kube.JobRef.of(latest)) == "created":
        logger.warning("job %s/%s: server pod was gone; created it again", namespace, name)
        _post(body, [lifecycle.Event("Warning", "ServerPodRecreated",
                                     "the server pod was gone; it was created again and resumes from its checkpoint")])


def register(registry: kopf.OperatorRegistry, *, interval: float = DEFAULT_INTERVAL) -> kopf.OperatorRegistry:
    """Register the FLJob handlers on ``registry``; ``interval`` is the seconds between two looks at a job."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.create(*RESOURCE, registry=registry, id="reconcile")(_instrumented(reconcile, "reconcile"))
    kopf.on.resume(*RESOURCE, registry=registry, id="reconcile")(_instrumented(reconcile, "reconcile"))
    kopf.on.update(*RESOURCE, field="spec.suspend", registry=registry, id="suspend")(
        _instrumented(suspend_changed, "suspend"))
    kopf.on.update(*RESOURCE, field="spec", registry=registry, id="spec")(_instrumented(spec_changed, "spec"))
    kopf.timer(*RESOURCE, interval=interval, registry=registry, id="observe")(_instrumented(observe, "observe"))
    kopf.on.event(*RESOURCE, registry=registry, id="watched")(watched)
    return registry

