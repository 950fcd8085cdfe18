"""STOW-RS (DICOMweb, PS3.18 10.5) to a ``stow:`` destination: the HTTP twin of the C-STORE SCU.

:func:`node.dicom.sender.store_files` hands the files of a DICOMweb destination to
:func:`store_instances`, so both kinds share one outbox: one pass per destination, the same
backoff, dead letters and audit events. The files go as ``multipart/related;
type="application/dicom"`` POSTs to ``{url}/studies`` through dicomweb-client, as many per request
as fit in :data:`MAX_REQUEST_BYTES` and :data:`MAX_REQUEST_INSTANCES` (one request per destination
per pass unless the outbox holds more), with the client's own retries off: the outbox retries.

What an answer means for each instance follows the sender's C-STORE rules (a fault of the
destination is retried with backoff until ``retry_max_age_hours``; a fault of the object is
permanent, a dead letter at once):

- **2xx** (200, 202): an instance in the response's FailedSOPSequence failed with its
  FailureReason, permanently unless the code is one C-STORE retries (A7xx out of resources,
  0110 processing failure, 0213 resource limitation); with 200 every other instance is stored;
  with 202 an instance the ReferencedSOPSequence does not list is retried (not confirmed). A 2xx
  whose body is not DICOM JSON or XML (a proxy's login page) confirms nothing: retried.
- **409 Conflict** (nothing stored): the listed instances fail by their FailureReason as above
  and the others are retried; a 409 that lists none is treated as a 400.
- **400, 413, 415**: the request's content is refused (malformed, too large, unsupported media
  type: the "cannot understand" / refused-presentation-context of DICOMweb). A request of several
  instances is resent one instance per request in the same pass, so the failure keeps the size of
  its cause; an instance refused on its own is **permanent** (dead).
- **401, 403**: the destination does not accept the node's credentials (or has no credentials
  configured for it): **retried**, like a rejected association: it is fixed on the PACS or in
  the node's environment, after which delivery resumes with no command.
- **404, 405 and every other 4xx**: no STOW-RS service at that URL (a wrong path, a plugin not
  enabled), a fault of the destination: **retried**, then dead after ``retry_max_age_hours``.
- **408, 429, 5xx, no connection, a reset, a timeout**, a redirect that turned the POST into a
  GET (301/302/303; 307/308 keep the POST and are followed), and an ``auth_env`` variable that is
  not set: **retried**.

Resends are harmless: output SOP Instance UIDs are deterministic and a PACS keeps one copy.
Logs name the URL, HTTP statuses and counts; the sender logs SOP Instance UIDs. No header is ever
logged, and the secret is read from the environment only when a request is made.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from inference import InputError, read_dataset
from node.config import StowAuth, StowTarget
from node.dicom.outcome import SUCCESS_NAME, SendOutcome
from node.dicom.status import PROCESSING_FAILURE, SUCCESS, is_transient_failure, status_name

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient

log = logging.getLogger(__name__)
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # it narrates each request at INFO

MAX_REQUEST_BYTES = 32 * 1024 * 1024
"""Bytes of DICOM files per request at most (a larger file goes alone): the request is built in
memory, by dicomweb-client, beside the datasets it encodes."""
MAX_REQUEST_INSTANCES = 100
ACCEPT = "application/dicom+json"
JSON_MEDIA_TYPES = ("application/dicom+json", "application/json")
XML_MEDIA_TYPES = ("application/dicom+xml", "application/xml")
CONTENT_REFUSED = frozenset(
    {
        HTTPStatus.BAD_REQUEST,
        HTTPStatus.CONFLICT,
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    }
)
"""Statuses that refuse what was sent rather than the sender (see the module docstring)."""
_ERRNO_RE = re.compile(r"\[Errno -?\d+\] [^'\")]+")


@dataclass(frozen=True)
class _Part:
    path: Path
    size: int


@dataclass(frozen=True)
class _Reply:
    """What one request got: its HTTP status (None: no response), a line for logs and audit, the
    instances the response body names as failed (UID -> FailureReason) and as stored, and the
    media type of a body that is no STOW-RS response at all (a proxy's login page)."""

    code: int | None
    detail: str
    failed: dict[str, int] = field(default_factory=dict)
    stored: frozenset[str] = frozenset()
    foreign: str = ""

    @property
    def content_refused(self) -> bool:
        """The whole request's content was refused, no instance named: resend one by one."""
        return self.code in CONTENT_REFUSED and not self.failed


def store_instances(
    paths: Sequence[Path], target: StowTarget, *, environ: Mapping[str, str] | None = None
) -> list[SendOutcome]:
    """STOW-RS ``paths`` to ``target``; one outcome per path, in order. Unreadable and non-DICOM
    files fail permanently without stopping the rest. ``environ`` (default ``os.environ``) holds
    the variable ``target.auth_env`` names."""
    outcomes: dict[Path, SendOutcome] = {}
    parts: list[_Part] = []
    for raw in paths:
        path = Path(raw)
        try:
            parts.append(_Part(path, path.stat().st_size))
        except OSError as exc:
            outcomes[path] = SendOutcome(path, None, f"not sent: {exc}", permanent=True)
    if parts:
        outcomes.update(_send(parts, target, os.environ if environ is None else environ))
    return [outcomes[Path(p)] for p in paths]


def _send(parts: list[_Part], target: StowTarget, environ: Mapping[str, str]) -> dict[Path, SendOutcome]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    headers = {"Accept": ACCEPT}
    outcomes: dict[Path, SendOutcome] = {}
    with requests.Session() as session:
        problem = _authenticate(session, headers, target, environ)
        if problem:
            log.warning("cannot send to stow:%s: %s", target.url, problem)
            return {p.path: SendOutcome(p.path, None, problem) for p in parts}
        responses: list[requests.Response] = []
        client = DICOMwebClient(
            target.url,
            session=session,
            headers=headers,
            callback=_keep(responses),
            chunk_size=sys.maxsize,  # one plain body: no chunked transfer encoding
            timeout=target.timeout_seconds,
        )
        client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff
        for batch in _batches(parts):
            results, refused = _post(client, responses, batch, target)
            if refused and len(batch) > 1:
                results = [o for part in batch for o in _post(client, responses, [part], target)[0]]
            outcomes.update((o.path, o) for o in results)
    return outcomes


def _keep(responses: list[requests.Response]) -> Callable[..., None]:
    """A response hook that keeps each response: its status decides, not the client's verdict."""

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        responses.append(response)

    return hook


def _authenticate(
    session: requests.Session, headers: dict[str, str], target: StowTarget, environ: Mapping[str, str]
) -> str:
    """Put ``target``'s credentials on the session (basic) or the headers (bearer); a reason why
    not (the variable is unset or unusable), or ``""``. The reason never quotes the secret."""
    if target.auth is None:
        return ""
    secret = environ.get(target.auth_env, "").strip()
    if not secret:
        return f"environment variable {target.auth_env} (auth_env) is not set"
    if not secret.isascii() or not secret.isprintable():
        return f"environment variable {target.auth_env} holds control or non-ASCII characters"
    if target.auth == StowAuth.BEARER:
        if any(c.isspace() for c in secret):
            return f"environment variable {target.auth_env} holds spaces; a bearer token has none"
        headers["Authorization"] = f"Bearer {secret}"
        return ""
    user, sep, password = secret.partition(":")
    if not sep:
        return f"environment variable {target.auth_env} must hold USER:PASSWORD for basic auth"
    session.auth = (user, password)
    return ""


def _batches(parts: list[_Part]) -> list[list[_Part]]:
    """Consecutive parts, as many per request as the byte and instance caps allow."""
    batches: list[list[_Part]] = []
    size = 0
    for part in parts:
        full = batches and (size + part.size > MAX_REQUEST_BYTES or len(batches[-1]) >= MAX_REQUEST_INSTANCES)
        if not batches or full:
            batches.append([])
            size = 0
        batches[-1].append(part)
        size += part.size
    return batches


def _post(
    client: DICOMwebClient, responses: list[requests.Response], batch: list[_Part], target: StowTarget
) -> tuple[list[SendOutcome], bool]:
    """One request with the files of ``batch``: their outcomes, and whether the request's content
    was refused as a whole (the caller then resends the instances one by one)."""
    outcomes: list[SendOutcome] = []
    loaded: list[tuple[Path, str, Dataset]] = []
    for part in batch:
        try:
            ds = read_dataset(part.path)
        except (InputError, OSError) as exc:
            outcomes.append(SendOutcome(part.path, None, f"not sent: {exc}", permanent=True))
            continue
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if not uid:
            outcomes.append(SendOutcome(part.path, None, "not sent: no SOP Instance UID", permanent=True))
            continue
        loaded.append((part.path, uid, ds))
    if not loaded:
        return outcomes, False
    reply = _request(client, responses, [ds for _, _, ds in loaded], target)
    outcomes += [_outcome(reply, path, uid) for path, uid, _ in loaded]
    failures = sum(1 for o in outcomes[-len(loaded) :] if not o.ok)
    if failures:
        log.warning(
            "STOW-RS to %s: %s; %d of %d instance(s) not stored",
            target.url,
            reply.detail,
            failures,
            len(loaded),
        )
    return outcomes, reply.content_refused


def _request(
    client: DICOMwebClient, responses: list[requests.Response], datasets: list[Dataset], target: StowTarget
) -> _Reply:
    import requests

    responses.clear()
    try:
        client.store_instances(datasets)
    except requests.HTTPError:
        pass  # the status, kept by the hook, decides below
    except requests.Timeout:
        return _Reply(None, f"STOW-RS request timed out after {target.timeout_seconds:g} s")
    except requests.RequestException as exc:
        return _Reply(None, f"no STOW-RS response: {_connection_error(exc)}")
    except ValueError:
        pass  # a response body the client cannot read; the status decides
    if not responses:
        return _Reply(None, "no STOW-RS response")
    response = responses[-1]
    if response.request.method != "POST":  # a 301/302/303 redirect turned the POST into a GET
        return _Reply(
            None, f"STOW-RS request redirected (HTTP {responses[0].status_code}): configure the final URL"
        )
    detail = f"HTTP {response.status_code} {response.reason or ''}".strip()
    media = response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if media in JSON_MEDIA_TYPES and response.content:
        return _Reply(response.status_code, detail, *_instances(response))
    foreign = (media or "untyped") if response.content and media not in XML_MEDIA_TYPES else ""
    return _Reply(response.status_code, detail, foreign=foreign)


def _connection_error(exc: Exception) -> str:
    """The operating system's reason (``[Errno 111] Connection refused``) without the library's
    text around it, or the exception's type: nothing a request header could have put there."""
    found = _ERRNO_RE.search(str(exc))
    return found.group(0).strip() if found else type(exc).__name__


def _instances(response: requests.Response) -> tuple[dict[str, int], frozenset[str]]:
    """The failed (UID -> FailureReason) and stored instances a DICOM JSON STOW-RS response lists."""
    try:
        body = Dataset.from_json(response.content)
        failed = {
            str(item.get("ReferencedSOPInstanceUID", "")): _reason(item)
            for item in body.get("FailedSOPSequence", None) or []
        }
        stored = frozenset(
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in body.get("ReferencedSOPSequence", None) or []
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("STOW-RS response (HTTP %s) is not a readable DICOM JSON dataset", response.status_code)
        return {}, frozenset()
    return failed, stored


def _reason(item: Dataset) -> int:
    """An item's FailureReason; a processing failure (retried) when it gives none."""
    value = item.get("FailureReason", None)
    return int(value) if value not in (None, "") else PROCESSING_FAILURE


def _outcome(reply: _Reply, path: Path, uid: str) -> SendOutcome:
    """What ``reply`` means for the instance ``uid`` (the table of the module docstring)."""
    code = reply.code
    if code is None:
        return SendOutcome(path, None, reply.detail)
    if uid in reply.failed:
        reason = reply.failed[uid]
        detail = f"STOW-RS {reply.detail}: {status_name(reason)}"
        return SendOutcome(path, reason, detail, permanent=not is_transient_failure(reason))
    if HTTPStatus.OK <= code < HTTPStatus.MULTIPLE_CHOICES:
        if reply.foreign:
            return SendOutcome(
                path, None, f"STOW-RS {reply.detail}: a {reply.foreign} body, not a STOW-RS response"
            )
        if code != HTTPStatus.ACCEPTED or uid in reply.stored:
            return SendOutcome(path, SUCCESS, SUCCESS_NAME)
        return SendOutcome(path, None, f"STOW-RS {reply.detail}: the response does not confirm this instance")
    if code in CONTENT_REFUSED:
        if reply.failed:
            return SendOutcome(
                path, None, f"STOW-RS {reply.detail}: not stored, another instance was refused"
            )
        return SendOutcome(
            path, None, f"STOW-RS {reply.detail}: the request's content was refused", permanent=True
        )
    return SendOutcome(path, None, f"STOW-RS {reply.detail}")
